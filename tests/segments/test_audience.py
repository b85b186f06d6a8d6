from datetime import UTC, datetime, timedelta

import pytest

from workers import envelope
from workers.segments import audience
from workers.segments.audience import due_request, member, send_at, update_membership
from workers.segments.profiles import apply_order_cancelled, apply_order_placed

from .helpers import FIELDS, assert_contract, ev, order

EVENT = {
    "event": "ev-1",
    "name": "Hamlet",
    "starts_at": "2026-12-01T19:30:00+01:00",
    "ends_at": "2026-12-01T22:00:00+01:00",
    "timezone": "Europe/Brussels",
    "optin_set": None,
    "products": [{"id": "parking", "name": "Parking"}],
}
SETS = {
    "main": {"id": "main", "optins": ["newsletter"], "default": True},
    "summer": {"id": "summer", "optins": ["newsletter", "partners"], "default": False},
}
STARTS = datetime(2026, 12, 1, 18, 30, tzinfo=UTC)
OPTED_IN = {"contact": "c-1", "optins": {"newsletter": {"status": "opted_in"}, "partners": {"status": "pending"}}}


def message(**changes):
    return {
        "message": "msg-1",
        "event": "ev-1",
        "channel": "email",
        "layout": "event-info",
        "custom_text": "Doors open at 19:00",
        "audience": {"type": "all", "products": [], "selection": {}},
        "consent": {"mode": "ignore", "include": [], "exclude": []},
        "language": {"only": None, "send_in": "customer"},
        "send": {"when": "before_start", "hours": 24},
    } | changes


def profile(*orders, **changes):
    state = None
    for placed in orders or (order(),):
        state = apply_order_placed(state, placed, FIELDS).state
    return state["profile"] | changes


def judge(msg=None, prof=None, consents=None, event=EVENT):
    return member(msg or message(), event, prof or profile(), consents, SETS, "en")


def test_a_buyer_of_the_event_is_a_member_with_their_live_orders_in_their_language():
    assert judge() == (True, ["o-1"], "nl")


def test_cancelled_orders_and_orders_for_other_events_do_not_count():
    cancelled = apply_order_cancelled(
        {"profile": profile(), "details_at": None}, ev("order.cancelled", {"order": "o-1"})
    ).state["profile"]
    assert judge(prof=cancelled) == (False, [], "nl")
    assert judge(prof=profile(order(event="ev-2")))[0] is False
    assert judge(prof=profile(order(), order(order_id="o-2", event="ev-2")))[1] == ["o-1"]


def test_with_product_and_without_product():
    both = profile(order(products=["parking"]), order(order_id="o-2"))
    with_parking = message(audience={"type": "with_product", "products": ["parking"]})
    without_parking = message(audience={"type": "without_product", "products": ["parking"]})
    assert judge(with_parking, both) == (True, ["o-1"], "nl")
    assert judge(without_parking, both)[0] is False
    assert judge(with_parking, profile())[0] is False
    assert judge(without_parking, profile()) == (True, ["o-1"], "nl")


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ({"ticket_types": ["adult"], "rows": ["5"]}, True),
        ({"ticket_types": ["adult"], "rows": ["6"]}, False),  # each criterion matches, but on different tickets
        ({"price_ranks": ["B"], "seats": ["1"]}, True),
        ({"names": ["PEETERS"]}, True),
        ({"names": ["ann peeters"]}, True),
        ({"names": ["Bob"]}, False),
        ({"filters": ["audience:vip"]}, True),
        ({"filters": ["audience:press"]}, False),
        ({"ticket_types": [], "rows": [], "names": [], "filters": []}, True),
    ],
)
def test_selection_needs_one_ticket_matching_every_non_empty_criterion(selection, expected):
    tickets = [
        {"type": "adult", "price_rank": "A", "row": "5", "seat": "12"},
        {"type": "child", "price_rank": "B", "row": "6", "seat": "1"},
    ]
    prof = profile(order(tickets=tickets), filters=["audience:vip"])
    assert judge(message(audience={"type": "selection", "selection": selection}), prof)[0] is expected


def test_selection_with_products_needs_them_on_the_ticket_order():
    prof = profile(order(products=["parking"]), order(order_id="o-2"))
    assert judge(
        message(audience={"type": "selection", "products": ["parking"], "selection": {"ticket_types": ["adult"]}}), prof
    )[1] == ["o-1"]


def test_consent_all_needs_every_opt_in_of_the_events_set_else_the_default_set():
    everything = message(consent={"mode": "all"})
    assert judge(everything, consents=OPTED_IN)[0] is True  # default set: newsletter only
    assert (
        judge(everything, consents=OPTED_IN, event=EVENT | {"optin_set": "summer"})[0] is False
    )  # partners only pending
    assert judge(everything, consents=None)[0] is False
    assert member(everything, EVENT, profile(), OPTED_IN, {}, "en")[0] is False  # no set at all: nobody


