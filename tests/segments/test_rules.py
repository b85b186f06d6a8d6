import pytest

from workers.segments import rules

from .helpers import FIELDS, SETTINGS, ev


def test_records_of_other_stages_are_not_taken():
    consent = ev("consent.set", {"contact": "c-1", "optin": "newsletter", "status": "opted_in"})
    assert consent["type"] not in rules.CONTACT_TYPES
    with pytest.raises(ValueError, match="consent.set"):
        rules.apply_contact_record(None, consent, settings=SETTINGS, fields_config=FIELDS)
