"""The HTML report, opened in headless Chromium: it renders, its SVG charts have size, and it shows the SRM flag."""

from __future__ import annotations

import html
import json
import re
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.synthetic_rows import monitoring_rows, write_jsonl
from worker.cli import main
from worker.cli.common import ExitStatus

CHROMIUM = Path("/usr/bin/chromium")
WIDTH, HEIGHT = 1280, 2000
#: The fill of a flagged experiment's share bars (worker.cli.render.html), drawn as solid rectangles.
FLAG_RED = (0xCF, 0x22, 0x2E)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="headless Chromium is not installed (/usr/bin/chromium): apt-get install -y chromium",
    ),
]

# Added to a copy of the page only: the report itself carries no script. It runs at the end of
# parsing, forces layout and writes each SVG shape's rendered size into the DOM that --dump-dom prints.
PROBE = """<script>
const sizes = [...document.querySelectorAll('svg')].map(svg => ({
  kind: svg.getAttribute('class'),
  width: svg.getBoundingClientRect().width,
  height: svg.getBoundingClientRect().height,
  shapes: [...svg.querySelectorAll('polyline, rect, circle')].map(s => {
    const box = s.getBBox(); return [s.tagName, box.width, box.height];
  }),
}));
const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(sizes);
document.body.appendChild(pre);
</script>"""


def chromium(profile: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with no network chatter, 20 s at most."""
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)  # a hang guard


def read_png(path: Path) -> np.ndarray[Any, Any]:
    """Decode an 8-bit RGB(A), non-interlaced PNG into a ``(height, width, channels)`` array (CRCs checked)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    position, idat, header = 8, [], None
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r} chunk"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        position += 12 + length
    assert header is not None, "no IHDR chunk"
    width, height, depth, colour, _, _, interlace = header
    assert (depth, interlace) == (8, 0), f"unexpected PNG format {header}"
    assert colour in (2, 6), f"unexpected PNG colour type {header}"
    channels = 3 if colour == 2 else 4
    stride = width * channels
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(height, 1 + stride)
    pixels = np.zeros((height, stride), dtype=np.int32)
    previous = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        pixels[y] = previous = _unfilter(int(raw[y, 0]), raw[y, 1:].astype(np.int32), previous, channels)
    return pixels.reshape(height, width, channels)


def _unfilter(kind: int, line: np.ndarray[Any, Any], above: np.ndarray[Any, Any], bpp: int) -> np.ndarray[Any, Any]:
    if kind == 0:
        return line
    if kind == 1:  # Sub: a running sum per channel
        return np.asarray(line.reshape(-1, bpp).cumsum(axis=0) & 255).reshape(-1)
    if kind == 2:  # Up
        return np.asarray((line + above) & 255)
    current = line.copy()
    for x in range(len(current)):  # Average and Paeth depend on the byte just decoded: sequential
        left = int(current[x - bpp]) if x >= bpp else 0
        up = int(above[x])
        if kind == 3:
            current[x] = (current[x] + ((left + up) >> 1)) & 255
            continue
        corner = int(above[x - bpp]) if x >= bpp else 0
        estimate = left + up - corner
        pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
        predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
        current[x] = (current[x] + predictor) & 255
    return current


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML report of three experiments, ``exp_skewed`` 360/240 on a 50/50 split."""
    folder = tmp_path_factory.mktemp("report")
    rows = write_jsonl(folder / "rows.jsonl", monitoring_rows())
    page = folder / "report.html"
    assert main(["report", "--rows", str(rows), "--html", str(page)]) == ExitStatus.SRM
    return page


def test_screenshot_is_a_non_blank_png_of_the_window_size(report_html: Path, tmp_path: Path) -> None:
    """Chromium's screenshot is a valid 1280×2000 PNG with many colours, including the SRM red."""
    shot = tmp_path / "report.png"
    result = chromium(tmp_path / "profile", f"--screenshot={shot}", report_html.as_uri())
    assert shot.is_file(), f"no screenshot; chromium said:\n{result.stderr[-2000:]}"
    pixels = read_png(shot)
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    rgb = pixels[:, :, :3]
    packed = (rgb[:, :, 0] << 16) | (rgb[:, :, 1] << 8) | rgb[:, :, 2]
    assert len(np.unique(packed)) > 50, "the screenshot is (nearly) blank"
    red = (packed == (FLAG_RED[0] << 16 | FLAG_RED[1] << 8 | FLAG_RED[2])).sum()
    assert red > 500, "the flagged experiment's red share bars are not on screen"


def test_rendered_dom_has_sized_charts_and_the_srm_flag(report_html: Path, tmp_path: Path) -> None:
    """The rendered DOM has the SRM verdict for exp_skewed only, and every chart shape has a non-zero size."""
    page = report_html.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>")
    # The page's own policy forbids scripts; the probe copy drops it so the measuring script may run.
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    probe = tmp_path / "probe.html"
    probe.write_text(page, encoding="utf-8")
    result = chromium(tmp_path / "profile", "--dump-dom", probe.as_uri())
    dom = result.stdout
    assert 'id="srm-banner"' in dom, result.stderr[-2000:]
    verdicts = dict(re.findall(r'data-experiment="([^"]+)" data-verdict="([^"]+)"', dom))
    assert verdicts["exp_skewed"].startswith("SRM! p=9.6e-07")
    assert verdicts["exp_balanced"] == "OK"
    assert verdicts["exp_tone"] == "OK"
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert match, "the probe script did not run"
    charts = json.loads(html.unescape(match.group(1)))
    kinds = [chart["kind"] for chart in charts]
    assert kinds.count("timeseries") == 3
    assert kinds.count("shares") == 3
    for chart in charts:
        assert chart["width"] > 0, chart["kind"]
        assert chart["height"] > 0, chart["kind"]
        assert chart["shapes"], f"{chart['kind']} chart has no shapes"
        for tag, width, height in chart["shapes"]:
            # A polyline is a line: a flat one has zero height but must have width.
            assert width > 0, (chart["kind"], tag)
            assert height > 0 or tag == "polyline", (chart["kind"], tag)


def test_a_report_of_one_hour_renders_a_sized_bar_per_variant(tmp_path: Path) -> None:
    """All rows in one hour (as `make run` writes them): every chart shape has a size; bars as tall as their counts."""
    rows = [row for row in monitoring_rows() if row["ExperimentId"] == "exp_skewed"]
    for row in rows:
        row["AssignedAt"] = "2025-11-23T09:30:00Z"
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    page = tmp_path / "report.html"
    assert main(["report", "--rows", str(source), "--html", str(page)]) == ExitStatus.SRM
    probe = tmp_path / "probe.html"
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text(encoding="utf-8"))
    probe.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = chromium(tmp_path / "profile", "--dump-dom", probe.as_uri())
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.DOTALL)
    assert match, f"the probe script did not run: {result.stderr[-2000:]}"
    (chart,) = [chart for chart in json.loads(html.unescape(match.group(1))) if chart["kind"] == "timeseries"]
    assert chart["shapes"], "the hourly chart has nothing drawn"
    for tag, width, height in chart["shapes"]:
        assert width > 0, f"a {tag} of {width}×{height} is invisible"
        assert height > 0, f"a {tag} of {width}×{height} is invisible"
    heights = [height for tag, _, height in chart["shapes"] if tag == "rect"]
    assert len(heights) == 2
    assert heights[1] / heights[0] == pytest.approx(240 / 360, rel=0.02), "exp_skewed: A 360, B 240"
