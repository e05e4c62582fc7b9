"""Printable A4 posters of venue codes: SVG, PNG (150 dpi) and PDF (300 dpi).

One layout, computed in pixels at the output's resolution with the bundled DejaVu Sans
metrics, is painted by every format, so what fits on the PNG fits on the PDF and the SVG.
Text shrinks, then wraps, then (last resort) ends in an ellipsis: it never leaves the page.
"""

from __future__ import annotations

import functools
import io
import math
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass
from importlib import resources
from typing import Final, Literal
from xml.sax.saxutils import escape

from PIL import Image, ImageDraw, ImageFont

from .codes import parse_code
from .qr import make_qr

PosterFormat = Literal["svg", "png", "pdf"]
Align = Literal["left", "center"]

PAGE_WIDTH_MM: Final = 210.0
PAGE_HEIGHT_MM: Final = 297.0
MARGIN_MM: Final = 10.0
# Lines are wrapped this much short of the margins: centring rounds, and ink can overhang.
WRAP_SLACK_MM: Final = 1.0
SMALLEST_TEXT_MM: Final = 2.5  # em size, about 7 pt
# The dark-module area alone (the symbol without its quiet zone) is at least 15 cm wide; the
# 4-module quiet zone comes on top of that (about 19 cm in all).
QR_MIN_WIDTH_MM: Final = 150.0
QUIET_ZONE_MODULES: Final = 4
PNG_DPI: Final = 150
PDF_DPI: Final = 300
# The SVG is laid out at 254 dpi, where a pixel is exactly 0.1 mm.
SVG_DPI: Final = 254
_DPI: Final[dict[str, int]] = {"svg": SVG_DPI, "png": PNG_DPI, "pdf": PDF_DPI}
MAX_VENUE_NAME_CHARS: Final = 120
MAX_ADDRESS_CHARS: Final = 200
MAX_APP_NAME_CHARS: Final = 40
MAX_PROVINCE_CHARS: Final = 64

TITLE: Final = "KHAI BÁO Y TẾ — QUÉT MÃ QR"
SVG_FONT_FAMILY: Final = "DejaVu Sans, Arial, sans-serif"
_FONT_FILES: Final = {False: "DejaVuSans.ttf", True: "DejaVuSans-Bold.ttf"}
# The tallest Vietnamese capitals (stacked marks) and the deepest descenders: line spacing
# measured on these keeps a line's ink off its neighbours.
_PROBE: Final = "ẤẦẨẪẬỀỂỄỆỖỠỮỸ gjpqyọụ"
_ELLIPSIS: Final = "…"
_ANCHORS: Final[dict[Align, str]] = {"left": "ls", "center": "ms"}  # Pillow's text anchors


@dataclass(frozen=True, slots=True)
class TextLine:
    """One line of text, anchored at ``x`` (its left edge or its centre) on its baseline."""

    text: str
    bold: bool
    size_px: int
    x: int
    baseline: int
    align: Align
    box: tuple[int, int, int, int]  # the ink's left, top, right, bottom, in page pixels


@dataclass(frozen=True, slots=True)
class PosterLayout:
    """Everything on the page, in pixels at ``dpi``; each format only paints it."""

    dpi: int
    width_px: int
    height_px: int
    margin_px: int
    qr_matrix: tuple[bytes, ...]  # rows of the symbol, 1 = dark, without the quiet zone
    module_px: int
    qr_origin: tuple[int, int]  # top-left corner of the symbol's first module
    lines: tuple[TextLine, ...]

    @property
    def qr_box(self) -> tuple[int, int, int, int]:
        """The symbol with its quiet zone, which no text may enter."""
        quiet = QUIET_ZONE_MODULES * self.module_px
        side = len(self.qr_matrix) * self.module_px
        x, y = self.qr_origin
        return (x - quiet, y - quiet, x + side + quiet, y + side + quiet)


@dataclass(frozen=True, slots=True)
class _Block:
    paragraphs: tuple[str, ...]
    _: KW_ONLY
    bold: bool
    size_mm: float
    min_size_mm: float
    max_lines: int  # per paragraph; more is cut with an ellipsis
    align: Align = "center"
    gap_after_mm: float = 0.0


@dataclass(frozen=True, slots=True)
class _SetBlock:
    block: _Block
    size_px: int
    paragraphs: tuple[tuple[str, ...], ...]
    fits: bool  # False when a paragraph had to be cut
    pitch_px: int
    ascent_px: int
    paragraph_gap_px: int
    gap_after_px: int

    @property
    def height_px(self) -> int:
        lines = sum(len(p) for p in self.paragraphs)
        return lines * self.pitch_px + (len(self.paragraphs) - 1) * self.paragraph_gap_px


