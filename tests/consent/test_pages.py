from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import pytest

from workers.consent.pages import (
    INVALID,
    LANGUAGES,
    confirm_page,
    confirmed_page,
    page_language,
    problem_page,
    unsubscribe_page,
    unsubscribed_page,
)
from workers.consent.rules import EXPIRED, USED

TOKEN = "WyJ0MSIsImMtNDIiXQ.awOCAA.sig-_part"


class Outline(HTMLParser):
    """What a visitor (or a browser) gets from a page: its structure, fields and visible text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self._in_title = False
        self.title = ""
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif data.strip():
            self.text.append(data.strip())

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]


def assert_accessible(outline: Outline, lang: str) -> None:
    assert outline.all("html") == [{"lang": lang}]
    assert outline.title.strip()
    assert len(outline.all("main")) == 1
    assert len(outline.all("h1")) == 1
    # Nothing but text: readable without CSS, and no room for advertising or trackers.
    assert not any(outline.all(tag) for tag in ("script", "img", "style", "link", "iframe", "a"))


@pytest.mark.parametrize("language", LANGUAGES)
def test_confirm_page_has_one_form_posting_the_token(language: str) -> None:
    page = confirm_page(TOKEN, language, "Send me the newsletter")
    outline = Outline(page.html)

    assert page.status == 200
    assert_accessible(outline, language)
    [form] = outline.all("form")
    assert (form["method"], form["action"]) == ("post", "/doi/confirm")
    assert [i for i in outline.all("input") if i.get("type") != "hidden"] == []
    assert [(i["name"], i["value"]) for i in outline.all("input")] == [("token", TOKEN)]
    assert [b["type"] for b in outline.all("button")] == ["submit"]
    assert "Send me the newsletter" in outline.text


def test_confirm_page_is_translated() -> None:
    titles = {Outline(confirm_page(TOKEN, language).html).title for language in LANGUAGES}
    assert len(titles) == len(LANGUAGES)


def test_rendering_the_confirm_page_is_pure() -> None:
    # GET must never confirm: the page is computed from its arguments alone, the same every time.
    assert confirm_page(TOKEN, "de") == confirm_page(TOKEN, "de")


def test_page_text_is_escaped() -> None:
    html = confirm_page('x" onclick="alert(1)', "en", "<script>alert(1)</script>").html
    outline = Outline(html)
    assert outline.all("script") == []
    assert "<script>alert(1)</script>" in outline.text
    assert [i["value"] for i in outline.all("input")] == ['x" onclick="alert(1)']
    assert all("onclick" not in attrs for _, attrs in outline.tags)


@pytest.mark.parametrize(
    ("asked", "shown"),
    [("nl-BE", "nl"), ("de_AT", "de"), ("nb", "no"), ("nn", "no"), ("NO", "no"), ("fr", "en"), (None, "en"),
     ("", "en")],
)
def test_language_falls_back_to_english(asked: str | None, shown: str) -> None:
    assert page_language(asked) == shown
    assert Outline(confirmed_page(asked).html).all("html") == [{"lang": shown}]


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize(("problem", "status"), [(INVALID, 400), (EXPIRED, 410), (USED, 409)])
def test_problem_pages_explain_without_a_form(language: str, problem: str, status: int) -> None:
    page = problem_page(problem, language)
    outline = Outline(page.html)
    assert page.status == status
    assert_accessible(outline, language)
    assert outline.all("form") == [] and outline.all("button") == []


def test_each_problem_page_says_something_of_its_own_in_each_language() -> None:
    problems = (INVALID, EXPIRED, USED)
    bodies = {Outline(problem_page(p, language).html).text[-1] for p in problems for language in LANGUAGES}
    assert len(bodies) == len(problems) * len(LANGUAGES)


@pytest.mark.parametrize("language", LANGUAGES)
def test_confirmed_page(language: str) -> None:
    page = confirmed_page(language)
    outline = Outline(page.html)
    assert page.status == 200
    assert_accessible(outline, language)
    assert outline.all("form") == []


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("purpose", ["email", "sms"])
def test_unsubscribe_page_posts_one_click_to_the_token_url(language: str, purpose: str) -> None:
    page = unsubscribe_page(TOKEN, language, purpose)
    outline = Outline(page.html)

    assert page.status == 200
    assert_accessible(outline, language)
    [form] = outline.all("form")
    action = urlsplit(form["action"])
    assert (form["method"], action.path) == ("post", "/unsubscribe")
    assert parse_qs(action.query) == {"token": [TOKEN]}
    # RFC 8058: the POST body is List-Unsubscribe=One-Click.
    assert [(i["type"], i["name"], i["value"]) for i in outline.all("input")] == [
        ("hidden", "List-Unsubscribe", "One-Click")
    ]
    assert [b["type"] for b in outline.all("button")] == ["submit"]


def test_unsubscribe_pages_name_the_channel() -> None:
    assert unsubscribe_page(TOKEN, "en", "email").html != unsubscribe_page(TOKEN, "en", "sms").html
    assert unsubscribed_page("nl", "email").html != unsubscribed_page("nl", "sms").html


@pytest.mark.parametrize("language", LANGUAGES)
def test_unsubscribed_page(language: str) -> None:
    outline = Outline(unsubscribed_page(language, "email").html)
    assert_accessible(outline, language)
    assert outline.all("form") == []
