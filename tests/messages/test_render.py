from __future__ import annotations

from typing import Any

import pytest

from workers.messages import render
from workers.messages.render import (
    SAMPLE_VARS,
    LayoutRenderer,
    RenderError,
    language_chain,
    layout_variables,
    sample_variables,
)

LAYOUTS = ("doi-confirmation", "doi-reminder", "account-created", "event-message", "test")
LANGUAGES = ("en", "nl", "de", "no")
# One word per language that only a translated mail contains.
GREETINGS = {"en": "Hello", "nl": "Hallo", "de": "Hallo", "no": "Hei"}


def sms(text: str, layout_id: str = "custom") -> dict[str, Any]:
    return {"id": layout_id, "channel": "sms", "languages": {"en": {"text": text}}}


def email(subject: str = "Hi", html: str = "<p>Hi</p>", text: str = "Hi", **more: dict[str, str]) -> dict[str, Any]:
    return {"id": "custom", "channel": "email", "languages": {"en": {"subject": subject, "html": html, "text": text}, **more}}


def render_custom(renderer: LayoutRenderer, layout: dict[str, Any], variables: dict[str, Any] | None = None,
                  tenant: str = "t1") -> render.Rendered:
    values = variables or sample_variables("en")
    return renderer.render(tenant, layout["id"], layout["channel"], ["en"], lambda _: values, layout)


def test_the_defaults_cover_every_layout_language_and_channel(renderer: LayoutRenderer) -> None:
    assert set(renderer.defaults) == {(layout, channel) for layout in LAYOUTS for channel in ("email", "sms")}
    for layout in renderer.defaults.values():
        assert set(layout["languages"]) == set(LANGUAGES)


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("layout_id", LAYOUTS)
def test_every_default_email_renders_in_its_language(renderer: LayoutRenderer, layout_id: str, language: str) -> None:
    out = renderer.render("t1", layout_id, "email", [language], sample_variables)

    assert out.language == language
    assert out.subject and "\n" not in out.subject
    assert f'<html lang="{language}">' in out.html
    assert f"{GREETINGS[language]} Ann," in out.html and f"{GREETINGS[language]} Ann," in out.text
    assert "tickets@venue.example" in out.html and "Venue <tickets@venue.example>" in out.text
    assert out.segments is None


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("layout_id", LAYOUTS)
def test_every_default_sms_renders_with_its_segment_count(renderer: LayoutRenderer, layout_id: str, language: str) -> None:
    out = renderer.render("t1", layout_id, "sms", [language], sample_variables)

    assert out.language == language and out.text == out.text.strip() and out.text
    assert out.encoding == "GSM-7" and out.segments == render.sms_segments(out.text)[0]
    assert out.subject is None and out.html is None


@pytest.mark.parametrize("layout_id", LAYOUTS)
def test_each_language_has_its_own_wording(renderer: LayoutRenderer, layout_id: str) -> None:
    for channel in ("email", "sms"):
        texts = {renderer.render("t1", layout_id, channel, [lang], sample_variables).text for lang in LANGUAGES}
        assert len(texts) == len(LANGUAGES)


@pytest.mark.parametrize("layout_id", ["doi-confirmation", "doi-reminder"])
@pytest.mark.parametrize("language", LANGUAGES)
def test_double_opt_in_mails_ask_to_confirm_and_carry_no_unsubscribe_or_event(
    renderer: LayoutRenderer, layout_id: str, language: str
) -> None:
    out = renderer.render("t1", layout_id, "email", [language], sample_variables)

    confirm = SAMPLE_VARS["confirm_url"]
    assert f'href="{confirm}"' in out.html and confirm in out.text
    assert "Venue" in out.subject
    for unrelated in (SAMPLE_VARS["unsubscribe_url"], "Hamlet", "Doors open"):
        assert unrelated not in out.html and unrelated not in out.text


def test_double_opt_in_without_a_confirm_link_is_an_error(renderer: LayoutRenderer) -> None:
    def without_link(language: str) -> dict[str, Any]:
        return {k: v for k, v in sample_variables(language).items() if k != "confirm_url"}

    with pytest.raises(RenderError, match="'confirm_url' is undefined"):
        renderer.render("t1", "doi-confirmation", "email", ["en"], without_link)


