"""The contract's JSON Schemas (`schemas/` at the repository root), compiled once.

`problem(event)` runs for every record a stage consumes, so a valid record costs
one call into the compiled validator of its type (whose schema includes the
envelope); only a rejected record pays for working out a readable reason.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

ENVELOPE_FILE = "cloudevent.json"
# Types Usher's stages send each other on internal repartition topics; not part of the contract.
INTERNAL_DIR = "internal"
NOT_A_CLOUDEVENT = "not a CloudEvent"
# A value longer than this is abbreviated in a reason: a dead letter keeps the raw bytes anyway.
SHOWN_VALUE_LIMIT = 60

_Kind = jsonschema_rs.ValidationErrorKind


def schemas_dir() -> Path:
    """`USHER_SCHEMAS_DIR` for installed deployments, else the repository's `schemas/`."""
    override = os.environ.get("USHER_SCHEMAS_DIR")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "schemas"


class SchemaBook:
    """Every schema of one directory: `cloudevent.json` plus one `<type>.json` per
    type, and the internal types' schemas in its `internal/` folder."""

    def __init__(self, directory: Path) -> None:
        envelope = _read(directory / ENVELOPE_FILE)
        public = {path.name.removesuffix(".json"): path for path in directory.glob("*.json") if path.name != ENVELOPE_FILE}
        internal = {path.name.removesuffix(".json"): path for path in (directory / INTERNAL_DIR).glob("*.json")}
        self._schemas = {type_: _read(path) for type_, path in sorted({**public, **internal}.items())}
        # The types reference the envelope by its `$id`; the registry serves it locally and
        # `offline` forbids fetching anything else.
        options: dict[str, Any] = {
            "validate_formats": True,
            "registry": jsonschema_rs.Registry([(envelope["$id"], envelope)]),
            "offline": True,
            # A recipient address, not a header value with a display name.
            "email_options": jsonschema_rs.EmailOptions(allow_display_text=False),
        }
        self._envelope = jsonschema_rs.Draft202012Validator(envelope, **options)
        self._validators = {
            type_: jsonschema_rs.Draft202012Validator(schema, **options) for type_, schema in self._schemas.items()
        }
        self.types: frozenset[str] = frozenset(self._schemas)
        self.public_types: frozenset[str] = frozenset(public)

    def schema_for(self, type_: str) -> dict[str, Any]:
        """The loaded schema of `type_` (KeyError for an unknown type)."""
        return self._schemas[type_]

    def problem(self, event: object) -> str | None:
        """None for a valid record, else one short reason naming the failing field."""
        if not isinstance(event, dict):
            return f"{NOT_A_CLOUDEVENT}: expected a JSON object, got {_json_kind(event)}"
        try:
            return self._problem_of_object(event)
        except ValueError as error:  # values JSON cannot hold, e.g. a non-string key
            return f"{NOT_A_CLOUDEVENT}: not JSON data ({error})"

    def _problem_of_object(self, event: dict[Any, Any]) -> str | None:
        type_ = event.get("type")
        validator = self._validators.get(type_) if isinstance(type_, str) else None
        if validator is not None and validator.is_valid(event):
            return None
        envelope_error = next(self._envelope.iter_errors(event), None)
        if envelope_error is not None:
            return f"{NOT_A_CLOUDEVENT}: {_describe(envelope_error)}"
        if validator is None:
            return f"unknown type '{type_}'"
        return f"{type_}: {_describe(next(validator.iter_errors(event)))}"


def _read(path: Path) -> dict[str, Any]:
    return orjson.loads(path.read_bytes())


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _dotted(path: Sequence[str | int]) -> str:
    """`["data", "tickets", 0, "seat"]` -> `data.tickets[0].seat`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _describe(error: jsonschema_rs.ValidationError, shown_from: int = 0) -> str:
    """The error as `path: what is wrong`, the path relative to `shown_from` parts in."""
    path = error.instance_path
    kind = error.kind
    if isinstance(kind, _Kind.Required):
        return f"missing '{_dotted([*path, kind.property])}'"
    if isinstance(kind, _Kind.AnyOf | _Kind.OneOfNotValid):
        branches = "; ".join(_describe(errors[0], len(path)) for errors in kind.context if errors)
        text = f"fits none of the allowed forms ({branches})"
    elif isinstance(kind, _Kind.Not):
        text = f"must not match {_json(kind.schema)}"
    elif isinstance(kind, _Kind.Constant):
        text = f"expected {_json(kind.expected_value)}, got {_shown(error.instance)}"
    elif isinstance(kind, _Kind.Enum):
        # The validator names only the first few options; a person needs all of them.
        text = f"{_shown(error.instance)} is not one of {', '.join(_json(option) for option in kind.options)}"
    else:
        text = _abbreviated(error)
    where = _dotted(path[shown_from:])
    return f"{where}: {text}" if where else text


def _abbreviated(error: jsonschema_rs.ValidationError) -> str:
    """The validator's message, its leading copy of a long value cut short."""
    message = error.message
    full = _json(error.instance)
    if message.startswith(full):
        return _shown(error.instance) + message[len(full):]
    return message


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _shown(value: Any) -> str:
    """`value` as JSON, abbreviated when long."""
    text = _json(value)
    if len(text) <= SHOWN_VALUE_LIMIT:
        return text
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list):
        return "[...]"
    return text[: SHOWN_VALUE_LIMIT - 4] + '..."'


_BOOK = SchemaBook(schemas_dir())

TYPES: frozenset[str] = _BOOK.types
PUBLIC_TYPES: frozenset[str] = _BOOK.public_types
problem = _BOOK.problem
schema_for = _BOOK.schema_for