def render_poster(
    code: str,
    *,
    venue_name: str,
    address: str,
    app_name: str,
    fmt: PosterFormat,
    province: str = "",
) -> bytes:
    """An A4 portrait poster of a venue code, to print and post at the entrance.

    Raises ``ValueError`` for a code that is not a venue code and for a name, address,
    province or app name that is empty (the address and province may be) or longer than
    the page has room for.
    """
    dpi = _DPI.get(fmt)
    if dpi is None:
        raise ValueError(f"unknown poster format {fmt!r}: use svg, png or pdf")
    layout = layout_poster(
        code, venue_name=venue_name, address=address, app_name=app_name, dpi=dpi, province=province
    )
    if fmt == "svg":
        return _svg(layout, venue_name)
    out = io.BytesIO()
    if fmt == "png":
        _paint(layout).save(out, "PNG", dpi=(dpi, dpi))
    else:
        # Black and white: a printer prints it so anyway, and Group 4 (Pillow's wheels have
        # libtiff) keeps the module edges exact where JPEG, its choice for grey, blurs them.
        page = _paint(layout).convert("1", dither=Image.Dither.NONE)
        # Dated by the code's issue time, not by the render: the same code gives the same
        # file.
        parsed = parse_code(code)
        assert parsed is not None  # layout_poster refuses what is not a venue code
        issued = time.gmtime(parsed.issued_at)  # Pillow writes a struct_time as a PDF date
        page.save(
            out,
            "PDF",
            resolution=float(dpi),
            title=f"{TITLE}: {_clean(venue_name)}",
            creationDate=issued,
            modDate=issued,
        )
    return out.getvalue()


