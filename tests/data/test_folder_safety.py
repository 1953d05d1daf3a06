"""Image folders a user may really have: symbolic links (loops, links between classes,
class folders on another disk), FIFOs named like images, unreadable folders, 16-bit and
float images. Nothing may be counted twice, mislabelled, hang or be skipped silently."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bvvit.data import build_dataset, resolve_data
from bvvit.data.folder import load_image
from bvvit.errors import DataError
from tests.helpers import TINY_MODEL_ARGS, assert_one_line_error, make_image_folder, run_cli

CLASSES = {name: [(f"{i}.png", "L", (4, 4)) for i in range(3)] for name in ("a", "b")}


@pytest.fixture
def data(tmp_path, folder_maker) -> Path:
    """tmp/d/{train,val}/{a,b}/{0,1,2}.png"""
    return folder_maker(tmp_path / "d", CLASSES)


def scan(root: Path, split: str = "train"):
    """One split of ``root``, or a failure if scanning it does not end (a link loop)."""
    return within_timeout(lambda: build_dataset(resolve_data(str(root)), split))


def warning_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def real_labels(dataset) -> list[tuple[str, str]]:
    """(real path, class name) of every sample."""
    return [(os.path.realpath(path), dataset.class_names[label]) for path, label in dataset.samples]


def assert_labelled_by_own_folder(dataset, root: Path) -> None:
    """Every sample's real file lies in the real folder of the class it is labelled."""
    for real, name in real_labels(dataset):
        class_real = os.path.realpath(root / "train" / name)
        assert real.startswith(class_real + os.sep), (real, name)


