"""Custom-field rules: configuration checks, answer normalisation and validation messages."""

from __future__ import annotations

from typing import Any

import pytest

from workers.fields import field_config_error, normalise_answers, pick_text, validate_answers


def field(field_id: str, type_: str, **extra: Any) -> dict[str, Any]:
    return {"id": field_id, "type": type_, "label": {"en": field_id.title()}, **extra}


def dropdown(
    field_id: str, choices: int | list[str], select: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    names = [f"c{i}" for i in range(1, choices + 1)] if isinstance(choices, int) else choices
    return field(field_id, "dropdown", choices=names, select=select, **extra)


FIELDS = {
    "diet": dropdown(
        "diet",
        ["vegan", "vegetarian", "halal"],
        {"mode": "single"},
        required=True,
        show_in=["checkout", "profile"],
    ),
    "topics": dropdown(
        "topics", ["music", "theatre", "dance", "opera"], {"mode": "unlimited"}, show_in=["profile"]
    ),
    "pair": dropdown("pair", ["a", "b", "c"], {"mode": "exact", "count": 2}, show_in=["checkout"]),
    "some": dropdown(
        "some", ["a", "b", "c", "d"], {"mode": "range", "min": 2, "max": 3}, show_in=["checkout"]
    ),
    "few": dropdown("few", ["a", "b", "c"], {"mode": "range", "min": 0, "max": 2}, show_in=["checkout"]),
    "student": field("student", "yes_no", required=True, show_in=["registration"]),
    "terms": field("terms", "checkbox", required=True, show_in=["checkout"]),
    "remark": field("remark", "text", show_in=["checkout", "registration"]),
    "vip_note": field("vip_note", "text"),
}
VALID_CHECKOUT = {"diet": ["vegan"], "terms": True}


def errors(
    answers: dict[str, Any], form: str | None = "checkout", language: str | None = "en"
) -> dict[str, str]:
    return validate_answers(FIELDS, answers, form, language)


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        field("student", "yes_no", show_in=["registration"]),
        field("note", "text"),
        field("terms", "checkbox", required=True, show_in=["checkout"]),
        field("plain", "text", choices=[], select=None),
        dropdown("diet", 20),
        dropdown("diet", 2, None),
        dropdown("diet", 3, {"mode": "unlimited"}),
        dropdown("diet", 3, {"mode": "exact", "count": 3}),
        dropdown("diet", 3, {"mode": "exact", "min": 2, "max": 2}),
        dropdown("diet", 3, {"mode": "range", "min": 1, "max": 3}),
    ],
)
def test_sensible_field_configurations_are_accepted(config: dict[str, Any]) -> None:
    assert field_config_error(config) is None


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (dropdown("diet", 21), "custom field 'diet': a dropdown has at most 20 choices, this one has 21"),
        (dropdown("diet", 3, {"mode": "exact", "count": 4}), "exactly 4 choices but the dropdown has only 3"),
        (dropdown("diet", 3, {"mode": "exact", "min": 1, "max": 2}), "exact takes one number"),
        (dropdown("diet", 3, {"mode": "exact"}), "exact takes one number"),
        (
            dropdown("diet", 5, {"mode": "range", "min": 3, "max": 2}),
            "select.min (3) is larger than select.max (2)",
        ),
        (
            dropdown("diet", 3, {"mode": "range", "min": 1, "max": 4}),
            "up to 4 choices but the dropdown has only 3",
        ),
        (dropdown("diet", 3, {"mode": "range", "min": 1}), "range needs both select.min and select.max"),
        (dropdown("diet", 3, {"mode": "range", "min": 0, "max": 0}), "allows no choice at all"),
        (dropdown("diet", 3, {"mode": "range", "min": -1, "max": 2}), "select.min must be a whole number"),
        (
            dropdown("diet", 3, {"mode": "several"}),
            "select.mode must be one of single, unlimited, exact, range",
        ),
        (dropdown("diet", ["vegan", "vegan"]), "choice 'vegan' appears more than once"),
        (dropdown("diet", []), "a dropdown needs a list of choices"),
        (field("student", "yes_no", select={"mode": "single"}), "only a dropdown has a select mode"),
        (field("note", "text", choices=["a"]), "only a dropdown has choices"),
        (field("note", "number"), "type must be one of yes_no, text, checkbox, dropdown"),
        ({"id": "note", "type": "text", "label": {}}, "label needs a text in at least one language"),
        (
            field("note", "text", show_in=["checkout", "invoice"]),
            "show_in may only list registration, checkout, profile",
        ),
        (field("note", "text", required="yes"), "required must be true or false"),
    ],
)
def test_invalid_field_configurations_say_what_to_fix(config: dict[str, Any], reason: str) -> None:
    error = field_config_error(config)
    assert error is not None and reason in error


