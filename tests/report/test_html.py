"""report.html / report.md: self-contained, every reference resolves, the tables say what
summary.json says; and a real post_training.py summary renders."""

import base64
import json
from html.parser import HTMLParser

import pytest
import torch

from bvvit.report import write_report
from bvvit.report.html import coverage_groups, headline_rows, render_html
from bvvit.report.plots import Figure
from test_plots import make_analysis, make_summary  # noqa: E402  (tests/report is on sys.path)

PNG = b"\x89PNG\r\n\x1a\n"


class _References(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if key == "href" and tag == "a":
                self.links.append(value)
            if value.startswith(("http:", "https:", "//")):
                self.external.append(value)


def _references(page: str) -> _References:
    parser = _References()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    summary, analysis = make_summary(), make_analysis()
    path = write_report(out, summary, analysis)
    return out, path, summary, analysis


def test_every_reference_resolves_without_network(report):
    out, path, _, _ = report
    page = path.read_text()
    refs = _references(page)
    assert len(refs.images) == 13  # every figure of this run (no training curves here)
    for image in refs.images:
        src = image["src"]
        if src.startswith("data:"):
            header, _, payload = src.partition(",")
            assert header == "data:image/png;base64"
            assert base64.b64decode(payload)[:8] == PNG
        else:
            assert (out / src).is_file(), src
        assert image.get("alt")
    assert refs.external == [] and "<link" not in page and "@import" not in page
    ids = {part.split("'")[0] for part in page.split("id='")[1:]}
    assert all(link.startswith("#") and link[1:] in ids for link in refs.links)


def test_relative_image_mode_points_at_existing_files(report):
    out, _, summary, analysis = report
    figures = [Figure("size", "Model file size", out / "plots" / "model_size.png", "A caption."),
               Figure("gone", "Skipped", None, "No data, so not drawn.")]
    page = render_html(summary, analysis, figures, out, embed=False)
    refs = _references(page)
    assert [i["src"] for i in refs.images] == ["plots/model_size.png"]
    assert "No data, so not drawn." in page  # skipped figures say why


def test_tables_say_what_the_summary_says(report):
    out, path, summary, analysis = report
    page = path.read_text()
    for row, cells in zip(summary["rows"], headline_rows(summary)):
        assert cells[3] == f"{row['top1']:.2f}" and cells[13] == row["kernel"]
        assert all(f">{cell}<" in page.replace("&#x27;", "'") for cell in cells[:13])
    assert headline_rows(summary)[1][5] == "+1.30" and headline_rows(summary)[0][8] == "∞"
    # images lost / gained against FP32 and the McNemar p of that split
    flips = {row["name"]: cells[7] for row, cells in zip(summary["rows"], headline_rows(summary))}
    assert flips["fp32"] == "—" and flips["w8a8"] == "0 / 0 (p 1.00)"
    assert flips["w4a4"] == "36 / 10 (p 0.00016)"  # 26 images net: not chance
    assert flips["w8a8-ort"] == "2 / 0 (p 0.50)"  # 2 images: could be
    groups = coverage_groups(summary)
    # mse at 4, 6 and 8 bits share one layout; the int8 runtime row and minmax are separate.
    assert [g["variants"] for g in groups] == [["W4A4", "W6A6", "W8A8", "W8A8-ort"], ["W4A4-minmax"]]
    assert groups[0]["rows"][2] == ["Linear", "linear_input", "4, 6, 8", "tensor", "9"]
    assert "override pattern &#x27;blocks.9.*&#x27; matched no layer (W4A4, W4A4-minmax, W8A8, W8A8-ort)" in page
    assert analysis["sensitivity"]["cli"] in page
    for library, version in summary["system"]["libraries"].items():
        assert f"<td class=\"text\">{library}</td><td class=\"text\">{version}</td>" in page
    markdown = (out / "report.md").read_text()
    assert "| W4A4 | 4 / 4 | mse | 88.70 | 100.00 | +1.30 |" in markdown
    assert analysis["sensitivity"]["cli"] in markdown
    for line in markdown.splitlines():
        if line.startswith("!["):
            assert (out / line.split("](")[1].rstrip(")")).is_file()
    assert json.loads((out / "analysis.json").read_text())["level"] == "full"


def test_a_real_post_training_summary_renders(tmp_path):
    """End to end: post_training.run on a tiny image folder, then the report from its summary."""
    from helpers import make_image_folder

    from bvvit.config import ModelConfig, Preprocessing
    from bvvit.model import VisionTransformer
    from bvvit.model_file import save_model_file
    from bvvit.ptq import PTQJob, run

    data = make_image_folder(tmp_path / "data", per_class=4, size=16)
    torch.manual_seed(0)
    model = VisionTransformer(ModelConfig(img_size=16, patch_size=4, in_chans=1, num_classes=3,
                                          embed_dim=16, depth=1, num_heads=2))
    save_model_file(tmp_path / "vit_model.pth", model, ["ant", "bee", "cat"],
                    Preprocessing(mean=(0.5,), std=(0.25,), img_size=16, in_chans=1), {"data_path": str(data)})
    out = tmp_path / "quantization"
    summary = run(PTQJob(model_path=str(tmp_path / "vit_model.pth"), output_dir=str(out), data_path=str(data),
                         bit_pairs=[(4, 4)], calib_size=8, batch_size=8, latency_runs=2,
                         latency_batches=(1,), progress=False))
    summary = json.loads((out / "summary.json").read_text())  # as a later reader sees it
    page = write_report(out, summary, None).read_text()
    refs = _references(page)
    assert len(refs.images) >= 7 and all(i["src"].startswith("data:image/png;base64,") for i in refs.images)
    assert "W4A4-minmax" in page and "Run with <code>--analysis full</code>" in page
    assert (out / "report.md").is_file() and (out / "plots" / "accuracy_vs_bits.png").is_file()


def test_settings_name_the_checkpoint_format_and_its_preprocessing():
    """The report says which transform the quantized model is evaluated (and deployed) with."""
    from bvvit.config import Preprocessing
    from bvvit.report.html import settings_items
    summary = make_summary()
    summary["model_format"] = "hf"
    summary["preprocessing"] = Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, img_size=224, in_chans=3,
                                             interpolation="bicubic", crop_pct=224 / 256,
                                             crop_mode="squash").to_dict()
    items = dict(settings_items(summary, None))
    assert items["Model file"].endswith("(hf checkpoint)")
    assert items["Preprocessing"] == ("resize both sides to 256 (bicubic), centre crop 224, "
                                      "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]")
    del summary["preprocessing"]  # a summary of an earlier version
    assert dict(settings_items(summary, None))["Preprocessing"] == "—"


def test_calibration_source_and_distance_are_stated():
    from bvvit.report.html import calibration_text
    assert calibration_text({"size": 16, "split": "train"}) == "16 from the train split"
    text = calibration_text({"source": "folder", "split": "folder /data/other", "size": 8,
                             "frechet_to_eval": 41.23, "frechet_train_to_eval": 3.05})
    assert text == ("8 from folder /data/other; Frechet distance to the evaluation images 41.2 "
                    "(a training subset: 3.0)")