@pytest.mark.parametrize("language", LANGUAGES)
def test_event_messages_show_the_event_the_custom_text_and_the_unsubscribe_link(
    renderer: LayoutRenderer, language: str
) -> None:
    out = renderer.render("t1", "event-message", "email", [language], sample_variables)

    unsubscribe = SAMPLE_VARS["unsubscribe_url"]
    assert f'href="{unsubscribe}"' in out.html and unsubscribe in out.text
    starts_at = sample_variables(language)["event"]["starts_at"]
    for shown in ("Hamlet", "Main hall", starts_at, "Doors open at 19:00."):
        assert shown in out.html and shown in out.text
    assert "Hamlet" in out.subject


def test_a_service_message_without_unsubscribe_link_still_renders(renderer: LayoutRenderer) -> None:
    def service(language: str) -> dict[str, Any]:
        return {k: v for k, v in sample_variables(language).items() if k != "unsubscribe_url"}

    out = renderer.render("t1", "event-message", "email", ["nl"], service)

    assert "unsubscribe" not in out.html and "Uitschrijven" not in out.text


def test_language_chain_is_requested_then_tenant_default_then_english() -> None:
    assert language_chain("de", "nl") == ["de", "nl", "en"]
    assert language_chain(None, "nl") == ["nl", "en"]
    assert language_chain("en", "en") == ["en"]


def test_an_unknown_language_falls_back_to_the_tenant_default_then_english(renderer: LayoutRenderer) -> None:
    assert renderer.render("t1", "test", "email", language_chain("fr", "nl"), sample_variables).language == "nl"
    assert renderer.render("t1", "test", "email", language_chain("fr", "es"), sample_variables).language == "en"


def test_a_tenant_layout_falls_back_among_its_own_languages(renderer: LayoutRenderer) -> None:
    layout = {"id": "info", "channel": "sms", "languages": {"nl": {"text": "Dag {{ contact.first_name }}"}}}

    out = renderer.render("t1", "info", "sms", language_chain("de", "nl"), sample_variables, layout)
    assert (out.language, out.text) == ("nl", "Dag Ann")

    with pytest.raises(RenderError, match="has none of the languages de, en"):
        renderer.render("t1", "info", "sms", language_chain("de", "en"), sample_variables, layout)


def test_an_unknown_layout_is_an_error(renderer: LayoutRenderer) -> None:
    with pytest.raises(RenderError, match="there is no email layout 'event-info'"):
        renderer.render("t1", "event-info", "email", ["en"], sample_variables)


def test_a_tenant_layout_replaces_the_default_for_its_channel_and_tenant_only(renderer: LayoutRenderer) -> None:
    own = sms("{{ event.name }} tonight!", "event-message")
    ours = renderer.render("t1", "event-message", "sms", ["en"], sample_variables, own)
    theirs = renderer.render("t2", "event-message", "sms", ["en"], sample_variables)
    email_default = renderer.render("t1", "event-message", "email", ["en"], sample_variables, own)

    assert ours.text == "Hamlet tonight!"
    assert theirs.text != ours.text and "Unsubscribe" in theirs.text
    assert email_default.subject == "Information about Hamlet"


def test_customtext_is_escaped_in_html_with_its_line_breaks_and_kept_as_is_in_text(renderer: LayoutRenderer) -> None:
    layout = email(subject="#CUSTOMTEXT#", html="<div>#CUSTOMTEXT#</div>", text="# CUSTOMTEXT #")
    variables = sample_variables("en") | {"custom_text": "Tom & Jerry <script>x</script>\nSecond line {{ 7 * 7 }}"}

    out = render_custom(renderer, layout, variables)

    assert out.html == "<div>Tom &amp; Jerry &lt;script&gt;x&lt;/script&gt;<br>\nSecond line {{ 7 * 7 }}</div>"
    assert out.text == "Tom & Jerry <script>x</script>\nSecond line {{ 7 * 7 }}"
    assert out.subject == "Tom & Jerry <script>x</script> Second line {{ 7 * 7 }}"


def test_html_variables_are_autoescaped(renderer: LayoutRenderer) -> None:
    variables = sample_variables("en") | {"contact": {"first_name": "<b>Ann</b>"}}
    out = render_custom(renderer, email(html="{{ contact.first_name }}", text="{{ contact.first_name }}"), variables)
    assert (out.html, out.text) == ("&lt;b&gt;Ann&lt;/b&gt;", "<b>Ann</b>")


