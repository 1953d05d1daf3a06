"""report.html in a real browser (headless Chromium, no network): every image decodes, and a
screenshot of the page is not blank. Skipped, with the reason, when no Chromium is installed."""

import html
import json
import re
import shutil
import subprocess

import pytest

from bvvit.report import write_report
from test_plots import make_summary  # noqa: E402  (tests/report is on sys.path)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium/Chrome on PATH (Debian: apt-get "
                                                        "install chromium) to load report.html in")

# Runs after every image has loaded or failed (window 'load'), writes the result into the DOM.
IMAGE_CHECK = """<script>
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var result = {total: images.length,
                broken: images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                              .map(function (i) { return i.alt; }),
                widths: images.map(function (i) { return i.naturalWidth; })};
  var pre = document.createElement('pre');
  pre.id = 'bvvit-image-check';
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(*args, user_data_dir):
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={user_data_dir}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, write_report(out, make_summary(), None)


def test_every_image_loads_in_chromium(report, tmp_path):
    out, path = report
    page = path.read_text()
    check = out / "image_check.html"  # beside report.html, so relative sources would resolve too
    check.write_text(page.replace("</body>", IMAGE_CHECK + "</body>"))
    result = _chromium("--virtual-time-budget=10000", "--dump-dom", check.as_uri(),
                       user_data_dir=tmp_path / "profile")
    found = re.search(r'<pre id="bvvit-image-check">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the check script did not run; chromium said: {result.stderr[-800:]}"
    images = json.loads(html.unescape(found.group(1)))
    expected = page.count("<img ")
    assert images["total"] == expected and expected >= 8
    assert images["broken"] == []
    assert all(width >= 400 for width in images["widths"])


def test_screenshot_of_the_report_is_not_blank(report, tmp_path):
    from PIL import Image

    _, path = report
    shot = tmp_path / "report.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1280,2200", path.as_uri(),
                       user_data_dir=tmp_path / "profile")
    assert shot.is_file(), f"no screenshot; chromium said: {result.stderr[-800:]}"
    with Image.open(shot) as image:
        assert image.size == (1280, 2200)
        colours = image.convert("RGB").resize((320, 550)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 200  # text, tables and figures, not an empty page