def layout_poster(
    code: str, *, venue_name: str, address: str, app_name: str, dpi: int, province: str = ""
) -> PosterLayout:
    """Where every line and the QR symbol go on an A4 page at ``dpi``.

    Public so that tests can check that no text leaves the page or enters the quiet zone.
    """
    parsed = parse_code(code)
    if parsed is None or parsed.type != "venue":
        raise ValueError("a poster needs a venue code")
    name, addr, app = _clean(venue_name), _clean(address), _clean(app_name)
    _check_length("venue name", name, MAX_VENUE_NAME_CHARS)
    _check_length("app name", app, MAX_APP_NAME_CHARS)
    if len(addr) > MAX_ADDRESS_CHARS:
        raise ValueError(f"address: at most {MAX_ADDRESS_CHARS} characters")
    prov = _clean(province)
    if len(prov) > MAX_PROVINCE_CHARS:
        raise ValueError(f"province: at most {MAX_PROVINCE_CHARS} characters")

    width, height, margin = _px(PAGE_WIDTH_MM, dpi), _px(PAGE_HEIGHT_MM, dpi), _px(MARGIN_MM, dpi)
    matrix = tuple(bytes(row) for row in make_qr(code).matrix)
    modules = len(matrix)
    module_px = math.ceil(QR_MIN_WIDTH_MM / 25.4 * dpi / modules)
    qr_outer = (modules + 2 * QUIET_ZONE_MODULES) * module_px

    header = [
        _Block((TITLE,), bold=True, size_mm=9.0, min_size_mm=7.0, max_lines=2, gap_after_mm=4),
        _Block((name,), bold=True, size_mm=12.0, min_size_mm=6.0, max_lines=3, gap_after_mm=2),
    ]
    # Where the venue is, as people would say it: the address, then its province.
    place = tuple(part for part in (addr, prov) if part)
    if place:
        header.append(_Block(place, bold=False, size_mm=5.5, min_size_mm=3.8, max_lines=4))
    app_line = f"Dùng ứng dụng {app} để quét"
    steps = (
        f"1. Mở ứng dụng {app} và quét mã khi VÀO (check-in).",
        "2. Quét lại mã này khi RA (check-out).",
        "3. Không có điện thoại thông minh? Báo nhân viên tại cửa để khai báo bằng "
        "số điện thoại hoặc CCCD.",
    )
    footer = [
        _Block((app_line,), bold=True, size_mm=6.5, min_size_mm=4.5, max_lines=2, gap_after_mm=2.5),
        _Block(steps, bold=False, size_mm=4.5, min_size_mm=3.2, max_lines=2, align="left"),
    ]
    text_width = width - 2 * margin - 2 * _px(WRAP_SLACK_MM, dpi)
    room = height - 2 * margin - qr_outer
    blocks = _fit(header + footer, text_width, room, dpi)
    set_header, set_footer = blocks[: len(header)], blocks[len(header) :]

    # Header from the top margin, footer down to the bottom margin, the QR symbol centred
    # in the space between them.
    lines: list[TextLine] = []
    header_bottom = _place(set_header, margin, width, lines)
    footer_height = _stack_height(set_footer)
    footer_top = height - margin - footer_height
    _place(set_footer, footer_top, width, lines)
    spare = footer_top - header_bottom - qr_outer
    quiet = QUIET_ZONE_MODULES * module_px
    qr_origin = ((width - modules * module_px) // 2, header_bottom + spare // 2 + quiet)
    return PosterLayout(dpi, width, height, margin, matrix, module_px, qr_origin, tuple(lines))


def _fit(blocks: list[_Block], width: int, room: int, dpi: int) -> list[_SetBlock]:
    """Shrink each block until its paragraphs fit their line limits, then shrink the block
    furthest above its minimum, step by step, until all of them fit the room; if they are
    all at their minimum, lower every minimum, down to the smallest size worth printing."""
    sizes = [_px(b.size_mm, dpi) for b in blocks]
    floors = [_px(b.min_size_mm, dpi) for b in blocks]
    smallest = _px(SMALLEST_TEXT_MM, dpi)
    set_blocks = [_set(b, s, width, dpi) for b, s in zip(blocks, sizes, strict=True)]
    for i, block in enumerate(blocks):
        while not set_blocks[i].fits and sizes[i] > floors[i]:
            sizes[i] = max(floors[i], int(sizes[i] * 0.95))
            set_blocks[i] = _set(block, sizes[i], width, dpi)
    while _stack_height(set_blocks) > room:
        shrinkable = [i for i in range(len(blocks)) if sizes[i] > floors[i]]
        if not shrinkable:
            if all(f <= smallest for f in floors):
                # Unreachable within the length limits: a venue code's symbol leaves room
                # for every line a block may have at the smallest size.
                raise ValueError("the poster's text does not fit on the page")
            floors = [max(smallest, int(f * 0.9)) for f in floors]
            continue
        i = max(shrinkable, key=lambda j: sizes[j] / floors[j])
        sizes[i] = max(floors[i], int(sizes[i] * 0.95))
        set_blocks[i] = _set(blocks[i], sizes[i], width, dpi)
    return set_blocks


def _set(block: _Block, size_px: int, width: int, dpi: int) -> _SetBlock:
    font = _font(block.bold, size_px)
    paragraphs: list[tuple[str, ...]] = []
    fits = True
    for text in block.paragraphs:
        lines = _wrap(text, font, width)
        if len(lines) > block.max_lines:
            fits = False
            lines = _cut(lines, block.max_lines, font, width)
        paragraphs.append(tuple(lines))
    _, top, _, bottom = font.getbbox(_PROBE, anchor="ls")
    ascent, descent = -int(top), int(bottom)
    return _SetBlock(
        block=block,
        size_px=size_px,
        paragraphs=tuple(paragraphs),
        fits=fits,
        pitch_px=ascent + descent + round(size_px * 0.1),
        ascent_px=ascent,
        paragraph_gap_px=round(size_px * 0.3),
        gap_after_px=_px(block.gap_after_mm, dpi),
    )


def _stack_height(blocks: list[_SetBlock]) -> int:
    return sum(b.height_px for b in blocks) + sum(b.gap_after_px for b in blocks[:-1])


def _place(blocks: list[_SetBlock], top: int, page_width: int, out: list[TextLine]) -> int:
    """Append the blocks' lines from ``top`` down; the bottom of the last block."""
    y = top
    for n, sb in enumerate(blocks):
        font = _font(sb.block.bold, sb.size_px)
        # A left-aligned block is centred as a whole: its longest line sets its left edge.
        widest = max(font.getlength(line) for p in sb.paragraphs for line in p)
        for k, paragraph in enumerate(sb.paragraphs):
            if k:
                y += sb.paragraph_gap_px
            for line in paragraph:
                baseline = y + sb.ascent_px
                align = sb.block.align
                x = page_width // 2 if align == "center" else int((page_width - widest) // 2)
                left, ink_top, right, ink_bottom = font.getbbox(line, anchor=_ANCHORS[align])
                box = (
                    x + int(left),
                    baseline + int(ink_top),
                    x + int(right),
                    baseline + int(ink_bottom),
                )
                out.append(TextLine(line, sb.block.bold, sb.size_px, x, baseline, align, box))
                y += sb.pitch_px
        if n < len(blocks) - 1:
            y += sb.gap_after_px
    return y


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap; a word wider than the line is broken between characters."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for char in word:
            if current and font.getlength(current + char) > width:
                lines.append(current)
                current = ""
            current += char
    if current:
        lines.append(current)
    return lines


def _cut(lines: list[str], max_lines: int, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    rest = " ".join(lines[max_lines - 1 :])
    while rest and font.getlength(rest + _ELLIPSIS) > width:
        rest = rest[:-1]
    return [*lines[: max_lines - 1], rest.rstrip() + _ELLIPSIS]


def _clean(text: str) -> str:
    """NFC, so that every Vietnamese letter is one precomposed glyph of the font; control
    and format characters dropped (XML refuses most of them); runs of white space as one."""
    text = unicodedata.normalize("NFC", text)
    return " ".join("".join(c for c in text if unicodedata.category(c)[0] != "C").split())


def _check_length(what: str, text: str, limit: int) -> None:
    if not text:
        raise ValueError(f"{what}: must not be empty")
    if len(text) > limit:
        raise ValueError(f"{what}: at most {limit} characters")


def _px(mm: float, dpi: int) -> int:
    return round(mm / 25.4 * dpi)


@functools.lru_cache(maxsize=2)
def _font_data(bold: bool) -> bytes:
    return (resources.files("signing") / "fonts" / _FONT_FILES[bold]).read_bytes()


@functools.lru_cache(maxsize=256)
def _font(bold: bool, size_px: int) -> ImageFont.FreeTypeFont:
    # Basic layout: the same metrics with or without libraqm, and NFC Vietnamese needs no
    # shaping.
    return ImageFont.truetype(
        io.BytesIO(_font_data(bold)), size_px, layout_engine=ImageFont.Layout.BASIC
    )


def _dark_runs(matrix: tuple[bytes, ...]) -> Iterator[tuple[int, int, int]]:
    """(row, first column, length) of every horizontal run of dark modules."""
    for row, modules in enumerate(matrix):
        col = 0
        while col < len(modules):
            if modules[col]:
                start = col
                while col < len(modules) and modules[col]:
                    col += 1
                yield row, start, col - start
            else:
                col += 1


def _paint(layout: PosterLayout) -> Image.Image:
    page = Image.new("L", (layout.width_px, layout.height_px), 255)
    draw = ImageDraw.Draw(page)
    m = layout.module_px
    x0, y0 = layout.qr_origin
    for row, col, run in _dark_runs(layout.qr_matrix):
        x, y = x0 + col * m, y0 + row * m
        draw.rectangle((x, y, x + run * m - 1, y + m - 1), fill=0)
    for line in layout.lines:
        font = _font(line.bold, line.size_px)
        draw.text(
            (line.x, line.baseline), line.text, font=font, fill=0, anchor=_ANCHORS[line.align]
        )
    return page


def _svg(layout: PosterLayout, venue_name: str) -> bytes:
    # At SVG_DPI a pixel is 0.1 mm, so every coordinate is a whole number of tenths.
    def mm(px: int) -> str:
        return f"{px / 10:.1f}".removesuffix(".0")

    m = layout.module_px
    x0, y0 = layout.qr_origin
    path = "".join(
        f"M{mm(x0 + col * m)} {mm(y0 + row * m)}h{mm(run * m)}v{mm(m)}h-{mm(run * m)}z"
        for row, col, run in _dark_runs(layout.qr_matrix)
    )
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        '<svg xmlns="http://www.w3.org/2000/svg" xml:lang="vi" width="210mm" height="297mm"',
        f' viewBox="0 0 {mm(layout.width_px)} {mm(layout.height_px)}"',
        f' font-family="{SVG_FONT_FAMILY}">\n',
        f"<title>{escape(TITLE)}: {escape(_clean(venue_name))}</title>\n",
        f'<rect width="{mm(layout.width_px)}" height="{mm(layout.height_px)}" fill="#fff"/>\n',
        f'<path fill="#000" shape-rendering="crispEdges" d="{path}"/>\n',
    ]
    for line in layout.lines:
        weight = ' font-weight="bold"' if line.bold else ""
        anchor = "middle" if line.align == "center" else "start"
        parts.append(
            f'<text x="{mm(line.x)}" y="{mm(line.baseline)}" font-size="{mm(line.size_px)}"'
            f'{weight} text-anchor="{anchor}">{escape(line.text)}</text>\n'
        )
    parts.append("</svg>\n")
    return "".join(parts).encode()
