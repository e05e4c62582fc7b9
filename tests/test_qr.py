"""QR rendering: alphanumeric mode, version 4-M for venue codes, and a real decoder reads it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image

from signing import CodeVerifier, make_qr, render, render_to_file

NOW = 1_790_000_000


def longest_venue_code() -> str:
    return CodeVerifier("app", "P" * 16, {0xFFFF: bytes(32)}, 0xFFFF).issue("venue", "Z" * 16, NOW)


def test_longest_venue_code_renders_at_version_4_or_lower_level_m() -> None:
    qr = make_qr(longest_venue_code())
    assert qr.version <= 4
    assert qr.error == "M"
    assert qr.mode == "alphanumeric"


def test_png_decodes_back_to_the_code_and_svg_is_svg(tmp_path: Path) -> None:
    code = longest_venue_code()
    png = render(code, "png", scale=4)
    results = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)).convert("L"))
    assert [r.text for r in results] == [code]
    render_to_file(code, tmp_path / "c.svg")
    assert (tmp_path / "c.svg").read_bytes().lstrip().startswith((b"<?xml", b"<svg"))


def test_render_refuses_unknown_formats(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.svg or \.png"):
        render_to_file(longest_venue_code(), tmp_path / "c.jpg")