def test_the_event_starts_at_local_time_in_its_timezone_written_for_the_language() -> None:
    event = {"name": "Hamlet", "starts_at": "2026-12-01T18:30:00Z", "timezone": "Europe/Brussels"}

    nl = layout_variables(language="nl", contact=None, event=event, sender=None)["event"]
    en = layout_variables(language="en", contact=None, event=event, sender=None)["event"]
    unknown_zone = layout_variables(language="de", contact=None, event=event | {"timezone": "Mars/Olympus"}, sender=None)

    assert nl["starts_at"] == "1 december 2026 19:30" and nl["starts_at_iso"] == "2026-12-01T19:30+01:00"
    assert en["date"] == "December 1, 2026" and en["time"] == "7:30 PM"
    assert unknown_zone["event"]["time"] == "18:30"


def test_documented_variables_cannot_be_replaced_by_request_vars() -> None:
    variables = layout_variables(
        language="en", contact={"first_name": "Ann"}, event=None, sender=None, extra={"contact": "x", "login_url": "u"}
    )
    assert variables["contact"]["first_name"] == "Ann" and variables["login_url"] == "u"


HOSTILE = {
    "python internals": ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
    "function globals": ("{{ cycler.__init__.__globals__ }}", "is unsafe"),
    "unknown variable": ("{{ nope }}", "'nope' is undefined"),
    "misspelt attribute": ("{{ contact.frist_name }}", "has no attribute 'frist_name'"),
    "syntax error": ("{% if %}", "line 1: Expected an expression"),
    "changing the data": ("{{ contact.clear() }}", "is unsafe"),
    "nested loops": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        "more than 100,000 loop steps and calls",
    ),
    "repeated literal text": (
        "{% set x %}{% for a in range(60000) %}" + "x" * 40 + "{% endfor %}{% endset %}",
        "more than 2,000,000 characters",
    ),
    "string product": ("{{ 'x' * 1000000000 }}", "more than 2,000,000 characters"),
    "list product": ("{{ ['x'] * 1000000000 }}", "more than 2,000,000 characters"),
    "huge power": ("{{ 7 ** 100000000 }}", "the power is too large"),
    "padding": ("{{ 'x'.ljust(1000000000) }}", "is not safely callable"),
    "format width": ("{{ '{:>1000000000}'.format(1) }}", "is not safely callable"),
    "printf width": ("{{ '%1000000000s' % 1 }}", "printf-style widths"),
    "doubling by concatenation": ("{% set x = 'xxxxxxxxxx' %}" + "{% set x = x ~ x %}" * 30, "2,000,000 characters"),
    "doubling by addition": ("{% set x = ['xxxxxxxxxx'] %}" + "{% set x = x + x %}" * 30, "2,000,000 characters"),
    "doubling by nesting": ("{% set x = [custom_text] %}" + "{% set x = [x, x] %}" * 40 + "{{ x|tojson }}",
                            "2,000,000 characters"),
    "replace blowup": ("{{ custom_text|replace('', custom_text * 10000) }}", "2,000,000 characters"),
    "join blowup": ("{{ range(100000)|join(custom_text * 100) }}", "2,000,000 characters"),
    "exponential macro": (
        "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
        "more than 100,000 loop steps and calls",
    ),
    "endless recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "calls itself too deeply"),
    "text from nothing": ("{{ lipsum(1000) }}", "'lipsum' is undefined"),
    "unknown template": ("{% include 'secrets.txt' %}", "secrets.txt"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_broken_or_hostile_layout_fails_with_a_readable_error(renderer: LayoutRenderer, name: str) -> None:
    source, reason = HOSTILE[name]
    with pytest.raises(RenderError) as raised:
        render_custom(renderer, sms(source))
    assert reason in str(raised.value)
    assert str(raised.value).startswith("sms layout 'custom' (en, text): ")


def test_the_sandbox_still_allows_ordinary_template_logic(renderer: LayoutRenderer) -> None:
    source = (
        "{% for o in orders %}{{ loop.index }}:{{ o }} {% endfor %}{{ contact.first_name|upper }} "
        "{{ 'a' ~ 'b' }} {{ [1, 2]|join(', ') }} {{ 'x' * 3 }} {{ contact.name.split()|last }} "
        "{{ event.name|replace('Ham', 'Spam') }} {{ {'en': 'Hi'}.get(language) }}"
    )
    assert render_custom(renderer, sms(source)).text == "1:o-1 ANN ab 1, 2 xxx Peeters Spamlet Hi"


def test_compile_layout_accepts_a_good_layout(renderer: LayoutRenderer) -> None:
    layout = email(
        html='{% extends "base.html" %}{% block content %}<p>#CUSTOMTEXT#</p>{% endblock %}',
        nl={"subject": "Over {{ event.name }}", "html": "<p>{{ contact.first_name }}</p>", "text": "{{ optin_text }}"},
    )
    assert renderer.compile_layout(layout) is None


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        (email(text="{{ contact.frist_name }}"), "language 'en', text: 'dict object' has no attribute 'frist_name'"),
        (email(subject="{% for %}"), "language 'en', subject: line 1: Expected an expression"),
        (email(html="{{ ''.__class__ }}"), "language 'en', html: access to attribute '__class__'"),
        (email() | {"languages": {"en": {"subject": "x", "html": "y"}}}, "language 'en': missing text"),
        (email() | {"languages": {}}, "the layout has no languages"),
        (email() | {"channel": "fax"}, "the layout's channel must be one of email, sms"),
        (email() | {"id": "bad/id"}, "the layout needs an id"),
        (sms("x" * 100_001), "longer than 100,000 characters"),
    ],
)
def test_compile_layout_rejects_a_layout_that_cannot_be_used(
    renderer: LayoutRenderer, layout: dict[str, Any], reason: str
) -> None:
    problem = renderer.compile_layout(layout)
    assert problem is not None and reason in problem


