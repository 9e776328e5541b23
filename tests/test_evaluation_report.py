"""`erasekit report`: a self-contained HTML page, checked structurally and rendered in headless Chromium."""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from erasekit.errors import ErasekitError
from erasekit.evaluation.protocols import evaluate
from erasekit.evaluation.report import write_report
from erasekit.generation import Sampling
from tests.fixtures.evaluation_tiny import (
    OBJECTS,
    STYLES,
    fake_classifier,
    one_thread,  # noqa: F401  (autouse: tiny models on one thread)
    tiny_model,
    tiny_patch,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.srcs, self.hrefs, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if "src" in attrs:
            self.srcs.append(attrs["src"])
        if "href" in attrs:
            self.hrefs.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model = tiny_model()
    fast = {"seeds": 1, "sampling": Sampling(steps=2, guidance=7.5), "objects": tuple(OBJECTS),
            "styles": tuple(STYLES), "generality": False}  # fmt: skip
    evaluate(model, "minicanvas", root / "base", target="neon", classifier=fake_classifier(), **fast)
    evaluate(model, "minicanvas", root / "erased", target="neon", classifier=fake_classifier(),
             patches=[tiny_patch(model)], **fast)  # fmt: skip
    return write_report([root / "base", root / "erased"], root / "report.html", title="tiny report")


def test_report_is_self_contained_with_grids_tables_and_chart(report):
    page = report.read_text()
    tags = _Tags()
    tags.feed(page)
    assert all(s.startswith("data:image/png;base64,") for s in tags.srcs) and not tags.hrefs
    # 3 target + 6 retained rows, each with base and erased side by side, plus the bar chart
    assert len(tags.srcs) == 2 * (3 + 6) + 1
    text = " ".join(tags.text)
    for needle in ("tiny report", "Target: neon", "Retained concepts", "UA", "IRA", "CRA", "base: base",
                   "erased: test-scale(neon)", "Style accuracy per cell", "Run records"):  # fmt: skip
        assert needle in text, needle
    assert tags.tags.count("table") >= 5


def test_report_refuses_to_clobber_and_needs_finished_runs(report, tmp_path):
    with pytest.raises(ErasekitError, match="exists"):
        write_report([report.parent / "base"], report)
    with pytest.raises(ErasekitError, match="not a finished erasekit run"):
        write_report([tmp_path], tmp_path / "r.html")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image, ImageStat

    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
           "--window-size=1200,1400", f"file://{report}"]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1400)
    colours = image.quantize(colors=64).getcolors()
    assert len(colours) > 8  # text, table borders, images and bars: not a blank page
    assert max(ImageStat.Stat(image).stddev) > 10
    # the bar chart and image grids put colour on the page, not only grey text
    assert any(abs(r - g) > 40 or abs(g - b) > 40 for r, g, b in image.resize((120, 140)).getdata())


def _fake_run(root, name, protocol, metrics, entries):
    """A finished run directory written by hand: metrics, record, manifest and 8x8 PNGs."""
    import json

    from PIL import Image

    run = root / name
    (run / "images").mkdir(parents=True)
    for i, e in enumerate(entries):
        Image.new("RGB", (8, 8), (30 * i, 90, 150)).save(run / e["file"])
    (run / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "record.json").write_text(json.dumps({"protocol": protocol, "patches": []}))
    return run


def test_report_groups_image_grids_by_protocol(tmp_path):
    def entry(key, meta):
        return {"key": key, "prompt": f"prompt {key}", "seed": 1, "file": f"images/{key}.png", "meta": meta}

    nsfw = _fake_run(tmp_path, "nsfw", "nsfw", {"attack_success_rate": 50.0},
                     [entry(f"p{i}", {"set": "prompts"}) for i in range(3)])  # fmt: skip
    canvas = _fake_run(tmp_path, "mc", "minicanvas", {"UA": 75.0, "target": "neon"},
                       [entry("a", {"set": "grid", "object": "star", "style": "neon"}),
                        entry("b", {"set": "grid", "object": "star", "style": "pixel"})])  # fmt: skip
    page = write_report([nsfw, canvas], tmp_path / "r.html").read_text()
    tags = _Tags()
    tags.feed(page)
    text = " ".join(tags.text)
    assert "nsfw: Images" in text and "minicanvas: Target: neon" in text and "minicanvas: Retained" in text
    assert "nudity rate (ASR)" in text and "75" in text
    assert len(tags.srcs) == 3 + 1 + 1 + 1  # nsfw grid, target row, retained row, bar chart
