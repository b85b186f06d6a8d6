from workers import envelope
from workers.segments import family

from .helpers import SETTINGS, Stage, ev, order

ANN_LINKS_BOB = {
    "contact": "c-1",
    "channel": "web",
    "email": "bob@example.com",
    "first_name": "Bob",
    "last_name": "Peeters",
}


def _stage_with_ann(tenant: str = "t1") -> Stage:
    stage = Stage()
    stage.place(order(tenant=tenant))
    return stage


def test_linking_a_new_email_creates_the_child_contact_and_mails_it():
    stage = _stage_with_ann()
    command = stage.command("contact.link", ANN_LINKS_BOB)

    bob = family.new_contact_id("t1", "bob@example.com")
    assert stage.replies() == [{"request": command["id"], "ok": True, "linked": bob, "created": True}]
    assert stage.produced[envelope.CONTACTS_REPLIES][0].key == "t1/c-1"
    assert stage.profile("t1", "c-1")["links"] == {"children": [bob], "parents": []}
    child = stage.profile("t1", bob)
    assert (child["email"], child["first_name"], child["last_name"], child["language"]) == (
        "bob@example.com",
        "Bob",
        "Peeters",
        "nl",
    )
    assert child["links"] == {"children": [], "parents": ["c-1"]}
    [mail] = stage.produced[envelope.OUTBOX]
    assert mail.key == f"t1/{bob}"
    data = mail.event["data"]
    assert (data["kind"], data["contact"], data["to"]["email"], data["language"], data["message"]) == (
        "account-created",
        bob,
        "bob@example.com",
        "nl",
        None,
    )
    assert data["vars"]["parent_first_name"] == "Ann"
    assert data["request"] == mail.event["id"]


def test_the_created_contact_id_is_a_valid_id_and_the_same_for_the_same_email():
    created = family.new_contact_id("t1", "Bob@Example.com")
    assert created == family.new_contact_id("t1", "bob@example.com")
    assert created != family.new_contact_id("t2", "bob@example.com")
    assert envelope.ID_PATTERN.match(created)


def test_linking_an_existing_contact_needs_matching_names_ignoring_case_and_accents():
    stage = _stage_with_ann()
    stage.place(order("c-77", "o-9", email="zoe@example.com", first_name="Zoë", last_name="Éluard"))
    command = stage.command(
        "contact.link", ANN_LINKS_BOB | {"email": "ZOE@example.com", "first_name": "zoe", "last_name": " eluard"}
    )

    assert stage.replies() == [{"request": command["id"], "ok": True, "linked": "c-77", "created": False}]
    assert stage.profile("t1", "c-77")["links"]["parents"] == ["c-1"]
    assert stage.produced[envelope.OUTBOX] == []


def test_linking_an_existing_email_under_another_name_is_refused_with_the_contract_message():
    stage = _stage_with_ann()
    stage.place(order("c-77", "o-9", email="zoe@example.com", first_name="Zoë", last_name="Éluard"))
    command = stage.command(
        "contact.link", ANN_LINKS_BOB | {"email": "zoe@example.com", "first_name": "Zoë", "last_name": "Peeters"}
    )

    assert stage.replies() == [
        {
            "request": command["id"],
            "ok": False,
            "error": "email_in_use_name_mismatch",
            "message": "This e-mail address is already in use and does not match the name entered.",
        }
    ]
    assert stage.profile("t1", "c-1")["links"]["children"] == []
    assert stage.profile("t1", "c-77")["links"]["parents"] == []


def test_linking_on_a_channel_without_friends_and_family_is_refused():
    stage = _stage_with_ann()
    stage.command("contact.link", ANN_LINKS_BOB | {"channel": "box-office"})
    assert [r["error"] for r in stage.replies()] == ["friends_family_disabled"]
    assert (
        family.request_link(stage.contacts["t1/c-1"], ev("contact.link", ANN_LINKS_BOB), None)
        .outs[0]
        .event["data"]["error"]
        == "friends_family_disabled"
    )


def test_linking_yourself_is_refused():
    stage = _stage_with_ann()
    stage.command("contact.link", ANN_LINKS_BOB | {"email": "ANN@example.com", "first_name": "Ann"})
    assert [r["error"] for r in stage.replies()] == ["self_link"]


