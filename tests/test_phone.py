"""Phone numbers: every shape users write, normalised to E.164 and WhatsApp's digits-only form."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from whatsapp_call.errors import BadInputError
from whatsapp_call.phone import parse_phone


@pytest.mark.parametrize(
    "raw",
    [
        "+14085551234",
        "+1 (408) 555-1234",
        "+1-408-555-1234",
        "14085551234",
        "0014085551234",
        " +1 408 555 1234 ",
        "+1.408.555.1234",
    ],
)
def test_accepted_shapes(raw):
    number = parse_phone(raw)
    assert number.e164 == "+14085551234"
    assert number.wa_id == "14085551234"
    assert str(number) == "+14085551234"


@pytest.mark.parametrize(
    "raw", ["+4915123456789", "4915123456789", "+55 11 91234-5678", "+91 98765 43210"]
)
def test_other_countries(raw):
    assert parse_phone(raw).e164.startswith("+")


@pytest.mark.parametrize(
    "raw,expect",
    [
        ("", "No phone number"),
        ("   ", "No phone number"),
        ("hello", "not a phone number"),
        ("(408) 555-1234", "not a phone number"),  # no country code
        ("+1", "not a phone number"),
        ("+1408", "wrong number of digits"),
        ("+140855512345678", "wrong number of digits"),
        ("+999123456789", "not a phone number"),
        ("+1 555 000 0000", "not a valid number"),
    ],
)
def test_rejected_with_a_clear_fix(raw, expect):
    with pytest.raises(BadInputError) as exc:
        parse_phone(raw)
    assert expect in str(exc.value)
    assert "fix:" in str(exc.value)


def test_non_string_rejected():
    with pytest.raises(BadInputError):
        parse_phone(None)  # type: ignore[arg-type]


@given(st.text(max_size=40))
def test_never_crashes_on_arbitrary_text(text):
    try:
        number = parse_phone(text)
    except BadInputError:
        return
    assert number.e164.startswith("+") and number.wa_id.isdigit()
