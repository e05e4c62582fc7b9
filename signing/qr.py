"""QR images of codes, with segno, in alphanumeric mode.

Codes use only alphanumeric-mode characters, so the symbol is about a third smaller than in
byte mode: a venue code fits version 4 at level M and prints small and scans fast.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Final, Literal

import segno

ERROR_LEVEL: Final = "M"
ImageFormat = Literal["svg", "png"]


def make_qr(code: str) -> Any:
    """The segno QR symbol of a code (alphanumeric mode, level M, no level boost)."""
    return segno.make_qr(code, error=ERROR_LEVEL, mode="alphanumeric", boost_error=False)


def render(code: str, fmt: ImageFormat, scale: int = 8, border: int = 4) -> bytes:
    """The code as an SVG or PNG image."""
    out = io.BytesIO()
    make_qr(code).save(out, kind=fmt, scale=scale, border=border)
    return out.getvalue()


def render_to_file(code: str, path: Path, scale: int = 8) -> None:
    """Write the code's image; the format follows the file's suffix (.svg or .png)."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("svg", "png"):
        raise ValueError(f"{path.name}: the output must end in .svg or .png")
    fmt: ImageFormat = "svg" if suffix == "svg" else "png"
    path.write_bytes(render(code, fmt, scale=scale))
