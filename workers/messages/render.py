"""Layouts rendered in Jinja2's sandbox: the repository's defaults and tenants' own.

A tenant's layout is code written by someone outside the project, so rendering it
must neither leak Python internals nor stall the worker. Three things see to it:
`ImmutableSandboxedEnvironment` (no `__class__` tricks, no mutation of the data),
`StrictUndefined` (a misspelt variable is an error, not an empty string), and a
budget per rendered part: loop steps and calls are counted, and so is every
character a template produces, output and intermediate values alike, so a loop
or a string that grows without bound stops with a `RenderError` long before it
costs real time or memory. Filters and string methods whose output can grow
faster than their input (`center`, `indent`, `format`, `str.ljust`, ...) are
left out; `join` and `replace` check their result's size before they build it.

Every layout part is compiled once: defaults are shared by all tenants, a
tenant's own layout is cached under its tenant and recompiled when its source
changes. Rendering a compiled part costs tens of microseconds.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.dates import format_date, format_time
from babel import Locale, UnknownLocaleError
from jinja2 import DictLoader, StrictUndefined, Template, TemplateSyntaxError, nodes, pass_context, pass_eval_context
from jinja2.filters import FILTERS
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer
from markupsafe import Markup, escape

from workers.envelope import ID_PATTERN, parse_time

LAYOUTS_DIR = Path(__file__).resolve().parents[2] / "layouts"
CHANNELS = ("email", "sms")
PARTS = {"email": ("subject", "html", "text"), "sms": ("text",)}
FILE_SUFFIXES = {"subject": "subject", "html": "html", "text": "txt"}
FALLBACK_LANGUAGE = "en"

MAX_SOURCE_CHARS = 100_000
MAX_STEPS = 100_000
MAX_CHARS = 2_000_000
MAX_INT_BITS = 100_000

# "# CUSTOMTEXT #" is how the placeholder is often typed (and how the product document shows it).
CUSTOMTEXT = re.compile(r"#\s*CUSTOMTEXT\s*#")

# GSM 03.38: the basic table (minus the escape character) costs one septet, the extension table two.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
SEGMENT_SIZES = {"GSM-7": (160, 153), "UCS-2": (70, 67)}

# Shown by previews and used to try out a tenant's layout before it is accepted.
SAMPLE_CONTACT = {
    "first_name": "Ann",
    "last_name": "Peeters",
    "email": "ann@example.com",
    "phone": "+32470000000",
    "language": "en",
}
SAMPLE_EVENT = {
    "name": "Hamlet",
    "starts_at": "2026-12-01T19:30:00+01:00",
    "ends_at": "2026-12-01T22:00:00+01:00",
    "timezone": "Europe/Brussels",
    "venue": "Main hall",
}
SAMPLE_SENDER = {"name": "Venue", "email": "tickets@venue.example"}
SAMPLE_CUSTOM_TEXT = "Doors open at 19:00."
SAMPLE_VARS = {
    "confirm_url": "https://usher.example/doi/confirm?token=sample",
    "unsubscribe_url": "https://usher.example/unsubscribe?token=sample",
    "optin": "newsletter",
    "optin_text": "Send me the newsletter",
    "expires_at": "2026-12-15T19:30:00.000Z",
    "orders": ["o-1"],
    "login_url": "https://shop.example/login",
    "parent_first_name": "Bob",
    "parent_last_name": "Peeters",
    "marketing": True,
}


class RenderError(Exception):
    """A layout that cannot be rendered; the message says why, for a person to read."""


@dataclass(frozen=True, slots=True)
class Rendered:
    language: str
    subject: str | None
    html: str | None
    text: str
    segments: int | None
    encoding: str | None


def sms_segments(text: str) -> tuple[int, str]:
    """How many SMS segments `text` takes, and in which encoding ("GSM-7" or "UCS-2").

    A concatenated message loses room to its header, and a character is never split
    across two segments (an extension-table character, a UTF-16 surrogate pair), so
    the parts are filled one character at a time."""
    if all(char in GSM7_BASIC or char in GSM7_EXTENSION for char in text):
        encoding, units = "GSM-7", [2 if char in GSM7_EXTENSION else 1 for char in text]
    else:
        encoding, units = "UCS-2", [2 if ord(char) > 0xFFFF else 1 for char in text]
    single, part = SEGMENT_SIZES[encoding]
    if sum(units) <= single:
        return 1, encoding
    segments, room = 1, part
    for unit in units:
        if unit > room:
            segments, room = segments + 1, part
        room -= unit
    return segments, encoding


def language_chain(requested: str | None, tenant_default: str | None) -> list[str]:
    """The languages to try, best first: the requested one, the tenant's default, English."""
    return list(dict.fromkeys(lang for lang in (requested, tenant_default, FALLBACK_LANGUAGE) if lang))


