from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from workers.consent.tokens import (
    CONFIRM_PATH,
    ConfirmClaims,
    TokenExpired,
    TokenInvalid,
    UnsubscribeClaims,
    link,
    make_confirm_token,
    make_unsubscribe_token,
    read_confirm_token,
    read_unsubscribe_token,
)

SECRET = "test-secret"
NOW = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)
FOURTEEN_DAYS_S = timedelta(days=14).total_seconds()
CONFIRM = ConfirmClaims(tenant="t1", contact="c-42", optin="newsletter", request="req-1")
UNSUBSCRIBE = UnsubscribeClaims(tenant="t1", contact="c-42", purpose="email", request="req-9")


def test_confirm_token_gives_back_its_claims() -> None:
    token = make_confirm_token(CONFIRM, SECRET, NOW)
    assert read_confirm_token(token, SECRET, FOURTEEN_DAYS_S, NOW + timedelta(days=13)) == CONFIRM


# In the payload, the timestamp and the signature. (Not the last character: its low bits are
# base64 padding, which decoding ignores.)
@pytest.mark.parametrize("position", [0, 10, -50, -5])
def test_a_changed_character_is_tampering(position: int) -> None:
    token = make_confirm_token(CONFIRM, SECRET, NOW)
    index = position % len(token)
    swapped = "A" if token[index] != "A" else "B"
    tampered = token[:index] + swapped + token[index + 1 :]
    with pytest.raises(TokenInvalid):
        read_confirm_token(tampered, SECRET, FOURTEEN_DAYS_S, NOW)


def test_a_token_signed_with_another_secret_is_invalid() -> None:
    token = make_confirm_token(CONFIRM, "another-secret", NOW)
    with pytest.raises(TokenInvalid):
        read_confirm_token(token, SECRET, FOURTEEN_DAYS_S, NOW)


def test_garbage_is_invalid_not_expired() -> None:
    with pytest.raises(TokenInvalid):
        read_confirm_token("not-a-token", SECRET, FOURTEEN_DAYS_S, NOW)


def test_confirm_token_expires_after_its_max_age_including_fractional_days() -> None:
    token = make_confirm_token(CONFIRM, SECRET, NOW)
    max_age = timedelta(days=1.5).total_seconds()
    assert read_confirm_token(token, SECRET, max_age, NOW + timedelta(hours=35)) == CONFIRM
    with pytest.raises(TokenExpired):
        read_confirm_token(token, SECRET, max_age, NOW + timedelta(hours=37))


def test_expired_is_distinct_from_invalid() -> None:
    token = make_confirm_token(CONFIRM, SECRET, NOW)
    with pytest.raises(TokenExpired) as caught:
        read_confirm_token(token, SECRET, FOURTEEN_DAYS_S, NOW + timedelta(days=15))
    assert not isinstance(caught.value, TokenInvalid)


def test_a_confirm_token_is_not_an_unsubscribe_token_and_back() -> None:
    confirm = make_confirm_token(CONFIRM, SECRET, NOW)
    unsubscribe = make_unsubscribe_token(UNSUBSCRIBE, SECRET, NOW)
    with pytest.raises(TokenInvalid):
        read_unsubscribe_token(confirm, SECRET, None, NOW)
    with pytest.raises(TokenInvalid):
        read_confirm_token(unsubscribe, SECRET, FOURTEEN_DAYS_S, NOW)


def test_unsubscribe_token_without_max_age_keeps_working() -> None:
    token = make_unsubscribe_token(UNSUBSCRIBE, SECRET, NOW)
    assert read_unsubscribe_token(token, SECRET, None, NOW + timedelta(days=3650)) == UNSUBSCRIBE


def test_unsubscribe_token_with_max_age_expires() -> None:
    token = make_unsubscribe_token(UNSUBSCRIBE, SECRET, NOW)
    with pytest.raises(TokenExpired):
        read_unsubscribe_token(token, SECRET, 60, NOW + timedelta(minutes=2))


def test_tokens_are_bound_to_every_claim() -> None:
    other_tenant = ConfirmClaims(tenant="t2", contact="c-42", optin="newsletter", request="req-1")
    assert make_confirm_token(CONFIRM, SECRET, NOW) != make_confirm_token(other_tenant, SECRET, NOW)
    token = make_confirm_token(other_tenant, SECRET, NOW)
    assert read_confirm_token(token, SECRET, FOURTEEN_DAYS_S, NOW).tenant == "t2"


def test_link_carries_the_token_in_the_query() -> None:
    token = make_confirm_token(CONFIRM, SECRET, NOW)
    url = link("https://usher.venue.example/", CONFIRM_PATH, token)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "usher.venue.example", "/doi/confirm")
    assert read_confirm_token(parse_qs(parts.query)["token"][0], SECRET, FOURTEEN_DAYS_S, NOW) == CONFIRM


def test_minted_tokens_are_what_itsdangerous_makes_and_reads() -> None:
    """Tokens are minted with a cached serializer and signer and never compressed; each must be
    exactly the token a fresh `URLSafeTimedSerializer` stamped at the same moment makes when it
    does not compress, and one that it reads back when it would have."""
    import random
    from dataclasses import astuple

    from workers.consent.tokens import _CONFIRM_SALT, _UNSUBSCRIBE_SALT, _serializer

    rng = random.Random(5)
    start = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)
    compressible = 0
    for number in range(300):
        now = start + timedelta(seconds=rng.randrange(10**8), microseconds=rng.randrange(10**6))
        secret = rng.choice(["test-secret", "another-secret", "s" * 64])
        long_id = "x" * rng.randrange(1, 120)  # long enough for itsdangerous to compress
        if number % 7 == 0:
            long_id += ' é"\\\n\x01\u2028'  # what JSON escapes, and text that is not ASCII
        claims = (ConfirmClaims(f"t{number}", f"c-{number}", rng.choice(["newsletter", "sms-alerts"]), long_id),
                  UnsubscribeClaims(f"t{number}", f"c-{number}", rng.choice(["email", "sms"]), long_id))
        for claim, salt, make in zip(claims, (_CONFIRM_SALT, _UNSUBSCRIBE_SALT), (make_confirm_token, make_unsubscribe_token)):
            token = make(claim, secret, now)
            assert not token.startswith(".")  # itsdangerous marks a compressed payload so
            reference = _serializer(secret, salt, now)
            assert reference.loads(token) == list(astuple(claim))
            if reference.dumps(list(astuple(claim))).startswith("."):
                compressible += 1
            else:
                assert token == reference.dumps(list(astuple(claim)))
        assert read_confirm_token(make_confirm_token(claims[0], secret, now), secret, None, now) == claims[0]
    assert 0 < compressible < 600  # both kinds of payload were compared
