"""Custom-field rules: which field configurations make sense and which answers fit a field.

Shared by the prompts stage (configuration checks, `POST /v1/fields/validate`) and the segments
stage (answers arriving with orders and `contact.update`). A field is the `data` of a
`config.custom-field` record; `fields_config` maps field id to that data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

FIELD_TYPES = ("yes_no", "text", "checkbox", "dropdown")
FORMS = ("registration", "checkout", "profile")
SELECT_MODES = ("single", "unlimited", "exact", "range")
MAX_CHOICES = 20
MAX_TEXT_LENGTH = 1000
MESSAGE_FALLBACK_LANGUAGE = "en"
_SELECT_NUMBERS = ("count", "max", "min")

# Norwegian arrives as "no" as well as the written standards "nb" and "nn".
_LANGUAGE_ALIASES = {"nb": "no", "nn": "no"}

_MESSAGES: dict[str, dict[str, str]] = {
    "required": {
        "en": "This field is required.",
        "nl": "Dit veld is verplicht.",
        "de": "Dieses Feld ist ein Pflichtfeld.",
        "no": "Dette feltet må fylles ut.",
    },
    "unknown_field": {
        "en": "There is no such field.",
        "nl": "Dit veld bestaat niet.",
        "de": "Dieses Feld gibt es nicht.",
        "no": "Dette feltet finnes ikke.",
    },
    "not_in_form": {
        "en": "This field cannot be filled in here.",
        "nl": "Dit veld kan hier niet worden ingevuld.",
        "de": "Dieses Feld kann hier nicht ausgefüllt werden.",
        "no": "Dette feltet kan ikke fylles ut her.",
    },
    "not_yes_no": {
        "en": "Answer yes or no.",
        "nl": "Antwoord met ja of nee.",
        "de": "Bitte mit Ja oder Nein antworten.",
        "no": "Svar ja eller nei.",
    },
    "not_checkbox": {
        "en": "Tick the box or leave it empty.",
        "nl": "Vink het vakje aan of laat het leeg.",
        "de": "Bitte das Kästchen ankreuzen oder leer lassen.",
        "no": "Kryss av i boksen eller la den stå tom.",
    },
    "not_text": {
        "en": "The answer must be text.",
        "nl": "Het antwoord moet een tekst zijn.",
        "de": "Die Antwort muss ein Text sein.",
        "no": "Svaret må være en tekst.",
    },
    "too_long": {
        "en": "Use at most {max} characters.",
        "nl": "Gebruik maximaal {max} tekens.",
        "de": "Bitte höchstens {max} Zeichen verwenden.",
        "no": "Bruk høyst {max} tegn.",
    },
    "not_choices": {
        "en": "Choose from the options in the list.",
        "nl": "Kies uit de opties in de lijst.",
        "de": "Bitte aus den Optionen der Liste wählen.",
        "no": "Velg blant alternativene i listen.",
    },
    "unknown_choice": {
        "en": "“{choice}” is not one of the options.",
        "nl": "“{choice}” is geen van de opties.",
        "de": "„{choice}“ ist keine der Optionen.",
        "no": "«{choice}» er ikke et av alternativene.",
    },
    "choose_one": {
        "en": "Choose one option.",
        "nl": "Kies één optie.",
        "de": "Bitte eine Option wählen.",
        "no": "Velg ett alternativ.",
    },
    "choose_exactly": {
        "en": "Choose exactly {count} options.",
        "nl": "Kies precies {count} opties.",
        "de": "Bitte genau {count} Optionen wählen.",
        "no": "Velg nøyaktig {count} alternativer.",
    },
    "choose_at_most": {
        "en": "Choose at most {max} options.",
        "nl": "Kies maximaal {max} opties.",
        "de": "Bitte höchstens {max} Optionen wählen.",
        "no": "Velg høyst {max} alternativer.",
    },
    "choose_between": {
        "en": "Choose between {min} and {max} options.",
        "nl": "Kies tussen {min} en {max} opties.",
        "de": "Bitte zwischen {min} und {max} Optionen wählen.",
        "no": "Velg mellom {min} og {max} alternativer.",
    },
}


def valid_texts(texts: Any) -> bool:
    """A per-language text map with at least one non-empty text, e.g. {"en": "Diet"}."""
    return (
        isinstance(texts, dict)
        and bool(texts)
        and all(isinstance(text, str) and text.strip() for text in texts.values())
    )


def pick_text(texts: Mapping[str, str], *languages: str | None) -> str | None:
    """The text in the first of `languages` that has one (a regional tag such as `nl-BE` also
    finds `nl`), else any text there is, so a question is never shown blank."""
    for language in languages:
        if language:
            for candidate in _language_candidates(language):
                if candidate in texts:
                    return texts[candidate]
    return next(iter(texts.values()), None)


def _language_candidates(language: str) -> tuple[str, str, str]:
    primary = language.replace("_", "-").split("-", 1)[0].lower()
    return language, primary, _LANGUAGE_ALIASES.get(primary, primary)


def first_repeat(items: list[Any]) -> Any:
    """The first item that appears earlier in the list too, else None."""
    seen: list[Any] = []
    for item in items:
        if item in seen:
            return item
        seen.append(item)
    return None


def shown_in(field: Mapping[str, Any], form: str) -> bool:
    """Whether a field appears in a form; a field without `show_in` is internal only."""
    return form in (field.get("show_in") or ())


def select_bounds(field: Mapping[str, Any]) -> tuple[int, int]:
    """The fewest and most choices one answer to a (valid) dropdown may hold."""
    select = field.get("select") or {}
    mode = select.get("mode", "single")
    if mode == "single":
        return 1, 1
    if mode == "unlimited":
        return 1, len(field["choices"])
    if mode == "exact":
        count = _exact_count(select)
        return count, count
    return select["min"], select["max"]


def _exact_count(select: Mapping[str, Any]) -> int:
    # `count` says it best; min = max is how the contract's min/max spell the same thing.
    return next(select[name] for name in _SELECT_NUMBERS if select.get(name) is not None)


def field_config_error(field: Mapping[str, Any]) -> str | None:
    """Why a `config.custom-field` cannot be used, in words its author can act on; None if valid."""
    problem = _field_config_problem(field)
    return problem and f"custom field {field.get('id')!r}: {problem}"


def _field_config_problem(field: Mapping[str, Any]) -> str | None:
    field_type = field.get("type")
    if field_type not in FIELD_TYPES:
        return f"type must be one of {', '.join(FIELD_TYPES)}, not {field_type!r}"
    if not valid_texts(field.get("label")):
        return 'label needs a text in at least one language, e.g. {"en": "Diet"}'
    if not isinstance(field.get("required", False), bool):
        return "required must be true or false"
    show_in = field.get("show_in") or []
    if not isinstance(show_in, list) or any(form not in FORMS for form in show_in):
        return f"show_in may only list {', '.join(FORMS)} (leave it out for an internal field)"
    if field_type == "dropdown":
        return _dropdown_problem(field)
    if field.get("choices"):
        return "only a dropdown has choices: remove them or make the field a dropdown"
    if field.get("select"):
        return "only a dropdown has a select mode: remove select or make the field a dropdown"
    return None


def _dropdown_problem(field: Mapping[str, Any]) -> str | None:
    choices = field.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        return "a dropdown needs a list of choices, each a non-empty text"
    if len(choices) > MAX_CHOICES:
        return f"a dropdown has at most {MAX_CHOICES} choices, this one has {len(choices)}"
    repeated = first_repeat(choices)
    if repeated is not None:
        return f"choice {repeated!r} appears more than once"
    select = field.get("select") or {}
    if not isinstance(select, dict):
        return 'select must be an object such as {"mode": "single"}'
    mode = select.get("mode", "single")
    if mode not in SELECT_MODES:
        return f"select.mode must be one of {', '.join(SELECT_MODES)}, not {mode!r}"
    for name in _SELECT_NUMBERS:
        value = select.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"select.{name} must be a whole number of 0 or more"
    if mode == "exact":
        counts = {select[name] for name in _SELECT_NUMBERS if select.get(name) is not None}
        if len(counts) != 1:
            return "select mode exact takes one number, the choices to pick: give select.count"
    if mode == "range" and (select.get("min") is None or select.get("max") is None):
        return "select mode range needs both select.min and select.max"
    fewest, most = select_bounds(field)
    if fewest > most:
        return f"select.min ({fewest}) is larger than select.max ({most})"
    if most < 1:
        return "select allows no choice at all: pick at least 1"
    if most > len(choices):
        wanted = "exactly" if mode == "exact" else "up to"
        return f"select asks for {wanted} {most} choices but the dropdown has only {len(choices)}"
    return None


def normalise_answers(
    fields_config: Mapping[str, Mapping[str, Any]], answers: Mapping[str, Any]
) -> dict[str, Any]:
    """Answers in the form they are stored in: a dropdown answer as a list of distinct choices (a
    lone string becomes a one-item list), text without surrounding spaces. Unknown fields and values
    of the wrong type pass through unchanged, for `validate_answers` to report."""
    return {field_id: _normalise(fields_config.get(field_id), value) for field_id, value in answers.items()}


def _normalise(field: Mapping[str, Any] | None, value: Any) -> Any:
    if field is None:
        return value
    if field["type"] == "dropdown":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(choice, str) for choice in value):
            return list(dict.fromkeys(value))
    elif field["type"] == "text" and isinstance(value, str):
        return value.strip()
    return value


def validate_answers(
    fields_config: Mapping[str, Mapping[str, Any]],
    answers: Mapping[str, Any],
    form: str | None,
    language: str | None,
) -> dict[str, str]:
    """Field id -> what is wrong with its answer, in `language` (en, nl, de, no; else English).
    Empty when every answer fits.

    `form` (registration, checkout, profile) is where the answers were given: only fields shown
    there may be answered and its required fields must be. `form` None is a back-office change:
    any field, internal ones included, and nothing is required. A null answer clears a field.
    """
    normalised = normalise_answers(fields_config, answers)
    problems: dict[str, tuple[str, dict[str, Any]]] = {}
    for field_id, value in normalised.items():
        field = fields_config.get(field_id)
        if field is None:
            problem: tuple[str, dict[str, Any]] | None = ("unknown_field", {})
        elif form is not None and not shown_in(field, form):
            problem = ("not_in_form", {})
        else:
            problem = _answer_problem(field, value)
        if problem:
            problems[field_id] = problem
    if form is not None:
        for field_id, field in fields_config.items():
            if (
                field.get("required")
                and shown_in(field, form)
                and field_id not in problems
                and _unanswered(field, normalised.get(field_id))
            ):
                problems[field_id] = ("required", {})
    return {field_id: _message(code, language, params) for field_id, (code, params) in problems.items()}


def _answer_problem(field: Mapping[str, Any], value: Any) -> tuple[str, dict[str, Any]] | None:
    if value is None:
        return None
    field_type = field["type"]
    if field_type == "yes_no":
        return None if isinstance(value, bool) else ("not_yes_no", {})
    if field_type == "checkbox":
        return None if isinstance(value, bool) else ("not_checkbox", {})
    if field_type == "text":
        if not isinstance(value, str):
            return ("not_text", {})
        return ("too_long", {"max": MAX_TEXT_LENGTH}) if len(value) > MAX_TEXT_LENGTH else None
    if not isinstance(value, list) or not all(isinstance(choice, str) for choice in value):
        return ("not_choices", {})
    unknown = next((choice for choice in value if choice not in field["choices"]), None)
    if unknown is not None:
        return ("unknown_choice", {"choice": unknown})
    fewest, most = select_bounds(field)
    if not value or fewest <= len(value) <= most:
        return None
    if fewest == most:
        return ("choose_one", {}) if most == 1 else ("choose_exactly", {"count": most})
    if fewest <= 1:
        return ("choose_at_most", {"max": most})
    return ("choose_between", {"min": fewest, "max": most})


def _unanswered(field: Mapping[str, Any], value: Any) -> bool:
    # A required checkbox is a confirmation: only a tick answers it. No is a valid yes/no answer.
    if field["type"] == "checkbox":
        return value is not True
    return value is None or value == "" or value == []


def _message(code: str, language: str | None, params: Mapping[str, Any]) -> str:
    # Every message has an English text, so a template is always found.
    template = cast(str, pick_text(_MESSAGES[code], language, MESSAGE_FALLBACK_LANGUAGE))
    return template.format(**params)
