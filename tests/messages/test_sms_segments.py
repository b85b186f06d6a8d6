from __future__ import annotations

import pytest

from workers.messages.render import GSM7_BASIC, GSM7_EXTENSION, sms_segments


def test_the_gsm_tables_are_complete() -> None:
    # 128 characters in the basic table, one of which is the escape to the extension table.
    assert len(GSM7_BASIC) == 127 and "\x1b" not in GSM7_BASIC
    assert len(GSM7_EXTENSION) == 10 and not GSM7_BASIC & GSM7_EXTENSION


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", (1, "GSM-7")),
        ("a" * 160, (1, "GSM-7")),
        ("a" * 161, (2, "GSM-7")),
        ("a" * 306, (2, "GSM-7")),
        ("a" * 307, (3, "GSM-7")),
        # Extension characters cost two septets.
        ("€" * 80, (1, "GSM-7")),
        ("€" * 81, (2, "GSM-7")),
        ("[]{}" * 20, (1, "GSM-7")),
        ("a" * 159 + "^", (2, "GSM-7")),
        # An escaped character is never split: the first part keeps one septet unused.
        ("a" * 152 + "€" + "a" * 152, (3, "GSM-7")),
        ("a" * 151 + "€" + "a" * 153, (2, "GSM-7")),
        # Letters of the basic table, as Dutch, German and Norwegian use them.
        ("Dag Ann, tot zaterdag! Café open om 19:00 — no: dash", (1, "UCS-2")),
        ("Grüße aus Köln, Straße 5, Ä Ö Ü ß é", (1, "GSM-7")),
        ("Blåbær og røkelaks på Æøå", (1, "GSM-7")),
        ("Ça va", (1, "GSM-7")),
        ("ça va", (1, "UCS-2")),
        ("Zoë", (1, "UCS-2")),
        ("ł" * 70, (1, "UCS-2")),
        ("ł" * 71, (2, "UCS-2")),
        ("ł" * 134, (2, "UCS-2")),
        ("ł" * 135, (3, "UCS-2")),
        # Outside the BMP a character takes two UTF-16 units, never split across parts.
        ("😀" * 35, (1, "UCS-2")),
        ("😀" * 36, (2, "UCS-2")),
        ("ł" * 66 + "😀" + "ł" * 66, (3, "UCS-2")),
    ],
)
def test_segment_counts(text: str, expected: tuple[int, str]) -> None:
    assert sms_segments(text) == expected
