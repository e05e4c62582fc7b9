"""The wheel holds the whole product. The tests run an editable install, which reads the
source tree, while the Dockerfile installs the built wheel: a subpackage, template, static
file or font the wheel left out would only fail in a container."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "signing", "storage")
# Files the product reads at run time besides its modules.
DATA_SUFFIXES = (".html", ".css", ".js", ".json", ".svg", ".ttf", ".otf", ".txt", ".typed")


def shipped_sources() -> set[str]:
    """Every module and data file of the three packages, as wheel paths."""
    found: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.suffix == ".py" or path.name == "py.typed" or path.suffix in DATA_SUFFIXES:
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_the_wheel_holds_every_subpackage_template_static_file_and_font(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("scangate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        inside = set(archive.namelist())
        (metadata,) = [p for p in inside if p.endswith(".dist-info/METADATA")]
        headers = archive.read(metadata).decode()
    # The license, as PEP 639 puts it: an SPDX expression and the file itself.
    assert "License-Expression: MIT" in headers
    assert any(p.endswith(".dist-info/licenses/LICENSE") for p in inside)
    expected = shipped_sources()
    # The check is only as good as what it expects: the web pages and the fonts.
    assert any(p.startswith("gateway/http/web/templates/") for p in expected)
    assert any(p.startswith("signing/fonts/") for p in expected)
    assert any(p.startswith("gateway/pipeline/") for p in expected)
    assert sorted(expected - inside) == []
    assert not [p for p in inside if p.startswith("tests/")]
