"""The customer pages of the consent stage, rendered as plain, accessible HTML.

Rendering is pure: a page is computed from its arguments only, so showing the confirmation page
(GET) can never confirm anything; only the POST of its one form does, in the web handler.
Pages are in English, Dutch, German or Norwegian (Bokmål), falling back to English. They carry
no advertising: German case law treats even a slogan on a double opt-in page as advertising.
"""
from __future__ import annotations

from dataclasses import dataclass

from jinja2 import DictLoader, Environment, StrictUndefined

from workers.consent.rules import EXPIRED, USED
from workers.consent.tokens import CONFIRM_PATH, UNSUBSCRIBE_PATH, link

INVALID = "invalid"

LANGUAGES = ("en", "nl", "de", "no")
# Norwegian comes as "no", or as its written forms Bokmål and Nynorsk.
_ALIASES = {"nb": "no", "nn": "no"}

# HTTP status of each page that refuses a link.
PROBLEM_STATUS = {INVALID: 400, USED: 409, EXPIRED: 410}

_TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "confirm_title": "Confirm your subscription",
        "confirm_intro": "Please confirm that you want to receive this from us:",
        "confirm_hint": "Nothing is confirmed until you press the button.",
        "confirm_button": "Yes, confirm",
        "confirmed_title": "Subscription confirmed",
        "confirmed_body": "Thank you. Your subscription is confirmed. "
        "You can unsubscribe at any time with the link in each message.",
        "invalid_title": "Link not valid",
        "invalid_body": "This link is not valid. "
        "Please open the link exactly as it appears in the message you received.",
        "expired_title": "Link expired",
        "expired_body": "This link has expired, so nothing was changed. "
        "You can sign up again the next time you order tickets.",
        "used_title": "Already confirmed",
        "used_body": "This link has already been used. There is nothing more to do.",
        "unsubscribe_title": "Unsubscribe",
        "unsubscribe_email": "Press the button to stop receiving marketing e-mails from us.",
        "unsubscribe_sms": "Press the button to stop receiving marketing text messages from us.",
        "unsubscribe_button": "Unsubscribe",
        "unsubscribed_title": "You are unsubscribed",
        "unsubscribed_email": "You will no longer receive marketing e-mails from us.",
        "unsubscribed_sms": "You will no longer receive marketing text messages from us.",
    },
    "nl": {
        "confirm_title": "Bevestig je inschrijving",
        "confirm_intro": "Bevestig dat je dit van ons wilt ontvangen:",
        "confirm_hint": "Er wordt pas iets bevestigd als je op de knop drukt.",
        "confirm_button": "Ja, bevestigen",
        "confirmed_title": "Inschrijving bevestigd",
        "confirmed_body": "Bedankt. Je inschrijving is bevestigd. "
        "Je kunt je altijd uitschrijven via de link in elk bericht.",
        "invalid_title": "Ongeldige link",
        "invalid_body": "Deze link is niet geldig. Open de link precies zoals hij in het ontvangen bericht staat.",
        "expired_title": "Link verlopen",
        "expired_body": "Deze link is verlopen, er is dus niets gewijzigd. "
        "Bij je volgende bestelling kun je je opnieuw inschrijven.",
        "used_title": "Al bevestigd",
        "used_body": "Deze link is al gebruikt. Je hoeft niets meer te doen.",
        "unsubscribe_title": "Uitschrijven",
        "unsubscribe_email": "Druk op de knop om geen marketing-e-mails meer van ons te ontvangen.",
        "unsubscribe_sms": "Druk op de knop om geen marketing-sms'jes meer van ons te ontvangen.",
        "unsubscribe_button": "Uitschrijven",
        "unsubscribed_title": "Je bent uitgeschreven",
        "unsubscribed_email": "Je ontvangt geen marketing-e-mails meer van ons.",
        "unsubscribed_sms": "Je ontvangt geen marketing-sms'jes meer van ons.",
    },
    "de": {
        "confirm_title": "Anmeldung bestätigen",
        "confirm_intro": "Bitte bestätigen Sie, dass Sie Folgendes von uns erhalten möchten:",
        "confirm_hint": "Erst mit einem Klick auf die Schaltfläche wird etwas bestätigt.",
        "confirm_button": "Ja, bestätigen",
        "confirmed_title": "Anmeldung bestätigt",
        "confirmed_body": "Vielen Dank. Ihre Anmeldung ist bestätigt. "
        "Sie können sich jederzeit über den Link in jeder Nachricht abmelden.",
        "invalid_title": "Ungültiger Link",
        "invalid_body": "Dieser Link ist ungültig. Bitte öffnen Sie den Link genau so, wie er in der Nachricht steht.",
        "expired_title": "Link abgelaufen",
        "expired_body": "Dieser Link ist abgelaufen, es wurde also nichts geändert. "
        "Bei Ihrer nächsten Bestellung können Sie sich erneut anmelden.",
        "used_title": "Bereits bestätigt",
        "used_body": "Dieser Link wurde bereits verwendet. Sie müssen nichts weiter tun.",
        "unsubscribe_title": "Abmelden",
        "unsubscribe_email": "Klicken Sie auf die Schaltfläche, um keine Werbe-E-Mails mehr von uns zu erhalten.",
        "unsubscribe_sms": "Klicken Sie auf die Schaltfläche, um keine Werbe-SMS mehr von uns zu erhalten.",
        "unsubscribe_button": "Abmelden",
        "unsubscribed_title": "Sie sind abgemeldet",
        "unsubscribed_email": "Sie erhalten keine Werbe-E-Mails mehr von uns.",
        "unsubscribed_sms": "Sie erhalten keine Werbe-SMS mehr von uns.",
    },
    "no": {
        "confirm_title": "Bekreft påmeldingen",
        "confirm_intro": "Bekreft at du ønsker å motta dette fra oss:",
        "confirm_hint": "Ingenting blir bekreftet før du trykker på knappen.",
        "confirm_button": "Ja, bekreft",
        "confirmed_title": "Påmeldingen er bekreftet",
        "confirmed_body": "Takk. Påmeldingen din er bekreftet. "
        "Du kan når som helst melde deg av med lenken i hver melding.",
        "invalid_title": "Ugyldig lenke",
        "invalid_body": "Denne lenken er ikke gyldig. Åpne lenken nøyaktig slik den står i meldingen du fikk.",
        "expired_title": "Lenken er utløpt",
        "expired_body": "Denne lenken er utløpt, så ingenting er endret. "
        "Neste gang du bestiller billetter, kan du melde deg på igjen.",
        "used_title": "Allerede bekreftet",
        "used_body": "Denne lenken er allerede brukt. Du trenger ikke gjøre noe mer.",
        "unsubscribe_title": "Meld deg av",
        "unsubscribe_email": "Trykk på knappen for å slutte å motta markedsførings-e-post fra oss.",
        "unsubscribe_sms": "Trykk på knappen for å slutte å motta markedsførings-SMS fra oss.",
        "unsubscribe_button": "Meld av",
        "unsubscribed_title": "Du er meldt av",
        "unsubscribed_email": "Du vil ikke lenger motta markedsførings-e-post fra oss.",
        "unsubscribed_sms": "Du vil ikke lenger motta markedsførings-SMS fra oss.",
    },
}

