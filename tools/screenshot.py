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

__all__ = ["find_browser", "screenshot", "png_distinct_rows"]

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, _BROWSERS) if p), None)


def screenshot(page: Path, png: Path, *, width: int = 1100, height: int = 1300, timeout_s: float = 60) -> None:
    browser = find_browser()
    if browser is None:
        raise NeuroFluxError("no Chromium found; install it (apt-get install chromium) to take screenshots")
    with tempfile.TemporaryDirectory() as profile:
        # The flags keep Chromium off the network (no updates, no sync).
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={width},{height}",
               f"--screenshot={Path(png).resolve()}", Path(page).resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not Path(png).is_file():
        raise NeuroFluxError(f"Chromium failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}")


def png_distinct_rows(png: Path) -> int:
    """Number of distinct pixel rows of an 8-bit PNG (1 means a blank page)."""
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
    rows, prev = set(), bytearray(stride)
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
        rows.add(bytes(line))
        prev = line
    return len(rows)


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
