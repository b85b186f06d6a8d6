import re
import shutil
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest

from workers.schemas import ENVELOPE_FILE, INTERNAL_DIR, PUBLIC_TYPES, TYPES, SchemaBook, problem, schema_for, schemas_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTRACT = REPO_ROOT.parent / "shared" / "CONTRACT.md"
SCHEMA_FILES = sorted([*schemas_dir().glob("*.json"), *(schemas_dir() / INTERNAL_DIR).glob("*.json")])
TYPE_NAME = re.compile(r"`([a-z]+\.[a-z]+(?:-[a-z]+)?)`")


def load(path: Path) -> dict[str, Any]:
    return orjson.loads(path.read_bytes())


def contract_types(text: str) -> set[str]:
    """Types named in the contract's topic tables ("types" column) and in its `data` list."""
    found: set[str] = set()
    types_column: int | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            types_column = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if "types" in cells:
            types_column = cells.index("types")
        elif types_column is not None and types_column < len(cells):
            found.update(TYPE_NAME.findall(cells[types_column]))
    data_section = re.search(r"^### `data` of each type.*?(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert data_section, "the contract's `data` of each type section is missing"
    found.update(TYPE_NAME.findall(data_section.group(0)))
    return found


def examples(key: str) -> list[Any]:
    """Every entry under `key` in every schema file, one test case each."""
    return [
        pytest.param(entry, id=f"{path.stem}-{index}")
        for path in SCHEMA_FILES
        for index, entry in enumerate(load(path)[key])
    ]


def event_like(**changes: Any) -> dict[str, Any]:
    event = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/shop/web",
        "type": "order.cancelled",
        "time": "2026-11-23T18:00:00Z",
        "tenant": "t1",
        "data": {"order": "o-1"},
    }
    event.update(changes)
    return event


@pytest.mark.parametrize("event", examples("examples"))
def test_every_example_is_valid(event: dict[str, Any]) -> None:
    assert problem(event) is None


@pytest.mark.parametrize("invalid", examples("x-invalid-examples"))
def test_every_invalid_example_is_rejected_with_its_reason(invalid: dict[str, Any]) -> None:
    reason = problem(invalid["event"])
    assert reason is not None, invalid["why"]
    assert invalid["error"] in reason


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda path: path.stem)
def test_each_schema_is_draft_2020_12_with_its_id_and_enough_examples(path: Path) -> None:
    schema = load(path)
    jsonschema_rs.meta.validate(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://usher.example/schemas/{path.name}"
    assert len(schema["examples"]) >= 1
    assert len(schema["x-invalid-examples"]) >= 2


@pytest.mark.parametrize("type_", sorted(TYPES))
def test_a_type_schemas_examples_are_of_that_type(type_: str) -> None:
    schema = schema_for(type_)
    assert {event["type"] for event in schema["examples"]} == {type_}
    assert {invalid["event"]["type"] for invalid in schema["x-invalid-examples"]} == {type_}


@pytest.mark.skipif(not CONTRACT.exists(), reason="../shared/CONTRACT.md is not beside the repository")
def test_schemas_name_exactly_the_contracts_types() -> None:
    named = contract_types(CONTRACT.read_text(encoding="utf-8"))
    assert named - PUBLIC_TYPES == set(), "types in the contract without a schema"
    assert PUBLIC_TYPES - named == set(), "schemas for types the contract does not name"
    assert (TYPES - PUBLIC_TYPES) & named == set(), "a contract type among the internal schemas"


def test_contract_parser_reads_types_columns_and_the_data_list() -> None:
    text = (
        "| topic | key | types |\n| --- | --- | --- |\n| `ticketing.orders` | `{tenant}` | `order.placed` |\n\n"
        "### `data` of each type (examples)\n- `config.optin-set`: {...}; `event.cancelled`: {...}\n\n"
        "## Next\n- `not.this`\n"
    )
    assert contract_types(text) == {"order.placed", "config.optin-set", "event.cancelled"}


@pytest.mark.parametrize("garbage", [[], "order.placed", 42, None, True, b"{}"])
def test_garbage_is_not_a_cloudevent(garbage: object) -> None:
    assert problem(garbage).startswith("not a CloudEvent: expected a JSON object")


def test_a_missing_envelope_field_is_named() -> None:
    event = event_like()
    del event["tenant"]
    assert problem(event) == "not a CloudEvent: missing 'tenant'"


def test_an_unknown_type_is_named() -> None:
    assert problem(event_like(type="order.shipped")) == "unknown type 'order.shipped'"


def test_the_envelope_is_checked_before_the_type() -> None:
    event = event_like(type="order.shipped", time="yesterday")
    assert problem(event) == 'not a CloudEvent: time: "yesterday" is not a "date-time"'


def test_a_type_that_is_not_a_string_is_an_envelope_problem() -> None:
    assert problem(event_like(type=["order.placed"])) == 'not a CloudEvent: type: ["order.placed"] is not of type "string"'


def test_values_json_cannot_hold_are_not_a_cloudevent() -> None:
    assert problem(event_like(data={1: "o-1"})).startswith("not a CloudEvent: not JSON data")


def test_a_long_value_is_abbreviated_in_the_reason() -> None:
    reason = problem(event_like(data={"order": "o-1" * 200}))
    assert reason.startswith('order.cancelled: data.order: "o-1o-1')
    assert len(reason) < 200


def test_an_address_with_a_display_name_is_not_an_email() -> None:
    event = load(schemas_dir() / "contact.link.json")["examples"][0]
    event["data"]["email"] = "Bob <bob@example.com>"
    assert problem(event) == 'contact.link: data.email: "Bob <bob@example.com>" is not a "email"'


def test_schema_for_an_unknown_type_raises() -> None:
    with pytest.raises(KeyError):
        schema_for("order.shipped")


def test_schemas_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("USHER_SCHEMAS_DIR", str(tmp_path))
    assert schemas_dir() == tmp_path
    monkeypatch.delenv("USHER_SCHEMAS_DIR")
    assert schemas_dir() == REPO_ROOT / "schemas"


def test_a_book_knows_only_the_types_of_its_directory(tmp_path: Path) -> None:
    for name in (ENVELOPE_FILE, "order.cancelled.json"):
        shutil.copy(schemas_dir() / name, tmp_path / name)
    book = SchemaBook(tmp_path)
    assert book.types == {"order.cancelled"}
    assert book.problem(event_like()) is None
    assert book.problem(event_like(type="order.placed", data={})) == "unknown type 'order.placed'"

