"""People and venues as the registration API receives them: validation and normalisation.

Pure functions, no I/O: a phone number in either Vietnamese form becomes one canonical
form (so ``0912…`` and ``+84912…`` are the same phone and the same blind index), a health
declaration becomes a checked ``Declaration``, the text of a chip ID card's QR becomes an
``IdCard``. Every refusal names the field (``InvalidField``) so a form can point at it.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Any, Final

from gateway.http.errors import InvalidField, InvalidPhone
from signing.text import has_unprintable
from storage.models import VENUE_KINDS

_PHONE_SEPARATORS: Final = re.compile(r"[\s.\-()]")
# Vietnamese mobile numbers: 03x, 05x, 07x, 08x, 09x and 8 more digits.
_LOCAL_MOBILE: Final = re.compile(r"0([35789][0-9]{8})")
_INTERNATIONAL_MOBILE: Final = re.compile(r"\+84([35789][0-9]{8})")
_CCCD: Final = re.compile(r"[0-9]{12}")  # citizen identity card (Căn cước công dân)
_CMND: Final = re.compile(r"[0-9]{9}")  # the older identity card (Chứng minh nhân dân)
_PASSPORT: Final = re.compile(r"(?=.*[A-Z])[A-Z0-9]{6,9}")
_INSURANCE: Final = re.compile(r"[A-Z0-9]{10}|[A-Z]{2}[0-9]{13}")
_ID_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # no I, L, O, U: read aloud safely
ANSWER_KEYS: Final = (
    "fever",
    "cough",
    "shortness_of_breath",
    "sore_throat",
    "loss_of_taste_or_smell",
    "contact_with_case",
    "visited_outbreak_area",
)
GENDERS: Final = ("male", "female", "other")
MAX_NAME_CHARS: Final = 100
MAX_VENUE_NAME_CHARS: Final = 120
MAX_ADDRESS_CHARS: Final = 200
MAX_PROVINCE_CHARS: Final = 64
MAX_RELATIONSHIP_CHARS: Final = 32


def normalise_phone(text: object, field: str = "phone") -> str:
    """A Vietnamese mobile number as ``+84`` and nine digits; InvalidPhone otherwise."""
    if not isinstance(text, str) or len(text) > 32:
        raise InvalidPhone(f"{field}: a Vietnamese mobile number, 0… or +84…")
    compact = _PHONE_SEPARATORS.sub("", text)
    m = _LOCAL_MOBILE.fullmatch(compact) or _INTERNATIONAL_MOBILE.fullmatch(compact)
    if m is None:
        raise InvalidPhone(
            f"{field}: a Vietnamese mobile number (03, 05, 07, 08 or 09 and 8 more digits, "
            "or +84 and 9 digits)"
        )
    return "+84" + m.group(1)


def normalise_name(name: str) -> str:
    """The form of a name used for its blind index: NFC, case-folded, single spaces."""
    return " ".join(unicodedata.normalize("NFC", name).casefold().split())


def new_id(prefix: str) -> str:
    """A random id for a person ("P") or a venue ("V"): 12 characters, 55 random bits."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(11))


def _text(doc: dict[str, Any], field: str, max_chars: int, *, required: bool = True) -> str:
    value = doc.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidField(field, "required, as text")
    cleaned = " ".join(unicodedata.normalize("NFC", value).split())
    if not cleaned:
        raise InvalidField(field, "must not be empty")
    if len(cleaned) > max_chars:
        raise InvalidField(field, f"at most {max_chars} characters")
    if has_unprintable(cleaned):
        raise InvalidField(field, "contains control, invisible or unassigned characters")
    return cleaned


def _person_name(doc: dict[str, Any], field: str = "full_name") -> str:
    name = _text(doc, field, MAX_NAME_CHARS)
    if not all(c.isalpha() or c in " .'-" for c in name):
        raise InvalidField(field, "letters, spaces and . ' - only")
    return name


def national_id(value: object, field: str = "national_id") -> str:
    """A 12-digit CCCD, a 9-digit CMND or a passport number, upper-cased."""
    if not isinstance(value, str):
        raise InvalidField(field, "required, as text")
    text = value.strip().upper()
    if _CCCD.fullmatch(text) or _CMND.fullmatch(text) or _PASSPORT.fullmatch(text):
        return text
    raise InvalidField(
        field, "a 12-digit citizen id (CCCD), a 9-digit id (CMND) or a passport number"
    )


@dataclass(frozen=True, slots=True)
class VenueForm:
    name: str
    phone: str  # normalised
    address: str
    province: str
    kind: str