def test_linking_the_same_contact_twice_is_refused_the_second_time():
    stage = _stage_with_ann()
    stage.command("contact.link", ANN_LINKS_BOB)
    stage.command("contact.link", ANN_LINKS_BOB | {"first_name": "BOB"})
    assert [r["ok"] for r in stage.replies()] == [True, False]
    assert stage.replies()[1]["error"] == "already_linked"
    assert len(stage.produced[envelope.OUTBOX]) == 1


def test_an_unknown_requester_is_refused():
    stage = Stage()
    stage.command("contact.link", ANN_LINKS_BOB)
    assert [r["error"] for r in stage.replies()] == ["unknown_contact"]


def test_unlinking_removes_the_link_on_both_sides():
    stage = _stage_with_ann()
    stage.command("contact.link", ANN_LINKS_BOB)
    bob = family.new_contact_id("t1", "bob@example.com")
    command = stage.command("contact.unlink", {"contact": "c-1", "other": bob})

    assert stage.replies()[-1] == {"request": command["id"], "ok": True, "unlinked": bob}
    assert stage.profile("t1", "c-1")["links"] == {"children": [], "parents": []}
    assert stage.profile("t1", bob)["links"] == {"children": [], "parents": []}


def test_a_child_may_drop_its_parent():
    stage = _stage_with_ann()
    stage.command("contact.link", ANN_LINKS_BOB)
    bob = family.new_contact_id("t1", "bob@example.com")
    stage.command("contact.unlink", {"contact": bob, "other": "c-1"})
    assert stage.profile("t1", "c-1")["links"]["children"] == []


def test_unlinking_a_contact_that_is_not_linked_is_refused():
    stage = _stage_with_ann()
    stage.command("contact.unlink", {"contact": "c-1", "other": "c-2"})
    assert [r["error"] for r in stage.replies()] == ["unknown_contact"]


def test_a_repeated_lookup_repeats_its_outputs_exactly():
    stage = _stage_with_ann()
    request = family.request_link(stage.contacts["t1/c-1"], ev("contact.link", ANN_LINKS_BOB), SETTINGS)
    [lookup] = request.outs
    first = family.apply_email_index(None, lookup.event)
    again = family.apply_email_index(first.state, lookup.event)
    assert again.outs == first.outs
    assert again.outs[0].event["data"]["created"] is True


def test_a_contact_that_changed_email_is_no_longer_found_by_the_old_one():
    stage = _stage_with_ann()
    stage.place(order("c-77", "o-9", email="bob@example.com", first_name="Bob", last_name="Peeters"))
    stage.send(
        "t1/c-77", ev("contact.update", {"contact": "c-77", "email": "bob@new.example"}, time="2026-11-10T00:00:00Z")
    )
    stage.command("contact.link", ANN_LINKS_BOB)
    assert stage.replies()[-1]["linked"] == family.new_contact_id("t1", "bob@example.com")
    assert stage.emails["t1/bob@new.example"]["holders"][0]["contact"] == "c-77"


def test_two_tenants_with_the_same_contacts_and_emails_are_kept_apart():
    stage = _stage_with_ann("t1")
    stage.place(order("c-77", "o-9", tenant="t1", email="bob@example.com", first_name="Bob", last_name="Peeters"))
    stage.place(order(tenant="t2"))
    command = stage.command("contact.link", ANN_LINKS_BOB, tenant="t2")

    bob_in_t2 = family.new_contact_id("t2", "bob@example.com")
    assert stage.replies() == [{"request": command["id"], "ok": True, "linked": bob_in_t2, "created": True}]
    assert stage.profile("t2", "c-1")["links"]["children"] == [bob_in_t2]
    assert stage.profile("t1", "c-1")["links"]["children"] == []
    assert stage.profile("t1", "c-77")["links"]["parents"] == []
    assert {out.event["tenant"] for topic in stage.produced.values() for out in topic if out.key.startswith("t2/")} == {
        "t2"
    }
    assert stage.emails["t2/bob@example.com"]["holders"][0]["contact"] == bob_in_t2


def test_the_account_mail_of_a_requester_without_language_is_in_the_tenant_default_language():
    stage = Stage()
    stage.place(order(language=None))
    stage.command("contact.link", ANN_LINKS_BOB)
    [mail] = stage.produced[envelope.OUTBOX]
    assert mail.event["data"]["language"] == SETTINGS["default_language"]
