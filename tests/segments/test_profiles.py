import csv
import io

from workers import envelope
from workers.segments import profiles
from workers.segments.profiles import (
    apply_contact_update,
    apply_filter,
    apply_order_cancelled,
    apply_order_placed,
    fan_out_filter,
)

from .helpers import FIELDS, FILTERS, assert_contract, ev, of_topic, order


def test_an_order_gives_its_buyer_a_profile_published_on_contacts_state():
    outcome = apply_order_placed(None, order(products=["parking"]), FIELDS)

    [published] = of_topic(outcome.outs, envelope.CONTACTS_STATE)
    assert published.key == "t1/c-1"
    assert published.event["type"] == "contact.profile"
    assert published.event["data"] == {
        "contact": "c-1",
        "email": "ann@example.com",
        "first_name": "Ann",
        "last_name": "Peeters",
        "phone": "+32470000000",
        "language": "nl",
        "fields": {},
        "filters": [],
        "links": {"children": [], "parents": []},
        "orders": [
            {
                "order": "o-1",
                "event": "ev-1",
                "channel": "web",
                "products": ["parking"],
                "cancelled": False,
                "tickets": [{"type": "adult", "price_rank": "A", "row": "5", "seat": "12"}],
            }
        ],
    }
    assert outcome.state["profile"] == published.event["data"]
    assert_contract(outcome.outs)


def test_the_same_order_twice_changes_and_publishes_nothing():
    placed = order()
    first = apply_order_placed(None, placed, FIELDS)
    again = apply_order_placed(first.state, placed, FIELDS)
    assert again.outs == []
    assert again.state == first.state


def test_latest_non_empty_details_win_and_an_older_record_only_fills_gaps():
    first = apply_order_placed(None, order(time="2026-11-01T10:00:00Z", phone=None), FIELDS)
    newer = apply_order_placed(
        first.state, order(order_id="o-2", time="2026-11-02T10:00:00Z", email=None, first_name="Annie"), FIELDS
    )
    profile = newer.state["profile"]
    assert (profile["email"], profile["first_name"], profile["phone"]) == ("ann@example.com", "Annie", "+32470000000")

    older = apply_order_placed(
        newer.state,
        order(order_id="o-0", time="2026-10-01T10:00:00Z", first_name="Anna", phone="+32471111111", language="en"),
        FIELDS,
    )
    profile = older.state["profile"]
    assert (profile["first_name"], profile["phone"], profile["language"]) == ("Annie", "+32470000000", "nl")
    assert [o["order"] for o in profile["orders"]] == ["o-1", "o-2", "o-0"]


def test_order_answers_are_stored_and_an_invalid_one_is_rejected_naming_the_field():
    outcome = apply_order_placed(None, order(fields={"diet": "vegan", "shoe_size": "44"}), FIELDS)
    assert outcome.state["profile"]["fields"] == {"diet": ["vegan"]}
    [reason] = outcome.rejections
    assert "shoe_size" in reason


def test_an_answer_left_out_keeps_the_stored_one_and_a_null_clears_it():
    first = apply_order_placed(None, order(fields={"diet": ["vegan"]}), FIELDS)
    kept = apply_order_placed(first.state, order(order_id="o-2", fields={}), FIELDS)
    assert kept.state["profile"]["fields"] == {"diet": ["vegan"]}
    cleared = apply_order_placed(kept.state, order(order_id="o-3", fields={"diet": None}), FIELDS)
    assert cleared.state["profile"]["fields"] == {}


def test_a_cancelled_order_stays_in_the_profile_marked_cancelled():
    placed = apply_order_placed(None, order(), FIELDS)
    cancelled = apply_order_cancelled(placed.state, ev("order.cancelled", {"order": "o-1"}))
    [published] = of_topic(cancelled.outs, envelope.CONTACTS_STATE)
    assert published.event["data"]["orders"][0]["cancelled"] is True
    # A redelivered order.placed does not bring the order back to life.
    replayed = apply_order_placed(cancelled.state, order(), FIELDS)
    assert replayed.state["profile"]["orders"][0]["cancelled"] is True


