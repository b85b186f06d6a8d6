"""The consent stage against the real (embedded) broker: the paths of issue 4's "Done when"."""
from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from harness import Kafka, http, unique

from workers import envelope
from workers.consent.tokens import ConfirmClaims, UnsubscribeClaims, make_confirm_token, make_unsubscribe_token


def statuses_are(**expected: str) -> Callable[[dict[str, str]], bool]:
    """For `consent.statuses`: the contact's statuses are exactly these."""
    return lambda statuses: statuses == expected


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


def web_commands(kafka: Kafka, tenant: str, type_: str) -> list[dict]:
    return [e for e in kafka.events(envelope.COMMANDS, tenant, type_) if e["source"] == "/usher/consent/web"]


def test_single_opt_in_records_each_answer_with_its_evidence(consent, tenant: str) -> None:
    consent.configure(tenant, double_opt_in=False)
    placed = consent.order(tenant, "c-1", {"newsletter": True, "partners": False})

    changes = {c["optin"]: c for c in consent.changes(tenant, "c-1", 2)}
    assert changes["newsletter"] == {
        "contact": "c-1", "optin": "newsletter", "from": "unknown", "to": "opted_in", "method": "checkout",
        "channel": "web", "ip": "203.0.113.7", "user_agent": "Shop/1.0", "user": None, "note": None,
        "at": envelope.isotime(envelope.parse_time(placed["time"])),
        "evidence": {"order": placed["data"]["order"], "text_shown": "Text of newsletter", "version": 1, "prechecked": False},
    }
    assert (changes["partners"]["from"], changes["partners"]["to"]) == ("unknown", "opted_out")
    consent.statuses(tenant, "c-1", statuses_are(newsletter="opted_in", partners="opted_out"))
    # Single opt-in asks for no confirmation (the mail would have gone out with the changes).
    assert consent.of_contact(envelope.OUTBOX, tenant, "c-1", "message.requested") == []