def within_timeout(function, timeout_s=60, fifos=()):
    """``function()``, run in a thread so that a regression (a walk that loops for ever,
    an open() of a FIFO that blocks) fails the test instead of hanging it. FIFOs in
    ``fifos`` are opened for writing on a timeout, which releases a blocked reader."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(10)
        pytest.fail(f"still running after {timeout_s} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# --- links ---------------------------------------------------------------------------------

@pytest.mark.parametrize("link,target", [
    ("train/a/up", ".."),  # train/: a and b again, all labelled a (the reported 5,412 samples)
    ("train/a/top", "../.."),  # the data root: val/ as well
    ("train/b/deep/self", "."),
    ("train/b/deep/back", ".."),  # the class folder itself
])
def test_link_to_a_folder_above_is_never_followed(data, caplog, link, target):
    (data / link).parent.mkdir(exist_ok=True)
    (data / link).symlink_to(target)
    train = scan(data)
    assert len(train) == 6 and train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert_labelled_by_own_folder(train, data)
    lines = warning_lines(caplog)
    assert len(lines) == 1 and str(data / link) in lines[0] and "(a loop)" in lines[0], lines


def test_link_into_another_class_never_gives_its_images_this_label(data, caplog):
    (data / "train" / "a" / "bb").symlink_to("../b")
    (data / "train" / "a" / "x.png").symlink_to("../b/0.png")
    (data / "train" / "b" / "deep").mkdir()
    (data / "train" / "b" / "deep" / "aa").symlink_to("../../a")
    train = scan(data)
    assert len(train) == 6 and train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert_labelled_by_own_folder(train, data)
    lines = warning_lines(caplog)
    assert len(lines) == 1 and "3 links" in lines[0] and "another class" in lines[0], lines


def test_link_to_a_folder_holding_another_class_folder_skips_that_class(data, tmp_path,
                                                                       image_writer, caplog):
    disk = tmp_path / "disk"
    disk.mkdir()
    shutil.move(data / "train" / "b", disk / "b")
    (data / "train" / "b").symlink_to(disk / "b")  # class b lives on another disk
    image_writer(disk / "loose.png", "L", (4, 4))
    (data / "train" / "a" / "all").symlink_to(disk)  # holds b's folder and one more image
    train = scan(data)
    assert train.targets.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert train.samples[3][0] == str(data / "train" / "a" / "all" / "loose.png")
    lines = warning_lines(caplog)
    assert len(lines) == 1 and "another class" in lines[0] and "class b" in lines[0], lines


@pytest.mark.parametrize("make_only_entry", [
    lambda b: (b / "x.png").symlink_to("../a/0.png"),
    lambda b: (b / "in_a").symlink_to("../a"),
    lambda b: os.mkfifo(b / "x.png"),
], ids=["file link into class a", "folder link to class a", "FIFO"])
def test_layout_check_and_scan_apply_the_same_rules(data, make_only_entry):
    """A class whose only entry is not its image has no images, already for the cheap
    layout check (which opens a few images to decide RGB or grayscale)."""
    class_b = data / "train" / "b"
    for path in class_b.iterdir():
        path.unlink()
    make_only_entry(class_b)
    with pytest.raises(DataError, match=f"class folder {class_b} has no images"):
        within_timeout(lambda: resolve_data(str(data)), fifos=[class_b / "x.png"])


def test_a_file_reached_by_several_links_is_one_sample(data, tmp_path, image_writer, caplog):
    outside = image_writer(tmp_path / "elsewhere" / "img.png", "L", (4, 4))
    class_a = data / "train" / "a"
    (class_a / "l1.png").symlink_to(outside)
    (class_a / "l2.png").symlink_to(outside)
    (class_a / "-0.png").symlink_to("0.png")  # sorts before the file it points to
    train = scan(data)
    reals = [real for real, _ in real_labels(train)]
    assert len(reals) == len(set(reals)) == 7 and train.targets.tolist().count(0) == 4
    assert str(class_a / "0.png") in [path for path, _ in train.samples]  # the plain path kept
    lines = warning_lines(caplog)
    assert len(lines) == 1 and "2 links" in lines[0] and "already" in lines[0], lines


def test_a_folder_reached_twice_is_walked_once(data, caplog, image_writer):
    image_writer(data / "train" / "a" / "sub" / "s.png", "L", (4, 4))
    (data / "train" / "a" / "link").symlink_to("sub")  # "link" sorts before "sub"
    train = scan(data)
    assert train.targets.tolist().count(0) == 4
    assert str(data / "train" / "a" / "sub" / "s.png") in [path for path, _ in train.samples]
    lines = warning_lines(caplog)
    assert len(lines) == 1 and str(data / "train" / "a" / "link") in lines[0], lines


def test_class_folders_linked_to_another_disk_keep_working(data, tmp_path, image_writer, caplog):
    disk = tmp_path / "disk"
    disk.mkdir()
    shutil.move(data / "train" / "a", disk / "a")
    (data / "train" / "a").symlink_to(disk / "a")
    for i in range(2):
        image_writer(tmp_path / "extra" / f"e{i}.png", "L", (4, 4))
    (data / "train" / "b" / "more").symlink_to(tmp_path / "extra")
    train = scan(data)
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert [Path(path).name for path, _ in train.samples[-2:]] == ["e0.png", "e1.png"]
    assert warning_lines(caplog) == []


def test_same_file_in_train_and_val_is_reported_once(data, caplog):
    (data / "train" / "a" / "v.png").symlink_to("../../val/a/0.png")
    shutil.rmtree(data / "val" / "b")
    (data / "val" / "b").symlink_to("../train/b")  # the whole class folder leaks
    source = resolve_data(str(data))
    assert len(build_dataset(source, "train")) == 7
    assert len(build_dataset(source, "val")) == 6
    lines = warning_lines(caplog)
    assert len(lines) == 1, lines
    assert "4 images" in lines[0] and "val/" in lines[0], lines[0]


@pytest.mark.parametrize("target,message", [("a", "same folder"), ("..", "whole split"),
                                            ("../..", "whole split")])
def test_class_folder_linked_to_another_class_or_above_is_refused(data, target, message):
    shutil.rmtree(data / "train" / "b")
    (data / "train" / "b").symlink_to(target)
    with pytest.raises(DataError, match=message):
        scan(data)


# --- files that are not images -------------------------------------------------------------

def test_fifo_named_like_an_image_is_ignored_not_opened(data, caplog):
    fifos = [data / "train" / "a" / "-first.png", data / "val" / "b" / "x.jpg"]
    for fifo in fifos:
        os.mkfifo(fifo)

    def both_splits():
        source = resolve_data(str(data))
        return build_dataset(source, "train"), build_dataset(source, "val")

    train, val = within_timeout(both_splits, fifos=fifos)
    assert len(train) == len(val) == 6 and train.ignored_files == val.ignored_files == 1
    lines = warning_lines(caplog)
    assert len(lines) == 2 and all("not a regular file" in line for line in lines), lines


def test_broken_links_are_ignored_and_said_in_one_line(data, caplog):
    (data / "train" / "a" / "gone.png").symlink_to("nowhere.png")
    (data / "train" / "b" / "moved").symlink_to("/nonexistent/disk/b")  # a folder, once
    train = scan(data)
    assert len(train) == 6 and train.ignored_files == 2
    lines = warning_lines(caplog)
    assert len(lines) == 1 and "ignored 2 links pointing nowhere" in lines[0], lines
    assert str(data / "train" / "a" / "gone.png") in lines[0]


# --- unreadable folders: one line naming the path and the reason -------------------------

@pytest.mark.parametrize("locked", ["train/a/sub", "train/b", "val"])
def test_unreadable_folder_is_a_data_error(data, image_writer, monkeypatch, locked):
    image_writer(data / "train" / "a" / "sub" / "s.png", "L", (4, 4))
    locked_path = str(data / locked)
    scandir = os.scandir

    def refusing_scandir(path="."):
        if os.fspath(path) == locked_path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    with pytest.raises(DataError) as exc_info:
        source = resolve_data(str(data))
        build_dataset(source, "train")
        build_dataset(source, "val")
    message = str(exc_info.value)
    assert "\n" not in message and locked_path in message and "Permission denied" in message


def _unprivileged_prefix(probe_dir: Path) -> list[str] | None:
    """A command prefix under which permission bits apply: none when not root; for root,
    setpriv without the capabilities that bypass them; None if neither works here."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    caps = "-dac_override,-dac_read_search"
    prefix = [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]
    locked = probe_dir / "locked"
    locked.mkdir(mode=0)
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c",
                                "import os, sys; os.listdir(sys.argv[1])", str(locked)],
                               capture_output=True, text=True, timeout=60)
    finally:
        locked.chmod(0o755)
    return prefix if "PermissionError" in probe.stderr else None