def test_consent_select_needs_every_include_and_no_exclude():
    assert (
        judge(
            message(consent={"mode": "select", "include": ["newsletter"], "exclude": ["partners"]}), consents=OPTED_IN
        )[0]
        is True
    )
    assert (
        judge(message(consent={"mode": "select", "include": ["partners"], "exclude": []}), consents=OPTED_IN)[0]
        is False
    )
    assert (
        judge(message(consent={"mode": "select", "include": [], "exclude": ["newsletter"]}), consents=OPTED_IN)[0]
        is False
    )


def test_language_only_restricts_and_send_in_picks_the_language():
    assert judge(message(language={"only": ["en"], "send_in": "customer"}))[0] is False
    assert judge(message(language={"only": ["nl"], "send_in": "de"})) == (True, ["o-1"], "de")
    assert judge(prof=profile(order(language=None))) == (True, ["o-1"], "en")
    without_language_rules = {name: value for name, value in message().items() if name != "language"}
    assert judge(without_language_rules) == (True, ["o-1"], "nl")


def _records(
    msg=None, *, event_type="event.scheduled", message_type="message.defined", time="2026-11-20T12:00:00Z", tenant="t1"
):
    msg = msg or message()
    message_data = msg if message_type == "message.defined" else {"message": msg["message"]}
    event_data = EVENT if event_type == "event.scheduled" else {"event": "ev-1"}
    return {
        "message_record": ev(message_type, message_data, tenant=tenant, time=time),
        "event_record": ev(event_type, event_data, tenant=tenant),
    }


def _update(entry, prof=None, consents=None, cause=None, **records):
    outcome = update_membership(
        entry,
        **(records or _records()),
        profile=prof or profile(),
        consents=consents,
        optin_sets=SETS,
        default_language="en",
        cause=cause or ev("order.placed", {}),
    )
    assert_contract(outcome.outs)
    return outcome


def test_joining_publishes_a_member_record_once():
    joined = _update(None)
    [record] = joined.outs
    assert (record.topic, record.key) == (envelope.SEGMENTS_MEMBERS, "t1/msg-1/c-1")
    assert record.event["data"] == {
        "message": "msg-1",
        "contact": "c-1",
        "member": True,
        "orders": ["o-1"],
        "language": "nl",
    }
    assert _update(joined.state).outs == []


def test_a_change_of_orders_is_published_and_leaving_publishes_member_false():
    joined = _update(None)
    more = _update(joined.state, profile(order(), order(order_id="o-2")))
    assert more.outs[0].event["data"]["orders"] == ["o-1", "o-2"]
    left = _update(more.state, consents=None, **_records(message(consent={"mode": "all"})))
    assert left.outs[0].event["data"] == {
        "message": "msg-1",
        "contact": "c-1",
        "member": False,
        "orders": [],
        "language": "nl",
    }
    assert _update(left.state, **_records(message(consent={"mode": "all"}))).outs == []


def test_a_contact_who_never_was_a_member_gets_no_record():
    outcome = _update(None, profile(order(event="ev-2")))
    assert outcome.outs == [] and outcome.state is None


def test_a_cancelled_message_or_event_freezes_the_segment():
    joined = _update(None)
    leaving = profile(order(event="ev-2"))
    assert _update(joined.state, leaving, **_records(message_type="message.cancelled")).outs == []
    assert _update(joined.state, leaving, **_records(event_type="event.cancelled")).outs == []


@pytest.mark.parametrize(
    ("when", "hours", "expected"),
    [
        ("before_start", 24, STARTS - timedelta(hours=24)),
        ("after_end", 2, STARTS + timedelta(hours=4.5)),
        ("now", 24, datetime(2026, 11, 20, 12, tzinfo=UTC)),
    ],
)
def test_send_at(when, hours, expected):
    assert (
        send_at(message(send={"when": when, "hours": hours}), EVENT, datetime(2026, 11, 20, 12, tzinfo=UTC)) == expected
    )


def _due(entry, now, prof=None, **records):
    outcome = due_request(entry, **(records or _records()), profile=prof or profile(), now=now)
    assert_contract(outcome.outs)
    return outcome