def test_each_part_is_compiled_once_and_again_only_when_its_source_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[str] = []
    compile_source = render._LayoutEnvironment.compile

    def counting(self: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
        compiled.append(source)
        return compile_source(self, source, *args, **kwargs)

    monkeypatch.setattr(render._LayoutEnvironment, "compile", counting)
    renderer = LayoutRenderer()
    first, second = sms("one {{ contact.first_name }}"), sms("two {{ contact.first_name }}")

    for tenant in ("t1", "t2", "t1"):
        renderer.render(tenant, "event-message", "sms", ["en"], sample_variables)
    assert len(compiled) == 1  # the default, shared by every tenant

    assert [render_custom(renderer, first).text for _ in range(3)] == ["one Ann"] * 3
    assert len(compiled) == 2
    assert render_custom(renderer, second).text == "two Ann"
    assert len(compiled) == 3

    renderer.forget("t1", "custom")
    render_custom(renderer, second)
    assert len(compiled) == 4


@pytest.mark.parametrize("expression", [
    "contact.first_name", "contact.items() | list | length", "vars.items", "vars.keys | string | length > 0",
    "vars.get('a')", "contact.missing", "vars['items']", "event.name ~ '!'", "contact.__class__", "vars.copy",
])
def test_attributes_of_dicts_resolve_as_in_jinjas_own_sandbox(expression: str) -> None:
    # The renderer looks a dict's keys up directly; the outcome must be the sandbox's own.
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    variables = {"contact": {"first_name": "Ann"}, "event": {"name": "Hamlet"}, "vars": {"items": "mine", "a": 1}}
    source = "{{ " + expression + " }}"

    def outcome(run: Any) -> tuple[str, str]:
        try:
            return "ok", str(run())
        except Exception as error:  # the kind of failure must match, whatever its wording
            return "error", type(error).__name__

    stock = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
    ours = render._LayoutEnvironment(autoescape=False, shared={})
    expected = outcome(lambda: stock.from_string(source).render(variables))

    def rendered() -> str:
        token = render._budget.set(render._Budget())
        try:
            return render._Compiled.of(source, ours.from_string(source)).render(variables)
        finally:
            render._budget.reset(token)

    assert outcome(rendered) == expected


# Recipients of one message: escaping, empty values, a name that is also in the layout's own text
# ("Venue" is the sender), one that looks like a token, one that is a prefix of another.
RECIPIENTS = [("Ann", "Peeters"), ("Bob", "O'Brien & <Sons>"), ("", "Janssens"), ("Venue", "Keeper"),
              ("Zoë", ""), ("%usher:contact.first_name:h%", "x"), ('"Q"', "Smith"), ("An", "Peeters")]
PERSONAL = frozenset({"contact.first_name", "contact.last_name", "contact.name", "contact.email", "contact.phone",
                      "unsubscribe_url", "confirm_url"})


def recipient_variables(language: str, first: str, last: str) -> dict[str, Any]:
    return layout_variables(
        language=language,
        contact={"first_name": first, "last_name": last, "email": f"{first or 'x'}@example.com", "phone": ""},
        event=render.SAMPLE_EVENT, sender=render.SAMPLE_SENDER, custom_text="Doors open at 19:00 & not before",
        extra={**SAMPLE_VARS, "unsubscribe_url": f"https://usher.example/unsubscribe?token={first}&x=1",
               "confirm_url": f"https://usher.example/doi/confirm?token={last}"},
    )


def assert_rendered_once_is_rendered_alone(renderer: LayoutRenderer, render_for: Any) -> list[render.Rendered]:
    """Each recipient's mail, rendered once for all of them (personal values as tokens), is
    exactly the mail rendered for them alone; its factored bodies give the same mail back."""
    outs = []
    for first, last in RECIPIENTS:
        once = render_for(renderer, first, last, PERSONAL)
        alone = render_for(LayoutRenderer(), first, last, frozenset())
        assert (once.subject, once.html, once.text, once.segments) == (alone.subject, alone.html, alone.text, alone.segments)
        if once.substitutions is not None:
            assert (render.substitute(once.html_body, once.substitutions), render.substitute(once.text_body, once.substitutions)) == (
                alone.html, alone.text)
        outs.append(once)
    return outs


@pytest.mark.parametrize("channel", ["email", "sms"])
@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("layout_id", LAYOUTS)
def test_a_default_layout_rendered_once_for_many_recipients_gives_each_their_own_mail(
    layout_id: str, language: str, channel: str
) -> None:
    def render_for(renderer: LayoutRenderer, first: str, last: str, personal: frozenset[str]) -> render.Rendered:
        return renderer.render("t1", layout_id, channel, [language], lambda lang: recipient_variables(lang, first, last),
                               personal=personal)

    outs = assert_rendered_once_is_rendered_alone(LayoutRenderer(), render_for)
    if layout_id == "event-message" and channel == "email":
        # The mail a message goes out as: one body for all recipients with a first name.
        with_name = [out.html_body for out, (first, _) in zip(outs, RECIPIENTS) if first and "%usher" not in first]
        assert all(out.substitutions is not None for out in outs[:5]) and len(set(with_name)) == 1


@pytest.mark.parametrize(("source", "plain"), [
    ("Hi {{ contact.first_name }}, {% if not contact.last_name %}no surname{% else %}{{ contact.last_name }}{% endif %}", True),
    ("{{ 'Dear ' if contact.first_name else 'Hello' }} {{ contact.name }} {% if unsubscribe_url is defined %}{{ unsubscribe_url }}{% endif %}", True),
    ("{% for ticket in orders %}{{ contact.first_name }}: {{ ticket }} {% endfor %}", True),
    ("{{ contact.first_name|upper }}", False),
    ("{% if contact.first_name == 'Ann' %}Hi Ann{% endif %}{{ contact.first_name }}", False),
    ("{{ contact }}", False),
    ("{{ contact.items()|list|length }} {{ contact.first_name }}", False),
    ("{{ unsubscribe_url.upper() }}", False),
    ("{% set name = contact.first_name %}{{ name|length }}", False),
    ("{% for letter in contact.first_name %}{{ letter }}.{% endfor %}", False),
    ("{{ contact.first_name ~ '!' }}", False),
    ("{{ contact.name or 'friend' }}", False),
    ("{% macro hello() %}{{ contact.first_name }}{% endmacro %}{{ hello()|upper }}", False),
    ("{% filter upper %}{{ contact.first_name }}{% endfilter %}", False),
    ("{% autoescape false %}{{ contact.last_name }}{% endautoescape %}", False),
    ("%usher:contact.first_name:h% {{ contact.first_name }}", False),
])
def test_a_tenant_layout_is_rendered_once_only_when_it_uses_personal_values_plainly(source: str, plain: bool) -> None:
    layout = email(subject="For {{ contact.first_name }}", html=source, text=source)

    def render_for(renderer: LayoutRenderer, first: str, last: str, personal: frozenset[str]) -> render.Rendered:
        return renderer.render("t1", "custom", "email", ["en"], lambda lang: recipient_variables(lang, first, last), layout,
                               personal=personal)

    outs = assert_rendered_once_is_rendered_alone(LayoutRenderer(), render_for)
    assert (outs[0].substitutions is not None) is plain


def test_a_service_mail_without_an_unsubscribe_link_is_rendered_once_too(renderer: LayoutRenderer) -> None:
    variables = recipient_variables("en", "Ann", "Peeters")
    del variables["unsubscribe_url"]

    once = renderer.render("t1", "event-message", "email", ["en"], lambda _: variables, personal=PERSONAL)

    assert once.substitutions is not None and "nsubscribe" not in once.text
    assert once.text == LayoutRenderer().render("t1", "event-message", "email", ["en"], lambda _: variables).text
