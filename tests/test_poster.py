"""Venue posters: A4 in every format, a QR at least 15 cm wide that a real decoder reads,
Vietnamese text that stays on the page however long the venue's name and address are."""

from __future__ import annotations

import io
import itertools
import re
import xml.etree.ElementTree as ET
from importlib import resources

import pytest
import zxingcpp
from PIL import Image, ImageFont

from signing import CodeVerifier, Keyring
from signing.poster import (
    PNG_DPI,
    SVG_DPI,
    PosterFormat,
    PosterLayout,
    layout_poster,
    render_poster,
)

NOW = 1_790_000_000
SVG_NS = "{http://www.w3.org/2000/svg}"
HOSTILE_NAME = 'Quán "Phở" <Hà Nội> & Co'
ADDRESS = "12 Lý Thái Tổ, phường Hoàn Kiếm, Hà Nội"
# 120 and 200 characters, with the stacked marks that reach highest above a capital.
LONG_NAME = (
    "NHÀ HÀNG ẨM THỰC ĐẶC SẢN MIỀN TRUNG — Bánh Xèo, Bún Bò Huế, Mì Quảng, Cao Lầu Hội An "
    "và Ốc Hương Nướng Mỡ Hành Ngọt Thơm Ấm Áp"
)[:120]
LONG_ADDRESS = (
    "Tầng trệt, tòa nhà Thương mại Dịch vụ Tổng hợp Số 9, lô B12, khu đô thị mới Nghĩa Đô, "
    "số 123 ngõ 45 phố Hoàng Quốc Việt, phường Nghĩa Đô, quận Cầu Giấy, thành phố Hà Nội, "
    "Việt Nam; lối vào phía sau bãi giữ xe"
)[:200]


@pytest.fixture
def venue_code(keyring: Keyring) -> str:
    keyring.add_app("vhd")
    return keyring.issue("vhd", "venue", "SHOP42", now_s=NOW)


def longest_venue_code() -> str:
    return CodeVerifier("app", "P" * 16, {0xFFFF: bytes(32)}, 0xFFFF).issue("venue", "Z" * 16, NOW)


def poster(code: str, fmt: PosterFormat, name: str = HOSTILE_NAME, address: str = ADDRESS) -> bytes:
    return render_poster(code, venue_name=name, address=address, app_name="PC-Covid", fmt=fmt)


def decode_png(png: bytes) -> tuple[str, float]:
    """The decoded text and the symbol's printed width in cm."""
    image = Image.open(io.BytesIO(png))
    results = zxingcpp.read_barcodes(image)
    assert len(results) == 1
    pos = results[0].position
    xs = [p.x for p in (pos.top_left, pos.top_right, pos.bottom_left, pos.bottom_right)]
    return results[0].text, (max(xs) - min(xs)) / PNG_DPI * 2.54


def assert_text_stays_clear(layout: PosterLayout) -> None:
    """Every line's ink inside the margins, out of the QR's quiet zone, off the next line."""
    lo, hi_x, hi_y = layout.margin_px, layout.width_px - layout.margin_px, layout.height_px
    qr_left, qr_top, qr_right, qr_bottom = layout.qr_box
    assert qr_left >= 0 and qr_right <= layout.width_px
    for line in layout.lines:
        left, top, right, bottom = line.box
        assert lo <= left and right <= hi_x and lo <= top and bottom <= hi_y - lo, line
        assert bottom <= qr_top or top >= qr_bottom, line
    boxes = sorted((line.box for line in layout.lines), key=lambda box: box[1])
    for upper, lower in itertools.pairwise(boxes):
        assert upper[3] <= lower[1], (upper, lower)


@pytest.mark.parametrize(
    ("fmt", "magic"), [("svg", (b"<?xml", b"<svg")), ("png", (b"\x89PNG",)), ("pdf", (b"%PDF",))]
)
def test_every_format_starts_with_its_magic(
    venue_code: str, fmt: PosterFormat, magic: tuple[bytes, ...]
) -> None:
    assert poster(venue_code, fmt).startswith(magic)


@pytest.mark.parametrize("version", [3, 4])
def test_png_is_a4_at_150_dpi_and_its_qr_decodes_at_15_cm_or_more(
    venue_code: str, version: int
) -> None:
    code = venue_code if version == 3 else longest_venue_code()
    png = poster(code, "png")
    image = Image.open(io.BytesIO(png))
    assert image.size == (1240, 1754)
    assert tuple(round(d) for d in image.info["dpi"]) == (150, 150)
    text, width_cm = decode_png(png)
    assert text == code
    assert width_cm >= 15.0