def test_a_member_is_sent_the_message_once_from_its_send_time():
    entry = _update(None).state
    assert _due(entry, STARTS - timedelta(hours=25)).outs == []
    sent = _due(entry, STARTS - timedelta(hours=24))
    [request] = sent.outs
    assert (request.topic, request.key) == (envelope.OUTBOX, "t1/c-1")
    data = request.event["data"]
    assert data["request"] == request.event["id"] == audience.event_message_request_id("t1", "msg-1", "c-1")
    assert (data["kind"], data["message"], data["channel"], data["layout"], data["language"]) == (
        "event-message",
        "msg-1",
        "email",
        "event-info",
        "nl",
    )
    assert data["to"] == {"email": "ann@example.com", "phone": "+32470000000"}
    assert _due(entry, STARTS - timedelta(hours=24), profile(order(email=None))).outs == []
    assert data["vars"]["custom_text"] == "Doors open at 19:00"
    assert data["vars"]["event"]["name"] == "Hamlet" and data["vars"]["event"]["starts_at"] == EVENT["starts_at"]
    assert data["vars"]["orders"] == ["o-1"]
    assert data["vars"]["marketing"] is False
    assert _due(sent.state, STARTS - timedelta(hours=23)).outs == []


def test_an_sms_member_without_a_phone_is_sent_once_they_have_one():
    records = _records(message(channel="sms"))
    entry = _update(None, **records).state
    now = STARTS - timedelta(hours=2)
    assert _due(entry, now, profile(order(phone=None)), **records).outs == []
    assert _due(entry, now, **records).outs[0].event["data"]["to"]["phone"] == "+32470000000"


def test_a_message_filtered_on_consent_is_marked_marketing():
    records = _records(message(consent={"mode": "all"}))
    entry = _update(None, consents=OPTED_IN, **records).state
    assert _due(entry, STARTS - timedelta(hours=1), **records).outs[0].event["data"]["vars"]["marketing"] is True


def test_an_update_after_firing_does_not_send_again_to_who_got_it():
    sent = _due(_update(None).state, STARTS - timedelta(hours=24))
    updated = _records(message(custom_text="Doors open at 19:15"), time="2026-11-30T20:00:00Z")
    assert _due(sent.state, STARTS - timedelta(hours=1), **updated).outs == []
    assert (
        _update(sent.state, profile(order(), order(order_id="o-2")), **updated).state["requested"]
        == sent.state["requested"]
    )


def test_a_late_buyer_is_sent_a_before_start_message_until_the_event_starts():
    entry = _update(None).state
    assert len(_due(entry, STARTS - timedelta(minutes=5)).outs) == 1
    assert _due(entry, STARTS).outs == []


def test_nothing_is_sent_for_a_cancelled_message_or_event_or_a_non_member():
    entry = _update(None).state
    now = STARTS - timedelta(hours=2)
    assert _due(entry, now, **_records(message_type="message.cancelled")).outs == []
    assert _due(entry, now, **_records(event_type="event.cancelled")).outs == []
    assert _due(entry | {"member": False}, now).outs == []
    assert _due(None, now).outs == []


def test_after_end_messages_go_out_within_a_day_of_their_send_time():
    records = _records(message(send={"when": "after_end", "hours": 2}))
    entry = _update(None, **records).state
    send_time = STARTS + timedelta(hours=4.5)
    assert _due(entry, send_time - timedelta(minutes=1), **records).outs == []
    assert len(_due(entry, send_time + timedelta(hours=23), **records).outs) == 1
    assert _due(entry, send_time + audience.AFTER_END_WINDOW, **records).outs == []


def test_now_messages_go_out_from_their_definition_until_the_event_ends():
    records = _records(message(send={"when": "now"}), time="2026-12-01T19:00:00Z")
    entry = _update(None, **records).state
    defined = datetime(2026, 12, 1, 19, tzinfo=UTC)
    assert _due(entry, defined - timedelta(seconds=1), **records).outs == []
    assert len(_due(entry, defined + timedelta(minutes=1), **records).outs) == 1
    assert _due(entry, STARTS + timedelta(hours=2.5), **records).outs == []


def test_a_message_due_at_the_event_start_still_has_a_window():
    records = _records(message(send={"when": "before_start", "hours": 0}))
    entry = _update(None, **records).state
    assert len(_due(entry, STARTS + timedelta(minutes=10), **records).outs) == 1


def test_two_tenants_with_the_same_message_and_contact_ids_are_kept_apart():
    first = _update(None, **_records(tenant="t1"), cause=ev("order.placed", {}, tenant="t1"))
    second = _update(None, **_records(tenant="t2"), cause=ev("order.placed", {}, tenant="t2"))
    assert [out.key for out in first.outs + second.outs] == ["t1/msg-1/c-1", "t2/msg-1/c-1"]
    now = STARTS - timedelta(hours=1)
    sent_t1 = _due(first.state, now, **_records(tenant="t1")).outs[0]
    sent_t2 = _due(second.state, now, **_records(tenant="t2")).outs[0]
    assert (sent_t1.key, sent_t2.key) == ("t1/c-1", "t2/c-1")
    assert sent_t1.event["tenant"] == "t1" and sent_t2.event["tenant"] == "t2"
    assert sent_t1.event["data"]["request"] != sent_t2.event["data"]["request"]