def parse_venue(doc: object) -> VenueForm:
    if not isinstance(doc, dict):
        raise InvalidField("body", "a JSON object")
    kind = doc.get("kind", "other")
    if kind not in VENUE_KINDS:
        raise InvalidField("kind", f"one of {', '.join(VENUE_KINDS)}")
    return VenueForm(
        name=_text(doc, "name", MAX_VENUE_NAME_CHARS),
        phone=normalise_phone(doc.get("phone")),
        address=_text(doc, "address", MAX_ADDRESS_CHARS),
        province=_text(doc, "province", MAX_PROVINCE_CHARS),
        kind=str(kind),
    )


@dataclass(frozen=True, slots=True)
class Declaration:
    full_name: str
    national_id: str
    birth_year: int
    gender: str
    phone: str  # normalised
    address: str
    province: str
    health_insurance_no: str | None
    on_behalf: str | None
    answers: dict[str, bool]


def parse_declaration(doc: object, today: dt.date) -> Declaration:
    if not isinstance(doc, dict):
        raise InvalidField("body", "a JSON object")
    birth_year = doc.get("birth_year")
    if (
        not isinstance(birth_year, int)
        or isinstance(birth_year, bool)
        or not 1900 <= birth_year <= today.year
    ):
        raise InvalidField("birth_year", f"a year from 1900 to {today.year}")
    gender = doc.get("gender")
    if gender not in GENDERS:
        raise InvalidField("gender", "male, female or other")
    insurance = doc.get("health_insurance_no")
    if insurance is not None:
        if not isinstance(insurance, str) or not _INSURANCE.fullmatch(insurance.strip().upper()):
            raise InvalidField(
                "health_insurance_no", "10 characters, or 2 letters and 13 digits (BHYT)"
            )
        insurance = insurance.strip().upper()
    on_behalf = _text(doc, "on_behalf", MAX_RELATIONSHIP_CHARS, required=False) or None
    answers = doc.get("answers")
    if not isinstance(answers, dict):
        raise InvalidField("answers", f"an object with {', '.join(ANSWER_KEYS)}")
    unknown = sorted(set(answers) - set(ANSWER_KEYS))
    if unknown:
        # The unknown key is not echoed: a client may have put anything there.
        raise InvalidField("answers", f"only these questions: {', '.join(ANSWER_KEYS)}")
    for key in ANSWER_KEYS:
        if not isinstance(answers.get(key), bool):
            raise InvalidField(f"answers.{key}", "true or false")
    try:
        phone = normalise_phone(doc.get("phone"))
    except InvalidPhone as exc:
        raise InvalidField("phone", exc.detail.removeprefix("phone: ")) from None
    return Declaration(
        full_name=_person_name(doc),
        national_id=national_id(doc.get("national_id")),
        birth_year=birth_year,
        gender=str(gender),
        phone=phone,
        address=_text(doc, "address", MAX_ADDRESS_CHARS),
        province=_text(doc, "province", MAX_PROVINCE_CHARS),
        health_insurance_no=insurance,
        on_behalf=on_behalf,
        answers={key: bool(answers[key]) for key in ANSWER_KEYS},
    )


@dataclass(frozen=True, slots=True)
class IdCard:
    """What the QR on a Vietnamese chip ID card says:
    ``id|old id|name|ddmmyyyy|gender|address|issue date``."""

    national_id: str
    old_id: str | None
    full_name: str
    birth_year: int
    gender: str
    address: str


_CARD_GENDER: Final = {"nam": "male", "nữ": "female", "nu": "female"}


def parse_id_card(text: object) -> IdCard:
    field = "id_card"
    if not isinstance(text, str) or len(text) > 400:
        raise InvalidField(field, "the text of the ID card's QR code")
    parts = unicodedata.normalize("NFC", text.strip()).split("|")
    if len(parts) != 7:
        raise InvalidField(field, "7 fields separated by |: id|old id|name|ddmmyyyy|gender|…")
    new_id_, old_id, name, born, gender, address, _issued = (p.strip() for p in parts)
    if not _CCCD.fullmatch(new_id_):
        raise InvalidField(field, "the first field must be the 12-digit id")
    if old_id and not _CMND.fullmatch(old_id):
        raise InvalidField(field, "the second field must be empty or the 9-digit old id")
    try:
        birth = dt.datetime.strptime(born, "%d%m%Y").date()
    except ValueError:
        raise InvalidField(field, "the fourth field must be the birth date as ddmmyyyy") from None
    card_gender = _CARD_GENDER.get(gender.casefold())
    if card_gender is None:
        raise InvalidField(field, "the fifth field must be Nam or Nữ")
    return IdCard(
        national_id=new_id_,
        old_id=old_id or None,
        full_name=_person_name({"id_card": name}, field),
        birth_year=birth.year,
        gender=card_gender,
        address=_text({"id_card": address}, field, MAX_ADDRESS_CHARS),
    )
