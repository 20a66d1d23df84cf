"""Phone numbers, parsed and validated by the `phonenumbers` library (Google's libphonenumber).

WhatsApp's APIs take the number as digits with the country code and no `+` (the "wa_id");
users and agents write all sorts of shapes. We accept any shape libphonenumber understands
*with* an explicit country code, and refuse the rest with a message that shows the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import phonenumbers

from .errors import BadInputError


@dataclass(frozen=True)
class PhoneNumber:
    e164: str  # "+14085551234"

    @property
    def wa_id(self) -> str:
        """WhatsApp's digits-only form: "14085551234"."""
        return self.e164[1:]

    def __str__(self) -> str:
        return self.e164


def parse_phone(value: str) -> PhoneNumber:
    """Parse a user-supplied number into E.164, or raise BadInputError naming the problem."""
    if not isinstance(value, str) or not value.strip():
        raise BadInputError(
            "No phone number given.",
            "Give the callee's number in international form, e.g. +14085551234.",
        )
    raw = value.strip()
    # Accept WhatsApp's own digits-only form (wa_id) and the 00 international prefix.
    candidate = raw
    if raw.isdigit() and not raw.startswith("00"):
        candidate = "+" + raw
    elif raw.startswith("00"):
        candidate = "+" + raw[2:]
    try:
        parsed = phonenumbers.parse(candidate, None)
    except phonenumbers.NumberParseException as exc:
        raise BadInputError(
            f"{raw!r} is not a phone number ({exc._msg}).",
            "Write it in international form with the country code, e.g. +14085551234.",
        ) from None
    if not phonenumbers.is_possible_number(parsed):
        raise BadInputError(
            f"{raw!r} has the wrong number of digits for country code +{parsed.country_code}.",
            "Check the number; write it in international form, e.g. +14085551234.",
        )
    if not phonenumbers.is_valid_number(parsed):
        raise BadInputError(
            f"{raw!r} is not a valid number for country code +{parsed.country_code}.",
            "Check the digits and the country code.",
        )
    return PhoneNumber(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))
