"""A tiny model trained once on a tiny ImageNet-style folder, for the command-line tests."""

import pytest

from tests.helpers import TINY_MODEL_ARGS, make_image_folder, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = make_image_folder(tmp_path_factory.mktemp("data"), per_class=10)
    out = tmp_path_factory.mktemp("run")
    result = run_cli("run.py", "--data-path", str(data), "--output-dir", str(out), "--epochs", "2",
                     "--batch-size", "8", *TINY_MODEL_ARGS, "--no-progress")
    assert result.returncode == 0, result.stderr
    return data, out
