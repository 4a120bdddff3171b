"""Screenshot an nf-graph HTML page in headless Chromium and check it is not blank.

    python -m neuroflux.tools.screenshot plan.html plan.png

Needs Debian's ``chromium`` (``apt-get install chromium``) or Chrome on PATH.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from neuroflux.errors import NeuroFluxError

__all__ = ["find_browser", "screenshot", "dump_dom", "png_distinct_rows", "png_rows", "color_bands", "tallest_column"]

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, _BROWSERS) if p), None)


def screenshot(page: Path, png: Path, *, width: int = 1100, height: int = 1300, timeout_s: float = 60) -> None:
    browser = find_browser()
    if browser is None:
        raise NeuroFluxError("no Chromium found; install it (apt-get install chromium) to take screenshots")
    with tempfile.TemporaryDirectory() as profile:
        # The flags keep Chromium off the network (no updates, no sync).
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--screenshot={Path(png).resolve()}",
            Path(page).resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not Path(png).is_file():
        raise NeuroFluxError(f"Chromium failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}")


def dump_dom(page: Path, *, timeout_s: float = 60) -> str:
    """The page's DOM as Chromium parsed and laid it out (``--dump-dom``)."""
    browser = find_browser()
    if browser is None:
        raise NeuroFluxError("no Chromium found; install it (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--dump-dom",
            Path(page).resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise NeuroFluxError(f"Chromium failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def png_distinct_rows(png: Path) -> int:
    """Number of distinct pixel rows of an 8-bit PNG (1 means a blank page)."""
    return len(set(png_rows(png)[2]))


def color_bands(png: Path, rgb: tuple[int, int, int], *, tol: int = 12, min_pixels: int = 3) -> list[tuple[int, int]]:
    """Runs of consecutive pixel rows with at least ``min_pixels`` pixels of
    colour ``rgb`` (each channel within ``tol``), as (first row, last row):
    what an eye sees as separate horizontal bars of that colour."""
    width, channels, rows = png_rows(png)
    bands: list[tuple[int, int]] = []
    for y, line in enumerate(rows):
        hits = sum(
            1 for x in range(0, width * channels, channels) if all(abs(line[x + c] - rgb[c]) <= tol for c in range(3))
        )
        if hits >= min_pixels:
            if bands and bands[-1][1] == y - 1:
                bands[-1] = (bands[-1][0], y)
            else:
                bands.append((y, y))
    return bands


def tallest_column(png: Path, rgb: tuple[int, int, int], *, tol: int = 12) -> int:
    """Most pixels of colour ``rgb`` in one pixel column (a vertical line's length, gaps included)."""
    width, channels, rows = png_rows(png)
    counts = [0] * width
    for line in rows:
        for i, x in enumerate(range(0, width * channels, channels)):
            if all(abs(line[x + c] - rgb[c]) <= tol for c in range(3)):
                counts[i] += 1
    return max(counts, default=0)


def png_rows(png: Path) -> tuple[int, int, list[bytes]]:
    """(width, channels, pixel rows) of an 8-bit PNG."""
    data = Path(png).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{png} is not a PNG")
    pos, idat, width = 8, b"", 0
    channels = 4
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, _, depth, color = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8, "only 8-bit PNGs"
            channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, prev = [], bytearray(stride)
    for i in range(0, len(raw), stride + 1):
        f, line = raw[i], bytearray(raw[i + 1 : i + 1 + stride])
        for x in range(stride):  # undo PNG filters
            a = line[x - channels] if x >= channels else 0
            b, c = prev[x], prev[x - channels] if x >= channels else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, channels, rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m neuroflux.tools.screenshot PAGE.html OUT.png", file=sys.stderr)
        return 2
    try:
        screenshot(Path(args[0]), Path(args[1]))
    except NeuroFluxError as e:
        print(f"screenshot: error: {e}", file=sys.stderr)
        return 2
    rows = png_distinct_rows(Path(args[1]))
    print(f"wrote {args[1]} ({rows} distinct pixel rows{', BLANK' if rows <= 1 else ''})")
    return 0 if rows > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