# --- answers -------------------------------------------------------------------------------------


def test_complete_checkout_answers_are_valid() -> None:
    assert (
        errors({**VALID_CHECKOUT, "pair": ["a", "c"], "some": ["a", "b", "d"], "remark": "Wheelchair"}) == {}
    )


def test_required_fields_of_the_form_must_be_answered() -> None:
    assert errors({}) == {"diet": "This field is required.", "terms": "This field is required."}
    assert errors({"diet": [], "terms": True}) == {"diet": "This field is required."}
    assert errors({"diet": None, "terms": True}) == {"diet": "This field is required."}


def test_required_fields_of_other_forms_are_not_required_here() -> None:
    assert errors({"student": True}, form="registration") == {}
    assert errors({}, form="registration") == {"student": "This field is required."}


def test_a_required_checkbox_must_be_ticked() -> None:
    assert errors({**VALID_CHECKOUT, "terms": False}) == {"terms": "This field is required."}


def test_no_is_an_answer_to_a_required_yes_no_question() -> None:
    assert errors({"student": False}, form="registration") == {}


def test_back_office_changes_may_touch_internal_fields_and_require_nothing() -> None:
    assert errors({"vip_note": "Gold member"}, form=None) == {}


def test_fields_not_in_the_form_cannot_be_answered_there() -> None:
    assert errors({**VALID_CHECKOUT, "vip_note": "me!", "topics": ["music"]}) == {
        "vip_note": "This field cannot be filled in here.",
        "topics": "This field cannot be filled in here.",
    }


def test_unknown_fields_are_reported() -> None:
    assert errors({**VALID_CHECKOUT, "shoe_size": "44"}) == {"shoe_size": "There is no such field."}


def test_a_choice_must_exist() -> None:
    assert errors({**VALID_CHECKOUT, "diet": ["pescatarian"]}) == {
        "diet": "“pescatarian” is not one of the options."
    }


def test_single_select_takes_one_choice_given_as_a_list_or_a_lone_string() -> None:
    assert errors({**VALID_CHECKOUT, "diet": "vegan"}) == {}
    assert errors({**VALID_CHECKOUT, "diet": ["vegan", "halal"]}) == {"diet": "Choose one option."}


def test_unlimited_select_takes_any_number_of_choices() -> None:
    assert errors({"topics": ["music", "theatre", "dance", "opera"]}, form="profile") == {
        "diet": "This field is required."
    }
    assert errors({"topics": ["music"], "diet": "halal"}, form="profile") == {}


def test_exact_select_takes_exactly_that_many_choices() -> None:
    assert errors({**VALID_CHECKOUT, "pair": ["a"]}) == {"pair": "Choose exactly 2 options."}
    assert errors({**VALID_CHECKOUT, "pair": ["a", "b", "c"]}) == {"pair": "Choose exactly 2 options."}