def test_double_opt_in_is_confirmed_only_by_the_pages_post(consent, kafka: Kafka, tenant: str) -> None:
    consent.configure(tenant, double_opt_in=True)
    placed = consent.order(tenant, "c-1", {"newsletter": True, "partners": True})

    # Double opt-in applies to the newsletter only; partners goes straight in.
    consent.statuses(tenant, "c-1", statuses_are(newsletter="pending", partners="opted_in"))
    [mail] = consent.mails(tenant, "c-1", 1)
    assert (mail["kind"], mail["layout"], mail["channel"], mail["language"]) == ("doi-confirmation", "doi-confirmation", "email", "nl")
    assert mail["to"] == {"email": "c-1@example.com"}
    confirm_url = mail["vars"]["confirm_url"]
    assert confirm_url.startswith(f"{consent.worker.url}/doi/confirm?token=")

    # Step one: the link shows the question and one button, in the contact's language, and confirms nothing.
    status, page, headers = http("GET", confirm_url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert '<html lang="nl">' in page and "Stuur mij de nieuwsbrief" in page
    assert '<form method="post" action="/doi/confirm">' in page and '<button type="submit">' in page
    assert web_commands(kafka, tenant, "consent.confirm") == []

    # Step two: the form's POST confirms, with the click's IP and user agent.
    form = f"token={quote(token_of(confirm_url))}".encode()
    status, page, _ = http("POST", f"{consent.worker.url}/doi/confirm", form=form, headers={"User-Agent": "Browser/2"})
    assert status == 200 and '<html lang="nl">' in page
    consent.statuses(tenant, "c-1", statuses_are(newsletter="opted_in", partners="opted_in"))
    confirmed = consent.changes(tenant, "c-1", 3)[-1]
    assert {k: confirmed[k] for k in ("optin", "from", "to", "method", "channel", "ip", "user_agent")} == {
        "optin": "newsletter", "from": "pending", "to": "opted_in", "method": "doi-confirmation",
        "channel": "email-link", "ip": "127.0.0.1", "user_agent": "Browser/2",
    }
    assert confirmed["evidence"]["request"] == mail["request"]
    assert confirmed["evidence"]["order"] == placed["data"]["order"]

    # The used link now says so, on both steps, and publishes nothing more.
    assert http("POST", f"{consent.worker.url}/doi/confirm", form=form)[0] == 409
    assert http("GET", confirm_url)[0] == 409
    assert len(web_commands(kafka, tenant, "consent.confirm")) == 1


def test_tampered_and_expired_links_change_nothing(consent, kafka: Kafka, tenant: str) -> None:
    now = envelope.utcnow()
    claims = ConfirmClaims(tenant, "c-1", "newsletter", "req-1")
    good = make_confirm_token(claims, consent.secret, now)
    tampered = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    other_secret = make_confirm_token(claims, "another-secret", now)
    # Default settings: a confirmation link is valid for 14 days.
    expired = make_confirm_token(claims, consent.secret, now - timedelta(days=15))
    unsubscribe = make_unsubscribe_token(UnsubscribeClaims(tenant, "c-1", "email", "req-2"), consent.secret, now)
    url = consent.worker.url

    for token, status in ((tampered, 400), (other_secret, 400), (expired, 410)):
        got, page, _ = http("GET", f"{url}/doi/confirm?token={quote(token)}", headers={"Accept-Language": "de-DE,de;q=0.9"})
        assert got == status and '<html lang="de">' in page and "<form" not in page
        assert http("POST", f"{url}/doi/confirm", form=f"token={quote(token)}".encode())[0] == status
    assert http("POST", f"{url}/unsubscribe?token={quote(unsubscribe[:-2])}", form=b"List-Unsubscribe=One-Click")[0] == 400
    assert http("GET", f"{url}/doi/confirm")[0] == 400
    assert kafka.events(envelope.COMMANDS, tenant) == []


def test_manual_and_bulk_changes_give_each_contact_its_own_logged_change(consent, tenant: str) -> None:
    manual = consent.command(tenant, "consent.set", {
        "contact": "c-1", "optin": "newsletter", "status": "opted_in", "reason": "asked by phone", "user": "jan",
        "channel": "back-office", "ip": "198.51.100.4"})
    [change] = consent.changes(tenant, "c-1", 1)
    assert {k: change[k] for k in ("from", "to", "method", "note", "user", "channel", "ip")} == {
        "from": "unknown", "to": "opted_in", "method": "manual", "note": "asked by phone", "user": "jan",
        "channel": "back-office", "ip": "198.51.100.4"}
    assert change["at"] == envelope.isotime(envelope.parse_time(manual["time"]))

    # A list: more contacts than partitions, so some share one, and each still gets its change.
    listed = [f"b-{n}" for n in range(6)]
    bulk = consent.command(tenant, "consent.bulk-set", {
        "contacts": listed, "optin": "newsletter", "status": "opted_out", "reason": "cleanup", "user": "jan",
        "channel": "back-office"}, key=f"{tenant}/~bulk/{unique('bulk')}")
    for contact in listed:
        [change] = consent.changes(tenant, contact, 1)
        assert (change["to"], change["method"], change["note"], change["evidence"]["bulk"]) == ("opted_out", "bulk", "cleanup", bulk["id"])
        consent.statuses(tenant, contact, statuses_are(newsletter="opted_out"))

    # A segment: its members as segments.members holds them now (s-3 left; s-4 is in another message's).
    members = [("msg-1", "s-1", True), ("msg-1", "s-2", True), ("msg-1", "s-3", True), ("msg-1", "s-3", False), ("msg-2", "s-4", True)]
    consent.publish_and_wait([
        (envelope.SEGMENTS_MEMBERS, f"{tenant}/{message}/{contact}", envelope.make_event(
            "segment.member", tenant, {"message": message, "contact": contact, "member": member, "orders": [], "language": "en"}, source="/tests"))
        for message, contact, member in members
    ])
    by_segment = consent.command(tenant, "consent.bulk-set", {"segment": "msg-1", "optin": "newsletter", "status": "opted_in"},
                                 key=f"{tenant}/~bulk/{unique('bulk')}")
    for contact in ("s-1", "s-2"):
        [change] = consent.changes(tenant, contact, 1)
        assert (change["optin"], change["to"], change["evidence"]["bulk"]) == ("newsletter", "opted_in", by_segment["id"])
    # A later bulk for the others reaches them after anything the first one sent them.
    later = consent.command(tenant, "consent.bulk-set", {"contacts": ["s-3", "s-4"], "optin": "partners", "status": "opted_in"},
                            key=f"{tenant}/~bulk/{unique('bulk')}")
    for contact in ("s-3", "s-4"):
        [change] = consent.changes(tenant, contact, 1)
        assert (change["optin"], change["evidence"]["bulk"]) == ("partners", later["id"])


def test_revoke_and_one_click_unsubscribe_opt_out_at_once(consent, kafka: Kafka, tenant: str) -> None:
    consent.configure(tenant, double_opt_in=False)
    consent.order(tenant, "c-1", {"newsletter": True, "partners": True, "sms-alerts": True})
    consent.statuses(tenant, "c-1", statuses_are(newsletter="opted_in", partners="opted_in", **{"sms-alerts": "opted_in"}))

    consent.command(tenant, "consent.revoke", {"contact": "c-1", "optin": "partners", "channel": "portal", "ip": "198.51.100.7", "user_agent": "Portal/1"})
    revoked = consent.changes(tenant, "c-1", 4)[-1]
    assert {k: revoked[k] for k in ("optin", "from", "to", "method", "channel", "ip", "user_agent")} == {
        "optin": "partners", "from": "opted_in", "to": "opted_out", "method": "revoke", "channel": "portal",
        "ip": "198.51.100.7", "user_agent": "Portal/1"}

    token = make_unsubscribe_token(UnsubscribeClaims(tenant, "c-1", "email", "req-news-1"), consent.secret, envelope.utcnow())
    link = f"{consent.worker.url}/unsubscribe?token={quote(token)}"
    status, page, _ = http("GET", link)
    assert status == 200 and '<html lang="nl">' in page and 'name="List-Unsubscribe" value="One-Click"' in page
    assert web_commands(kafka, tenant, "consent.revoke") == []

    # RFC 8058: what a mail client POSTs for the List-Unsubscribe header; every e-mail opt-in goes.
    status, page, _ = http("POST", link, form=b"List-Unsubscribe=One-Click", headers={"User-Agent": "Mail/1"})
    assert status == 200 and '<html lang="nl">' in page
    consent.statuses(tenant, "c-1", statuses_are(newsletter="opted_out", partners="opted_out", **{"sms-alerts": "opted_in"}))
    unsubscribed = consent.changes(tenant, "c-1", 5)[-1]
    assert {k: unsubscribed[k] for k in ("optin", "to", "method", "channel", "ip", "user_agent")} == {
        "optin": "newsletter", "to": "opted_out", "method": "revoke", "channel": "email-link", "ip": "127.0.0.1",
        "user_agent": "Mail/1"}
    assert unsubscribed["evidence"]["request"] == "req-news-1"


def test_replayed_and_out_of_order_records_change_nothing(consent, kafka: Kafka, tenant: str) -> None:
    start = envelope.utcnow()

    def moment(minutes: int) -> str:
        return envelope.isotime(start + timedelta(minutes=minutes))

    placed = consent.order(tenant, "c-1", {"newsletter": True}, at=moment(0))
    kafka.send(envelope.ORDERS, f"{tenant}/c-1", placed)
    consent.order(tenant, "c-1", {"newsletter": False}, at=moment(-120))
    consent.order(tenant, "c-1", {"partners": True}, at=moment(5))
    # Each topic in its own order: the last record of each shows the ones before it were handled.
    assert [(c["optin"], c["to"]) for c in consent.changes(tenant, "c-1", 2)] == [("newsletter", "opted_in"), ("partners", "opted_in")]

    opt_out = consent.command(tenant, "consent.set", {"contact": "c-1", "optin": "newsletter", "status": "opted_out"}, at=moment(10))
    kafka.send(envelope.COMMANDS, f"{tenant}/c-1", opt_out)
    consent.command(tenant, "consent.set", {"contact": "c-1", "optin": "newsletter", "status": "opted_in"}, at=moment(1))
    consent.command(tenant, "consent.set", {"contact": "c-1", "optin": "partners", "status": "opted_out"}, at=moment(15))
    changes = consent.changes(tenant, "c-1", 4)
    assert [(c["optin"], c["to"], c["at"]) for c in changes] == [
        ("newsletter", "opted_in", moment(0)), ("partners", "opted_in", moment(5)),
        ("newsletter", "opted_out", moment(10)), ("partners", "opted_out", moment(15))]
    assert len(consent.of_contact(envelope.CONSENT_LOG, tenant, "c-1", "consent.changed")) == 4


def test_two_tenants_with_the_same_contact_id_are_kept_apart(consent, tenant: str) -> None:
    other = unique("t")
    consent.configure(tenant, double_opt_in=True)
    consent.order(tenant, "c-1", {"newsletter": True})
    consent.order(other, "c-1", {"newsletter": True})
    consent.statuses(tenant, "c-1", statuses_are(newsletter="pending"))
    consent.statuses(other, "c-1", statuses_are(newsletter="opted_in"))

    consent.command(other, "consent.revoke", {"contact": "c-1", "optin": "newsletter", "channel": "portal"})
    consent.statuses(other, "c-1", statuses_are(newsletter="opted_out"))
    assert [c["to"] for c in consent.changes(tenant, "c-1", 1)] == ["pending"]
    assert len(consent.mails(tenant, "c-1", 1)) == 1
    assert consent.of_contact(envelope.OUTBOX, other, "c-1", "message.requested") == []


def test_consents_and_proof_answer_the_tenant_only(consent, api_tokens: dict[str, str]) -> None:
    tenant, contact = "auth1", unique("c")
    # An opt-in of this test's own, so another test's settings for this shared tenant cannot apply.
    optin = unique("news")
    consent.order(tenant, contact, {optin: True})
    consent.changes(tenant, contact, 1)  # orders and commands are separate topics: keep them in order
    consent.command(tenant, "consent.set", {"contact": contact, "optin": optin, "status": "opted_out",
                                            "reason": "said so at the desk", "user": "jan", "channel": "box-office"})
    logged = consent.changes(tenant, contact, 2)
    base = f"{consent.worker.url}/v1/contacts/{tenant}/{contact}"
    token = api_tokens[tenant]

    status, body, _ = http("GET", f"{base}/consents", token=token)
    assert status == 200
    assert body["contact"] == contact
    entry = body["optins"][optin]
    assert (entry["status"], entry["method"], entry["note"], entry["user"], entry["channel"]) == (
        "opted_out", "manual", "said so at the desk", "jan", "box-office")

    status, body, _ = http("GET", f"{base}/consents/proof", token=token)
    assert (status, body) == (200, {"contact": contact, "changes": logged})

    status, text, headers = http("GET", f"{base}/consents/proof?format=csv", token=token)
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["optin"], r["from"], r["to"], r["method"], r["note"]) for r in rows] == [
        (optin, "unknown", "opted_in", "checkout", ""), (optin, "opted_in", "opted_out", "manual", "said so at the desk")]
    assert rows[0]["evidence.text_shown"] == f"Text of {optin}" and rows[0]["at"] == logged[0]["at"]

    status, body, _ = http("GET", f"{consent.worker.url}/v1/contacts/{tenant}/{unique('c')}/consents", token=token)
    assert status == 200 and body["optins"] == {}
    for path in ("consents", "consents/proof"):
        assert http("GET", f"{base}/{path}")[0] == 401
        assert http("GET", f"{base}/{path}", token="not-a-token")[0] == 401
        status, body, _ = http("GET", f"{base}/{path}", token=api_tokens["auth2"])
        assert status == 403 and body["error"] == "forbidden"


