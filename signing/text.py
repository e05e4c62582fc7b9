"""What free text may hold, wherever it comes in: names of venues, apps and people,
addresses, notes.

Refused: control characters (Cc), invisible formatting characters (Cf: a right-to-left
override turns a poster's text around), private-use code points (Co), lone surrogates (Cs)
and code points Unicode has not assigned (Cn). None of them can be printed on a poster
or shown to an official as what was meant, and an unassigned one may be assigned later
to anything.
"""

from __future__ import annotations

import unicodedata
from typing import Final

REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cn", "Co", "Cs"})


def has_unprintable(text: str) -> bool:
    """True when ``text`` holds a character of ``REFUSED_CATEGORIES``."""
    return any(unicodedata.category(c) in REFUSED_CATEGORIES for c in text)