def test_cancelling_an_unknown_order_is_rejected_and_changes_nothing():
    placed = apply_order_placed(None, order(), FIELDS)
    outcome = apply_order_cancelled(placed.state, ev("order.cancelled", {"order": "o-404"}))
    assert outcome.outs == [] and outcome.state == placed.state
    assert "o-404" in outcome.rejections[0]


def test_contact_update_stores_answers_and_replies_ok_to_the_command():
    placed = apply_order_placed(None, order(), FIELDS)
    command = ev(
        "contact.update",
        {"contact": "c-1", "fields": {"diet": ["vegetarian"]}, "form": "profile", "phone": "+32479999999"},
        time="2026-11-05T10:00:00Z",
    )
    outcome = apply_contact_update(placed.state, command, FIELDS)
    assert outcome.state["profile"]["fields"] == {"diet": ["vegetarian"]}
    assert outcome.state["profile"]["phone"] == "+32479999999"
    [answer] = of_topic(outcome.outs, envelope.CONTACTS_REPLIES)
    assert answer.key == "t1/c-1"
    assert answer.event["data"] == {"request": command["id"], "ok": True}


def test_contact_update_with_an_invalid_answer_replies_invalid_and_keeps_the_valid_ones():
    placed = apply_order_placed(None, order(), FIELDS)
    command = ev(
        "contact.update",
        {"contact": "c-1", "form": "profile", "fields": {"diet": ["carnivore"], "newsletter_source": "radio"}},
    )
    outcome = apply_contact_update(placed.state, command, FIELDS)
    [answer] = of_topic(outcome.outs, envelope.CONTACTS_REPLIES)
    data = answer.event["data"]
    assert (data["ok"], data["error"], data["request"]) == (False, "invalid", command["id"])
    # The profile form cannot set an internal field either; the reply names both, in Dutch (the contact's language).
    assert set(data["errors"]) == {"diet", "newsletter_source"}
    assert "carnivore" in data["errors"]["diet"] and "opties" in data["errors"]["diet"]
    assert outcome.state["profile"]["fields"] == {}
    assert len(outcome.rejections) == 2
    assert_contract(outcome.outs)


def test_a_back_office_update_may_set_an_internal_field():
    placed = apply_order_placed(None, order(), FIELDS)
    outcome = apply_contact_update(
        placed.state, ev("contact.update", {"contact": "c-1", "fields": {"newsletter_source": " radio "}}), FIELDS
    )
    assert outcome.state["profile"]["fields"] == {"newsletter_source": "radio"}


def test_contact_update_of_a_new_contact_creates_its_profile():
    outcome = apply_contact_update(
        None, ev("contact.update", {"contact": "c-9", "email": "zoe@example.com", "fields": {}}), FIELDS
    )
    assert outcome.state["profile"]["contact"] == "c-9"
    assert outcome.state["profile"]["email"] == "zoe@example.com"


def test_an_email_change_moves_the_contact_in_the_email_index():
    placed = apply_order_placed(None, order(email="Ann@Example.com"), FIELDS)
    [claim] = of_topic(placed.outs, profiles.BY_EMAIL)
    assert (claim.key, claim.event["type"]) == ("t1/ann@example.com", profiles.EMAIL_CLAIMED)

    changed = apply_contact_update(
        placed.state,
        ev("contact.update", {"contact": "c-1", "email": "ann@new.example"}, time="2026-12-01T00:00:00Z"),
        FIELDS,
    )
    index = [(out.key, out.event["type"]) for out in of_topic(changed.outs, profiles.BY_EMAIL)]
    assert index == [("t1/ann@example.com", profiles.EMAIL_RELEASED), ("t1/ann@new.example", profiles.EMAIL_CLAIMED)]


def test_a_filter_command_fans_out_one_record_per_contact_keyed_by_that_contact():
    command = ev(
        "contact.filter", {"contacts": ["c-1", "c-2", "c-1"], "filter": "audience", "item": "vip", "op": "add"}
    )
    outcome = fan_out_filter(command, FILTERS)
    assert [out.key for out in outcome.outs] == ["t1/c-1", "t1/c-2"]
    assert {out.topic for out in outcome.outs} == {profiles.FANOUT}
    assert outcome.outs[0].event["data"]["bulk"] == command["id"]