def layout_variables(
    *,
    language: str,
    contact: Mapping[str, Any] | None,
    event: Mapping[str, Any] | None,
    sender: Mapping[str, Any] | None,
    custom_text: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every variable a layout can use (see layouts/README.md). `extra` (a request's
    `vars`) adds variables but never replaces the documented ones."""
    contact = contact or {}
    first_name, last_name = contact.get("first_name") or "", contact.get("last_name") or ""
    return {
        **(extra or {}),
        "language": language,
        "contact": {
            "first_name": first_name,
            "last_name": last_name,
            "name": f"{first_name} {last_name}".strip(),
            "email": contact.get("email") or "",
            "phone": contact.get("phone") or "",
            "language": contact.get("language") or "",
        },
        "event": _event_variables(event or {}, language),
        "sender": {"name": (sender or {}).get("name") or "", "email": (sender or {}).get("email") or ""},
        "custom_text": custom_text or "",
    }


def sample_variables(language: str) -> dict[str, Any]:
    """Every documented variable, filled with sample values."""
    return layout_variables(
        language=language,
        contact=SAMPLE_CONTACT,
        event=SAMPLE_EVENT,
        sender=SAMPLE_SENDER,
        custom_text=SAMPLE_CUSTOM_TEXT,
        extra=SAMPLE_VARS,
    )


def _event_variables(event: Mapping[str, Any], language: str) -> dict[str, str]:
    timezone = event.get("timezone") or ""
    starts = _local_times(event.get("starts_at") or "", timezone, language)
    ends = _local_times(event.get("ends_at") or "", timezone, language)
    return {
        "name": event.get("name") or "",
        "venue": event.get("venue") or "",
        "timezone": timezone,
        "date": starts[0],
        "time": starts[1],
        "starts_at": starts[2],
        "ends_at": ends[2],
        "starts_at_iso": starts[3],
    }


@lru_cache(maxsize=4096)
def _local_times(moment: str, timezone: str, language: str) -> tuple[str, str, str, str]:
    """(date, time, date and time, ISO) of `moment` in `timezone`, written for `language`."""
    if not moment:
        return ("", "", "", "")
    try:
        local = parse_time(moment)
    except ValueError:
        return ("", "", moment, moment)
    try:
        local = local.astimezone(ZoneInfo(timezone)) if timezone else local
    except (ZoneInfoNotFoundError, ValueError):
        pass  # an unknown zone name: the offset the instant came with is still a correct local time
    locale = _babel_locale(language)
    # CLDR puts no-break spaces in times ("7:30 PM"); outside GSM-7 they would double an SMS's cost.
    date, time = (
        text.translate(_PLAIN_SPACES)
        for text in (format_date(local, "long", locale=locale), format_time(local, "short", locale=locale))
    )
    return (date, time, f"{date} {time}", local.isoformat(timespec="minutes"))


_PLAIN_SPACES = str.maketrans({"\u00a0": " ", "\u202f": " "})


def _babel_locale(language: str) -> str:
    try:
        Locale.parse(language)
    except (UnknownLocaleError, ValueError):
        return FALLBACK_LANGUAGE
    return language


class _Budget:
    __slots__ = ("steps", "chars")

    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.chars = MAX_CHARS

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise RenderError(f"the layout takes more than {MAX_STEPS:,} loop steps and calls")

    def spend(self, chars: int) -> None:
        self.chars -= chars
        if self.chars < 0:
            raise RenderError(f"the layout produces more than {MAX_CHARS:,} characters")

    def check(self, value: Any) -> None:
        """Pay for `value` (counted only as far as the budget goes, so measuring is cheap too)."""
        self.spend(_size(value, self.chars + 1))

    def fits(self, value: Any) -> None:
        """Refuse to work on a value whose text alone would exceed what is left."""
        if _size(value, self.chars + 1) > self.chars:
            raise RenderError(f"the layout produces more than {MAX_CHARS:,} characters")


_budget: ContextVar[_Budget] = ContextVar("layout_budget")


def _size(value: Any, limit: int, measured: dict[int, int] | None = None) -> int:
    """About how many characters `str(value)` takes, counting no further than `limit`.
    A value nested in itself many times over is measured once (`measured`)."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (list, tuple, set, frozenset, dict)):
        return 0
    measured = {} if measured is None else measured
    if id(value) in measured:
        return measured[id(value)]
    total = 2
    for item in value.items() if isinstance(value, dict) else value:
        total += _size(item, limit - total, measured) + 2
        if total > limit:
            break
    measured[id(value)] = total
    return total


def _charge_output(value: Any) -> Any:
    budget = _budget.get()
    if type(value) is str:  # nearly every output, measured without the general walk
        budget.spend(len(value))
    else:
        budget.check(value)
    return value


# The internal filters take the context so jinja never tries them at compile time.
@pass_context
def _loop_budget(context: Context, iterable: Iterable[Any], literal_chars: int) -> Iterator[Any]:
    budget = _budget.get()
    for item in iterable:
        budget.step()
        budget.spend(literal_chars)
        yield item


@pass_context
def _concat(context: Context, items: tuple[Any, ...]) -> str:
    budget = _budget.get()
    for item in items:
        budget.check(item)
    return markup_join(items) if context.eval_ctx.volatile or context.eval_ctx.autoescape else str_join(items)


@pass_eval_context
def _join(eval_ctx: EvalContext, items: Iterable[Any], separator: str = "", attribute: str | int | None = None) -> str:
    budget = _budget.get()
    items = list(items)
    budget.spend(max(len(items) - 1, 0) * len(separator))
    for item in items:
        budget.check(item)
    return FILTERS["join"](eval_ctx, items, separator, attribute)


@pass_eval_context
def _replace(eval_ctx: EvalContext, value: Any, old: str, new: str, count: int | None = None) -> str:
    text = str(value)
    hits = text.count(old) if old else len(text) + 1
    if count is not None:
        hits = min(hits, count)
    _budget.get().spend(max(len(text) + hits * (len(new) - len(old)), 0))
    return FILTERS["replace"](eval_ctx, value, old, new, count)


@pass_eval_context
def _nl2br(eval_ctx: EvalContext, value: Any) -> str:
    """Custom text keeps its line breaks in HTML, escaped line by line."""
    text = str(value)
    if not eval_ctx.autoescape:
        return text
    return _html_lines(text)


@lru_cache(maxsize=256)  # a message's custom text is the same for every recipient
def _html_lines(text: str) -> Markup:
    return Markup("<br>\n").join(escape(line) for line in text.splitlines())


def _guarded(filter_func: Any) -> Any:
    # `wraps` also copies jinja's pass_context / pass_eval_context marker.
    @wraps(filter_func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget.get()
        for arg in args:
            budget.fits(arg)
        result = filter_func(*args, **kwargs)
        budget.check(result)
        return result

    return guarded


# Filters whose output grows at most in proportion to their input.
_LINEAR_FILTERS = (
    "abs", "attr", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "filesizeformat",
    "first", "float", "forceescape", "groupby", "int", "items", "last", "length", "list", "lower", "map",
    "max", "min", "pprint", "reject", "rejectattr", "reverse", "round", "safe", "select", "selectattr",
    "sort", "string", "striptags", "sum", "title", "tojson", "trim", "truncate", "unique", "upper",
    "urlencode", "urlize", "wordcount", "xmlattr",
)
_AMPLIFYING_STR_METHODS = frozenset(
    {"center", "ljust", "rjust", "zfill", "expandtabs", "join", "replace", "format", "format_map", "translate"}
)
_PRINTF_WIDTH = re.compile(r"%[^a-zA-Z%]*(\*|\d{4,})")


class _BudgetGuards(NodeTransformer):
    """Rewrites a parsed template so loops and `~` pay into the render budget.
    A loop pays per step for the literal text in its body, since that text
    reaches the output without passing through `finalize`."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        literal = sum(len(data.data) for data in node.find_all(nodes.TemplateData))
        node.iter = nodes.Filter(node.iter, "_loop_budget", [nodes.Const(literal)], [], None, None).set_lineno(
            node.lineno
        )
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        items = nodes.Tuple(node.nodes, "load")
        return nodes.Filter(items, "_concat", [], [], None, None).set_lineno(node.lineno)


class _LayoutEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, *, autoescape: bool, shared: Mapping[str, str]) -> None:
        super().__init__(
            autoescape=autoescape,
            undefined=StrictUndefined,
            # Block tags take their own line without leaving blank lines in plain text.
            trim_blocks=True,
            lstrip_blocks=True,
            finalize=_charge_output,
            loader=DictLoader(dict(shared)),
            auto_reload=False,
        )
        self.filters = {name: _guarded(FILTERS[name]) for name in _LINEAR_FILTERS}
        self.filters.update(join=_join, replace=_replace, nl2br=_nl2br, _loop_budget=_loop_budget, _concat=_concat)
        # lipsum makes text from nothing; a namespace hides values from the size accounting.
        for name in ("lipsum", "namespace"):
            self.globals.pop(name, None)
        self._shared: dict[str, Template] = {}

    def compile(self, source: Any, name: str | None = None, filename: str | None = None, raw: bool = False,
                defer_init: bool = False) -> Any:
        if isinstance(source, str):
            if len(source) > MAX_SOURCE_CHARS:
                raise RenderError(f"the layout is longer than {MAX_SOURCE_CHARS:,} characters")
            source = _BudgetGuards().visit(self.parse(source, name, filename))
            source.set_environment(self)
        return super().compile(source, name, filename, raw, defer_init)

    def getattr(self, obj: Any, attribute: str) -> Any:
        # `contact.first_name` on a plain dict: the sandbox tries the attribute first and takes the
        # key only after an AttributeError. A name that is no dict attribute goes to the key at once,
        # with the same outcome and no exception raised and caught for every variable shown.
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def get_template(self, name: Any, parent: str | None = None, globals: Any = None) -> Template:
        # The shared pieces (base.html, macros.html) never change: found once, not looked up in
        # jinja's locked LRU cache on every render of a layout that extends them.
        if parent is None and globals is None and type(name) is str:
            template = self._shared.get(name)
            if template is None:
                template = self._shared[name] = super().get_template(name)
            return template
        return super().get_template(name, parent, globals)

    def is_safe_callable(self, obj: Any) -> bool:
        target = getattr(obj, "__wrapped__", obj)  # the sandbox hands out str.format wrapped
        if isinstance(getattr(target, "__self__", None), str) and target.__name__ in _AMPLIFYING_STR_METHODS:
            return False
        return super().is_safe_callable(obj)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget.get()
        budget.step()
        result = super().call(context, obj, *args, **kwargs)
        budget.check(result)
        return result

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget.get()
        if operator == "*":
            _check_product(left, right, budget)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(left.bit_length(), 1) * right > MAX_INT_BITS:
                raise SecurityError("the power is too large")
        elif operator == "%" and isinstance(left, str) and _PRINTF_WIDTH.search(left):
            raise SecurityError("printf-style widths over 999 are not allowed")
        result = self.binop_table[operator](left, right)
        budget.check(result)
        return result


# What `getattr(a_dict, name)` finds: a dict has no attributes of its own beyond its type's.
_DICT_ATTRIBUTES = frozenset(dir(dict))


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A compiled part, with what every render of it needs made once: its globals, as
    `Template.render` copies them into each new context (from a ChainMap, every time)."""

    source: str
    template: Template
    globals: dict[str, Any]
    globals_keys: frozenset[str]

    @classmethod
    def of(cls, source: str, template: Template) -> _Compiled:
        return cls(source, template, dict(template.globals), frozenset(template.globals))

    def render(self, variables: Mapping[str, Any]) -> str:
        """`template.render(variables)`, less the copies: the same context, the same output."""
        template = self.template
        context = Context(template.environment, {**self.globals, **variables}, template.name, template.blocks)
        context.globals_keys = self.globals_keys  # type: ignore[assignment]  (only ever read)
        return template.environment.concat(template.root_render_func(context))  # type: ignore[attr-defined]


def _check_product(left: Any, right: Any, budget: _Budget) -> None:
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise SecurityError("the product is too large")
        return
    sequence, times = (left, right) if isinstance(right, int) else (right, left)
    if isinstance(times, int) and isinstance(sequence, (str, list, tuple)):
        budget.spend(_size(sequence, budget.chars + 1) * max(times, 0))


def _shared_templates(directory: Path) -> dict[str, str]:
    """The e-mail pieces every HTML layout may extend or import (base.html, macros.html)."""
    return {path.name: path.read_text(encoding="utf-8") for path in sorted((directory / "email").glob("*.html"))}


def load_default_layouts(directory: Path = LAYOUTS_DIR) -> dict[tuple[str, str], dict[str, Any]]:
    """The repository's layouts, keyed (layout id, channel), each shaped like a
    `config.layout`'s data: `layouts/<channel>/<layout>/<language>.<subject|html|txt>`."""
    layouts: dict[tuple[str, str], dict[str, Any]] = {}
    for channel in CHANNELS:
        for layout_dir in sorted(path for path in (directory / channel).iterdir() if path.is_dir()):
            languages: dict[str, dict[str, str]] = {}
            for path in sorted(layout_dir.iterdir()):
                part = next((p for p, suffix in FILE_SUFFIXES.items() if path.suffix == f".{suffix}"), None)
                if part in PARTS[channel]:
                    languages.setdefault(path.stem, {})[part] = path.read_text(encoding="utf-8")
            layouts[(layout_dir.name, channel)] = {"id": layout_dir.name, "channel": channel, "languages": languages}
    return layouts


class LayoutRenderer:
    """Renders layouts for every tenant of a worker, compiling each part once.

    Tenants' own layouts (`config.layout` data) are passed in by the caller, who
    keeps them in a table; a changed source is noticed and recompiled, and
    `forget` frees a tenant's compiled layout when it is replaced or deleted."""

    def __init__(self, directory: Path = LAYOUTS_DIR) -> None:
        self.defaults = load_default_layouts(directory)
        self._text_env = _LayoutEnvironment(autoescape=False, shared={})
        self._html_env = _LayoutEnvironment(autoescape=True, shared=_shared_templates(directory))
        self._compiled: dict[tuple[str, str, str, str, str], _Compiled] = {}

    def layout_for(self, layout_id: str, channel: str, override: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """The tenant's own layout when it has one for this channel, else the default."""
        if override is not None and override.get("channel") == channel:
            return override
        return self.defaults.get((layout_id, channel))

    def render(
        self,
        tenant: str,
        layout_id: str,
        channel: str,
        languages: Sequence[str],
        variables_for: Callable[[str], Mapping[str, Any]],
        override: Mapping[str, Any] | None = None,
    ) -> Rendered:
        """Renders the first of `languages` the layout has, with the variables
        `variables_for(language)` gives for that language. Raises RenderError."""
        layout = self.layout_for(layout_id, channel, override)
        if layout is None:
            raise RenderError(f"there is no {channel} layout {layout_id!r}")
        sources = layout.get("languages") or {}
        language = next((lang for lang in languages if lang in sources), None)
        if language is None:
            raise RenderError(f"the {channel} layout {layout_id!r} has none of the languages {', '.join(languages)}")
        owner = tenant if layout is override else ""  # defaults are compiled once for all tenants
        variables = variables_for(language)
        parts = {
            part: self._render_part((owner, layout_id, channel, language, part), sources[language].get(part), variables)
            for part in PARTS[channel]
        }
        if channel == "sms":
            text = parts["text"].strip()
            segments, encoding = sms_segments(text)
            return Rendered(language, None, None, text, segments, encoding)
        return Rendered(language, " ".join(parts["subject"].split()), parts["html"], parts["text"], None, None)

    def forget(self, tenant: str, layout_id: str) -> None:
        for cache_key in [k for k in self._compiled if k[0] == tenant and k[1] == layout_id]:
            del self._compiled[cache_key]

    def compile_layout(self, data: Mapping[str, Any]) -> str | None:
        """Why a tenant's `config.layout` cannot be used, or None when it can.

        Every part is compiled and tried on sample data, so a syntax error, an
        unknown variable or a sandbox violation is caught before the layout
        replaces the one in use."""
        layout_id, channel, languages = data.get("id"), data.get("channel"), data.get("languages")
        if not isinstance(layout_id, str) or not ID_PATTERN.fullmatch(layout_id):
            return "the layout needs an id of 1 to 128 letters, digits or ._:-"
        if channel not in PARTS:
            return f"the layout's channel must be one of {', '.join(CHANNELS)}"
        if not isinstance(languages, Mapping) or not languages:
            return "the layout has no languages"
        for language, sources in languages.items():
            if not isinstance(sources, Mapping):
                return f"language {language!r}: expected the parts {', '.join(PARTS[channel])}"
            missing = [part for part in PARTS[channel] if not isinstance(sources.get(part), str)]
            if missing:
                return f"language {language!r}: missing {', '.join(missing)}"
            variables = sample_variables(language)
            for part in PARTS[channel]:
                try:
                    self._run(_Compiled.of(sources[part], self._compile(part, sources[part])), variables)
                except RenderError as error:
                    return f"language {language!r}, {part}: {error}"
        return None

    def _render_part(self, cache_key: tuple[str, str, str, str, str], source: str | None, variables: Mapping[str, Any]) -> str:
        owner, layout_id, channel, language, part = cache_key
        where = f"{channel} layout {layout_id!r} ({language}, {part})"
        if source is None:
            raise RenderError(f"{where} is missing")
        cached = self._compiled.get(cache_key)
        try:
            if cached is None or cached.source != source:
                cached = self._compiled[cache_key] = _Compiled.of(source, self._compile(part, source))
            return self._run(cached, variables)
        except RenderError as error:
            raise RenderError(f"{where}: {error}") from None

    def _compile(self, part: str, source: str) -> Template:
        html = part == "html"
        source = CUSTOMTEXT.sub("{{ custom_text|nl2br }}" if html else "{{ custom_text }}", source)
        try:
            return (self._html_env if html else self._text_env).from_string(source)
        except TemplateSyntaxError as error:
            raise RenderError(f"line {error.lineno}: {error.message}") from None
        except RenderError:
            raise
        except Exception as error:  # a template that does not compile, whatever the reason
            raise RenderError(_describe(error)) from None

    @staticmethod
    def _run(compiled: _Compiled, variables: Mapping[str, Any]) -> str:
        token = _budget.set(_Budget())
        try:
            return compiled.render(variables)
        except RenderError:
            raise
        except RecursionError:
            raise RenderError("the layout calls itself too deeply") from None
        except Exception as error:  # a tenant's template fails its request, never the worker
            raise RenderError(_describe(error)) from None
        finally:
            _budget.reset(token)


def _describe(error: Exception) -> str:
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    lineno = getattr(error, "lineno", None)
    return f"line {lineno}: {message}" if lineno else message
