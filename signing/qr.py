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


def render_print(code: str, fmt: ImageFormat, width_mm: float, dpi: int = 300) -> bytes:
    """The code as an image that prints ``width_mm`` wide, quiet zone included: an SVG in
    millimetres, or a PNG whose DPI metadata makes it that wide."""
    qr = make_qr(code)
    modules = qr.symbol_size(scale=1, border=4)[0]
    out = io.BytesIO()
    if fmt == "svg":
        qr.save(out, kind="svg", scale=width_mm / modules, unit="mm", border=4)
    else:
        # Whole pixels per module (a sharp image); the DPI carries the exact print size.
        scale = max(1, round(width_mm / 25.4 * dpi / modules))
        exact_dpi = round(modules * scale / (width_mm / 25.4))
        qr.save(out, kind="png", scale=scale, border=4, dpi=exact_dpi)
    return out.getvalue()