def test_reminders_then_expiry_follow_the_clock_across_restarts(moved_clock, tenant: str) -> None:
    """Each restart moves the worker's clock days ahead: the due reminders and the expiry live in
    its tables, not in the process."""
    consent = moved_clock.restart(days_ahead=0)
    consent.configure(tenant, double_opt_in=True)
    consent.order(tenant, "c-1", {"newsletter": True})
    [confirmation] = consent.mails(tenant, "c-1", 1)

    for days, mails in ((3.1, 2), (6.2, 3)):
        consent = moved_clock.restart(days_ahead=days)
        reminder = consent.mails(tenant, "c-1", mails)[-1]
        assert (reminder["kind"], reminder["layout"]) == ("doi-reminder", "doi-reminder")
        assert reminder["request"] != confirmation["request"]

    # At most two reminders; after 14 days the answer expires, and its links with it.
    consent = moved_clock.restart(days_ahead=14.1)
    expired = consent.changes(tenant, "c-1", 2)[-1]
    assert (expired["from"], expired["to"], expired["method"]) == ("pending", "expired", "doi-expired")
    consent.statuses(tenant, "c-1", statuses_are(newsletter="expired"))
    assert len(consent.mails(tenant, "c-1", 3)) == 3
    for link in (confirmation["vars"]["confirm_url"], reminder["vars"]["confirm_url"]):
        assert http("GET", link)[0] == 410
        assert http("POST", f"{consent.worker.url}/doi/confirm", form=f"token={quote(token_of(link))}".encode())[0] == 410

    # The next checkout asks again.
    consent.order(tenant, "c-1", {"newsletter": True}, at=envelope.isotime(envelope.utcnow() + timedelta(days=14.1)))
    assert consent.changes(tenant, "c-1", 3)[-1]["to"] == "pending"
    assert consent.mails(tenant, "c-1", 4)[-1]["kind"] == "doi-confirmation"


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_the_proof_holds_every_change_once_across_restarts(moved_clock, tenant: str, store: str) -> None:
    """The history is recovered from consent.log after each restart; with RocksDB, recovery reads
    again records the worker had stored as it made them."""
    env = {"USHER_STORE": store, "USHER_API_TOKENS": f"{tenant}=proof-token"}
    consent = moved_clock.restart(**env)
    consent.configure(tenant, double_opt_in=False)
    consent.order(tenant, "c-1", {"newsletter": True, "partners": False})
    consent.changes(tenant, "c-1", 2)

    consent = moved_clock.restart(**env)
    consent.command(tenant, "consent.revoke", {"contact": "c-1", "optin": "newsletter", "channel": "portal"})
    logged = consent.changes(tenant, "c-1", 3)
    assert [(c["optin"], c["to"]) for c in logged] == [("newsletter", "opted_in"), ("partners", "opted_out"), ("newsletter", "opted_out")]

    for _ in range(2):
        consent = moved_clock.restart(**env)
        status, body, _ = http("GET", f"{consent.worker.url}/v1/contacts/{tenant}/c-1/consents/proof", token="proof-token")
        assert (status, body) == (200, {"contact": "c-1", "changes": logged})