def test_pdf_is_one_a4_page(venue_code: str) -> None:
    pdf = poster(venue_code, "pdf")
    boxes = re.findall(rb"/MediaBox\s*\[\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*\]", pdf)
    assert len(boxes) == 1
    x0, y0, x1, y1 = (float(v) for v in boxes[0])
    assert (x0, y0) == (0, 0)
    assert x1 == pytest.approx(595.28, abs=1) and y1 == pytest.approx(841.89, abs=1)


def test_svg_is_a4_in_mm_with_escaped_text_and_a_qr_path_of_15_cm(venue_code: str) -> None:
    root = ET.fromstring(poster(venue_code, "svg"))  # noqa: S314 (our own output)
    assert root.tag == f"{SVG_NS}svg"
    assert (root.get("width"), root.get("height"), root.get("viewBox")) == (
        "210mm",
        "297mm",
        "0 0 210 297",
    )
    assert "DejaVu Sans" in (root.get("font-family") or "")
    texts = [t.text for t in root.iter(f"{SVG_NS}text")]
    assert HOSTILE_NAME in texts
    assert "Dùng ứng dụng PC-Covid để quét" in texts
    paths = list(root.iter(f"{SVG_NS}path"))
    assert len(paths) == 1
    runs = re.findall(r"M([\d.]+) ([\d.]+)h([\d.]+)v([\d.]+)", paths[0].get("d") or "")
    assert runs
    lefts = [float(x) for x, _, _, _ in runs]
    rights = [float(x) + float(w) for x, _, w, _ in runs]
    tops = [float(y) for _, y, _, _ in runs]
    bottoms = [float(y) + float(h) for _, y, _, h in runs]
    assert max(rights) - min(lefts) >= 150
    assert max(bottoms) - min(tops) >= 150


@pytest.mark.parametrize(
    ("name", "address"),
    [
        (LONG_NAME, LONG_ADDRESS),
        # No space to break at: the wrap breaks between characters, then cuts with "…".
        ("Ẫ" * 120, "Ỹ" * 200),
    ],
)
@pytest.mark.parametrize("version", [3, 4])
def test_long_names_and_addresses_stay_on_the_page(
    venue_code: str, name: str, address: str, version: int
) -> None:
    assert (len(LONG_NAME), len(LONG_ADDRESS)) == (120, 200)
    code = venue_code if version == 3 else longest_venue_code()
    for dpi in (PNG_DPI, 300, SVG_DPI):
        layout = layout_poster(code, venue_name=name, address=address, app_name="P" * 40, dpi=dpi)
        assert_text_stays_clear(layout)
    text, width_cm = decode_png(poster(code, "png", name, address))
    assert text == code
    assert width_cm >= 15.0


def test_decomposed_vietnamese_is_composed_and_controls_dropped(venue_code: str) -> None:
    decomposed = "Pho\u031b\u0309 Ha\u0300 No\u0323\u0302i\x00\x07\n\t  24h"
    layout = layout_poster(
        venue_code, venue_name=decomposed, address="", app_name="PC-Covid", dpi=PNG_DPI
    )
    assert "Phở Hà Nội 24h" in [line.text for line in layout.lines]


def test_bundled_fonts_have_every_vietnamese_letter() -> None:
    fonts = resources.files("signing") / "fonts"
    assert (fonts / "LICENSE-DejaVu.txt").is_file()
    letters = "ăâđêôơưáàảãạấầẩẫậắằẳẵặéèẻẽẹếềểễệíìỉĩịóòỏõọốồổỗộớờởỡợúùủũụứừửữựýỳỷỹỵ"
    for name in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"):
        font = ImageFont.truetype(io.BytesIO((fonts / name).read_bytes()), 40)
        missing = bytes(font.getmask("\U0010fffd"))  # a private-use point: the .notdef box
        for char in letters + letters.upper() + "—…":
            assert bytes(font.getmask(char)) != missing, (name, char)


def test_bad_inputs_are_refused(venue_code: str) -> None:
    person = CodeVerifier("app", "P", {1: bytes(32)}, 1).issue("person", "P1", NOW, NOW + 60)
    with pytest.raises(ValueError, match="venue code"):
        poster(person, "png")
    with pytest.raises(ValueError, match="venue code"):
        poster("NOT A CODE", "svg")
    with pytest.raises(ValueError, match="venue name: at most 120"):
        poster(venue_code, "png", name="A" * 121)
    with pytest.raises(ValueError, match="venue name: must not be empty"):
        poster(venue_code, "png", name=" \n\x00 ")
    with pytest.raises(ValueError, match="address: at most 200"):
        poster(venue_code, "png", address="A" * 201)
    with pytest.raises(ValueError, match="unknown poster format"):
        poster(venue_code, "jpg")  # type: ignore[arg-type]