def test_range_select_takes_between_min_and_max_choices() -> None:
    assert errors({**VALID_CHECKOUT, "some": ["a"]}) == {"some": "Choose between 2 and 3 options."}
    assert errors({**VALID_CHECKOUT, "some": ["a", "b", "c", "d"]}) == {
        "some": "Choose between 2 and 3 options."
    }
    assert errors({**VALID_CHECKOUT, "few": ["a", "b", "c"]}) == {"few": "Choose at most 2 options."}


def test_a_repeated_choice_counts_once() -> None:
    assert errors({**VALID_CHECKOUT, "pair": ["a", "a"]}) == {"pair": "Choose exactly 2 options."}


def test_a_dropdown_answer_must_be_choices() -> None:
    assert errors({**VALID_CHECKOUT, "diet": 3}) == {"diet": "Choose from the options in the list."}
    assert errors({**VALID_CHECKOUT, "diet": [True]}) == {"diet": "Choose from the options in the list."}


def test_yes_no_and_checkbox_answers_are_booleans() -> None:
    assert errors({"student": "yes"}, form="registration") == {"student": "Answer yes or no."}
    assert errors({**VALID_CHECKOUT, "terms": 1}) == {"terms": "Tick the box or leave it empty."}


def test_text_answers_are_strings_of_bounded_length() -> None:
    assert errors({**VALID_CHECKOUT, "remark": ["x"]}) == {"remark": "The answer must be text."}
    assert errors({**VALID_CHECKOUT, "remark": "x" * 1000}) == {}
    assert errors({**VALID_CHECKOUT, "remark": "x" * 1001}) == {"remark": "Use at most 1000 characters."}


def test_answers_are_normalised_for_storage() -> None:
    answers = {
        "diet": "vegan",
        "topics": ["music", "dance", "music"],
        "remark": "  Late  ",
        "shoe_size": 44,
        "student": True,
    }
    assert normalise_answers(FIELDS, answers) == {
        "diet": ["vegan"],
        "topics": ["music", "dance"],
        "remark": "Late",
        "shoe_size": 44,
        "student": True,
    }


# --- languages -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "required", "exactly"),
    [
        ("en", "This field is required.", "Choose exactly 2 options."),
        ("nl", "Dit veld is verplicht.", "Kies precies 2 opties."),
        ("de", "Dieses Feld ist ein Pflichtfeld.", "Bitte genau 2 Optionen wählen."),
        ("no", "Dette feltet må fylles ut.", "Velg nøyaktig 2 alternativer."),
        ("nb", "Dette feltet må fylles ut.", "Velg nøyaktig 2 alternativer."),
        ("nl-BE", "Dit veld is verplicht.", "Kies precies 2 opties."),
        ("fr", "This field is required.", "Choose exactly 2 options."),
        (None, "This field is required.", "Choose exactly 2 options."),
    ],
)
def test_messages_come_in_the_requested_language_falling_back_to_english(
    language: str | None, required: str, exactly: str
) -> None:
    assert errors({"terms": True, "pair": ["a"]}, language=language) == {"diet": required, "pair": exactly}


@pytest.mark.parametrize(
    ("language", "message"),
    [
        ("en", "“tofu” is not one of the options."),
        ("nl", "“tofu” is geen van de opties."),
        ("de", "„tofu“ ist keine der Optionen."),
        ("no", "«tofu» er ikke et av alternativene."),
    ],
)
def test_messages_name_the_wrong_choice_in_each_language(language: str, message: str) -> None:
    assert errors({**VALID_CHECKOUT, "diet": "tofu"}, language=language) == {"diet": message}


def test_pick_text_falls_back_through_the_languages_then_to_any_text() -> None:
    texts = {"nl": "Nieuwsbrief", "en": "Newsletter"}
    assert pick_text(texts, "nl", "en") == "Nieuwsbrief"
    assert pick_text(texts, "de", "en") == "Newsletter"
    assert pick_text(texts, "NL-be", None) == "Nieuwsbrief"
    assert pick_text({"de": "Rundbrief"}, "fr", "en") == "Rundbrief"
