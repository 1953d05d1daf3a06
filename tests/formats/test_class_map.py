"""Which head output each class folder is: same classes, by name, by ImageNet synset, by order."""

import pytest
import torch

from bvvit.data.imagenet import imagenet1k_wnids, is_wnid
from bvvit.errors import DataError
from bvvit.ptq.classes import map_classes


def test_the_shipped_imagenet_list_is_the_standard_one():
    wnids = imagenet1k_wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    assert all(is_wnid(w) for w in wnids)
    # anchors of the standard order: tench first, toilet tissue last, goldfish second
    assert (wnids[0], wnids[1], wnids[999]) == ("n01440764", "n01443537", "n15075141")


def test_torchvision_categories_follow_the_sorted_synsets():
    from torchvision.models import ViT_B_16_Weights
    categories = ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"]
    assert (categories[0], categories[1], categories[999]) == ("tench", "goldfish", "toilet tissue")


def test_same_classes_are_the_identity():
    mapping = map_classes(["ant", "bee"], ["ant", "bee"], 2, "data", "model")
    assert mapping.is_identity and mapping.describe() is None


def test_a_partial_imagenet_folder_indexes_the_full_head_by_synset():
    wnids = imagenet1k_wnids()
    folders = [wnids[0], wnids[417], wnids[999]]
    human = ["tench, Tinca tinca"] + [f"class {i}" for i in range(1, 1000)]  # HF-style names
    for names in ([], human, list(wnids)):
        mapping = map_classes(folders, names, 1000, "data", "model")
        assert mapping.head_indices == (0, 417, 999)
        assert len(mapping.head_names) == 1000
        assert "3 of the head's 1000 classes" in mapping.describe()


def test_a_subset_of_named_classes_maps_by_name():
    mapping = map_classes(["cat", "dog"], ["ant", "cat", "dog", "eel"], 4, "data", "model")
    assert mapping.head_indices == (1, 2) and mapping.how == "names"


def test_unnamed_head_takes_the_sorted_folders_when_counts_agree():
    mapping = map_classes(["a", "b", "c"], [], 3, "data", "model")
    assert mapping.is_identity and mapping.head_names == ("a", "b", "c")


@pytest.mark.parametrize("data, names, outputs, fragment", [
    (["x", "y"], ["a", "b"], 2, "match neither"),
    (["a", "b"], [], 3, "has 2 classes but the head of model has 3"),
    (["n99999999"], [], 1000, "not ImageNet-1k synsets"),
])
def test_folders_that_name_no_output_are_one_line(data, names, outputs, fragment):
    with pytest.raises(DataError, match=fragment):
        map_classes(data, names, outputs, "data", "model")


def test_metrics_of_a_partial_data_set_cover_its_classes_against_the_full_head():
    from bvvit.evaluate.classification import classification_metrics
    logits = torch.zeros(4, 10)
    logits[0, 7] = logits[1, 2] = logits[2, 5] = logits[3, 2] = 1.0  # image 2: an output outside
    labels = torch.tensor([7, 2, 2, 7])  # the data's classes are outputs 7 and 2
    names = [f"c{i}" for i in range(10)]
    m = classification_metrics(logits, labels, class_names=names, class_indices=(7, 2))
    assert m["top1"] == 50.0 and (m["num_classes"], m["num_outputs"]) == (2, 10)
    assert m["class_names"] == ["c7", "c2"] and m["head_indices"] == [7, 2]
    assert m["per_class_count"] == [2, 2] and m["per_class_accuracy"] == [50.0, 50.0]
    assert m["confusion"] == [[1, 1], [0, 1]]  # image 2 predicted as output 5: in no column


@pytest.mark.slow
def test_post_training_scores_a_partial_synset_folder_against_the_1000_class_head(tmp_path):
    """3 synset folders of a 1000-class timm checkpoint whose head always answers the first
    folder's synset: top-1 is exactly a third only if folders index the head by synset."""
    import json

    timm = pytest.importorskip("timm")
    from tests.helpers import make_image_folder, run_cli
    wnids = imagenet1k_wnids()
    folders = (wnids[3], wnids[500], wnids[998])
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, num_classes=1000, embed_dim=16, depth=1, num_heads=2)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[3] = 10.0
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    data = make_image_folder(tmp_path / "val", classes=folders, size=16, mode="RGB", per_class=4)
    result = run_cli("post_training.py", "--model-path", str(tmp_path / "vit.pth"), "--data-path", str(data),
                     "--num-heads", "2", "--bits", "8", "--baseline", "none", "--calib-size", "8",
                     "--analysis", "none", "--no-onnx", "--no-progress", "--output-dir", str(tmp_path / "q"))
    assert result.returncode == 0, result.stderr
    assert "the data has 3 of the head's 1000 classes, mapped by ImageNet-1k synset" in result.stdout
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    fp32 = summary["variants"]["fp32"]["metrics"]
    assert fp32["top1"] == pytest.approx(100 / 3) and fp32["head_indices"] == [3, 500, 998]
    assert fp32["class_names"] == list(folders) and len(summary["class_names"]) == 1000
    assert summary["variants"]["w8a8"]["metrics"]["per_class_accuracy"] == [100.0, 0.0, 0.0]