@pytest.mark.slow
@pytest.mark.parametrize("locked", ["train/ant/nested", "train/bee", "val", "."])
def test_run_py_names_an_unreadable_folder(tmp_path, image_writer, locked):
    prefix = _unprivileged_prefix(tmp_path)
    if prefix is None:
        pytest.skip("running as root without setpriv able to drop CAP_DAC_OVERRIDE: "
                    "permission bits cannot be tested here")
    data = make_image_folder(tmp_path / "d", per_class=4)
    image_writer(data / "train" / "ant" / "nested" / "n.png", "L", (16, 16))
    path = data / locked
    path.chmod(0)
    try:
        result = run_cli("run.py", "--data-path", str(data), "--output-dir", str(tmp_path / "o"),
                         "--epochs", "1", "--batch-size", "8", *TINY_MODEL_ARGS, "--no-progress",
                         prefix=prefix)
    finally:
        path.chmod(0o755)
    assert_one_line_error(result, str(path), "Permission denied")


# --- 16-bit and float images: scaled by the mode's range, never by their own values ------

def _gray16(value: int) -> Image.Image:
    return Image.fromarray(np.full((4, 4), value, dtype=np.uint16))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_images_are_scaled_by_their_range_not_their_maximum(tmp_path, suffix):
    dark, bright = tmp_path / f"dark{suffix}", tmp_path / f"bright{suffix}"
    _gray16(200).save(dark)  # max <= 255: was left unscaled (200 instead of 1)
    _gray16(32896).save(bright)  # 128 * 257
    with Image.open(dark) as img:
        assert img.mode.startswith("I;16"), img.mode  # what this Pillow makes of 16-bit files
    assert load_image(str(dark), 1).unique().tolist() == [1]
    assert load_image(str(bright), 1).unique().tolist() == [128]
    rgb = load_image(str(dark), 3)
    assert rgb.shape == (3, 4, 4) and rgb.unique().tolist() == [1]


def test_mode_i_is_treated_as_sixteen_bit_and_clipped(tmp_path):
    rows = {"dark": [0, 200, 255], "bright": [32896, 65535, 70000]}
    expected = {"dark": [0, 1, 1], "bright": [128, 255, 255]}
    for name, row in rows.items():
        Image.fromarray(np.array([row], dtype=np.int32)).save(tmp_path / f"{name}.tif")
        with Image.open(tmp_path / f"{name}.tif") as img:
            assert img.mode == "I"
        assert load_image(str(tmp_path / f"{name}.tif"), 1)[0, 0].tolist() == expected[name]


def test_float_images_are_zero_to_one(tmp_path):
    path = tmp_path / "f.tif"
    pixels = np.array([[0.0, 0.25, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32)
    Image.fromarray(pixels).save(path)
    with Image.open(path) as img:
        assert img.mode == "F"
    assert load_image(str(path), 1)[0, 0].tolist() == [0, 64, 128, 255, 255, 0, 0]