def test_a_filter_command_naming_an_unknown_item_is_rejected():
    outcome = fan_out_filter(
        ev("contact.filter", {"contacts": ["c-1"], "filter": "audience", "item": "press", "op": "add"}), FILTERS
    )
    assert outcome.outs == []
    assert "audience:press" in outcome.rejections[0]


def test_a_filter_item_is_added_once_and_removed():
    state = apply_order_placed(None, order(), FIELDS).state
    [step] = fan_out_filter(
        ev("contact.filter", {"contacts": ["c-1"], "filter": "audience", "item": "vip", "op": "add"}), FILTERS
    ).outs
    added = apply_filter(state, step.event)
    assert added.state["profile"]["filters"] == ["audience:vip"]
    assert apply_filter(added.state, step.event).outs == []
    [removal] = fan_out_filter(
        ev("contact.filter", {"contacts": ["c-1"], "filter": "audience", "item": "vip", "op": "remove"}), FILTERS
    ).outs
    assert apply_filter(added.state, removal.event).state["profile"]["filters"] == []


def test_a_filter_for_a_contact_without_profile_is_rejected():
    [step] = fan_out_filter(
        ev("contact.filter", {"contacts": ["c-404"], "filter": "audience", "item": "vip", "op": "add"}), FILTERS
    ).outs
    outcome = apply_filter(None, step.event)
    assert outcome.state is None and outcome.outs == []
    assert "c-404" in outcome.rejections[0]


def test_two_tenants_with_the_same_contact_id_get_separate_keys():
    first = apply_order_placed(None, order(tenant="t1"), FIELDS)
    second = apply_order_placed(None, order(tenant="t2", email="other@example.com"), FIELDS)
    assert {out.key for out in first.outs} == {"t1/c-1", "t1/ann@example.com"}
    assert {out.key for out in second.outs} == {"t2/c-1", "t2/other@example.com"}
    assert {out.event["tenant"] for out in second.outs} == {"t2"}


def _exported(**selection):
    ann = apply_order_placed(None, order(fields={"diet": ["vegan"]}), FIELDS).state["profile"] | {
        "filters": ["audience:vip"]
    }
    bob = apply_order_placed(
        None,
        order(
            "c-2",
            "o-2",
            email="bob@example.com",
            first_name='=HYPERLINK("http://x")',
            last_name="Jansen",
            phone="+32 470 00 00 01",
        ),
        FIELDS,
    ).state["profile"]
    consents = {"contact": "c-1", "optins": {"newsletter": {"status": "opted_in"}}}
    text = profiles.export_rows(
        [(ann, consents), (bob, None)], field_columns=["diet"], filter_columns=["audience"], **selection
    )
    return list(csv.reader(io.StringIO(text)))


def test_export_writes_the_contract_columns_then_fields_and_filters():
    header, ann, bob = _exported()
    assert header == [
        "contact",
        "email",
        "first_name",
        "last_name",
        "phone",
        "language",
        "field:diet",
        "filter:audience",
    ]
    assert ann == ["c-1", "ann@example.com", "Ann", "Peeters", "+32470000000", "nl", "vegan", "vip"]
    # A name that a spreadsheet would run as a formula is neutralised; a phone number is left as it is.
    assert bob[2] == '\'=HYPERLINK("http://x")' and bob[4] == "+32 470 00 00 01"


def test_export_selects_by_filter_consent_and_ids():
    assert [row[0] for row in _exported(filters=["audience:vip"])[1:]] == ["c-1"]
    assert [row[0] for row in _exported(consents=["newsletter:opted_in"])[1:]] == ["c-1"]
    assert [row[0] for row in _exported(consents=["newsletter:unknown"])[1:]] == ["c-2"]
    assert [row[0] for row in _exported(ids=["c-2", "c-3"])[1:]] == ["c-2"]
    assert _exported(ids=["c-2"], filters=["audience:vip"])[1:] == []