_TEMPLATES = {
    "base.html": """<!doctype html>
<html lang="{{ lang }}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<meta name="referrer" content="no-referrer">
<title>{{ title }}</title>
</head>
<body>
<main>
<h1>{{ title }}</h1>
{% block content %}{% endblock %}
</main>
</body>
</html>
""",
    "confirm.html": """{% extends "base.html" %}{% block content %}
<p>{{ t.confirm_intro }}</p>
{% if optin_text %}<blockquote><p>{{ optin_text }}</p></blockquote>{% endif %}
<form method="post" action="{{ action }}">
<input type="hidden" name="token" value="{{ token }}">
<p>{{ t.confirm_hint }}</p>
<button type="submit">{{ t.confirm_button }}</button>
</form>
{% endblock %}""",
    "unsubscribe.html": """{% extends "base.html" %}{% block content %}
<form method="post" action="{{ action }}">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<p>{{ body }}</p>
<button type="submit">{{ t.unsubscribe_button }}</button>
</form>
{% endblock %}""",
    "message.html": """{% extends "base.html" %}{% block content %}
<p>{{ body }}</p>
{% endblock %}""",
}

_ENV = Environment(loader=DictLoader(_TEMPLATES), autoescape=True, undefined=StrictUndefined)


@dataclass(frozen=True, slots=True)
class Page:
    """A rendered page and the HTTP status to answer it with."""

    status: int
    html: str


def page_language(language: str | None) -> str:
    """The supported language closest to `language` (e.g. "nl-BE" -> "nl", "nb" -> "no"), else English."""
    primary = (language or "").split("-")[0].split("_")[0].lower()
    primary = _ALIASES.get(primary, primary)
    return primary if primary in LANGUAGES else "en"


def _render(
    template: str,
    language: str | None,
    title_key: str,
    body_key: str | None = None,
    status: int = 200,
    **values: object,
) -> Page:
    lang = page_language(language)
    texts = _TEXTS[lang]
    body = texts[body_key] if body_key else None
    html = _ENV.get_template(template).render(lang=lang, t=texts, title=texts[title_key], body=body, **values)
    return Page(status, html)


def confirm_page(token: str, language: str | None, optin_text: str | None = None) -> Page:
    """GET /doi/confirm: what is being confirmed and one form POSTing the token (form field
    `token`) to /doi/confirm. Showing it confirms nothing."""
    return _render("confirm.html", language, "confirm_title", token=token, optin_text=optin_text, action=CONFIRM_PATH)


def confirmed_page(language: str | None) -> Page:
    return _render("message.html", language, "confirmed_title", "confirmed_body")


def problem_page(problem: str, language: str | None) -> Page:
    """The page for a link that changes nothing: `INVALID` (tampered), `EXPIRED` or `USED`."""
    return _render("message.html", language, f"{problem}_title", f"{problem}_body", PROBLEM_STATUS[problem])


def unsubscribe_page(token: str, language: str | None, purpose: str) -> Page:
    """GET /unsubscribe: one button POSTing `List-Unsubscribe=One-Click` to /unsubscribe?token=
    (RFC 8058), for the channel purpose `email` or `sms`."""
    action = link("", UNSUBSCRIBE_PATH, token)
    return _render("unsubscribe.html", language, "unsubscribe_title", f"unsubscribe_{purpose}", action=action)


def unsubscribed_page(language: str | None, purpose: str) -> Page:
    return _render("message.html", language, "unsubscribed_title", f"unsubscribed_{purpose}")
