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

One message goes to many recipients, and their mails differ only in their own
values (name, address, unsubscribe link). When a part uses each of those only
plainly (printed as it is, or tested for truth or definedness), it is rendered
once per message with a token in each value's place, and every recipient's
mail is that rendering with the tokens replaced (see `_variable_uses`). The
tokens also let a provider send one body with substitutions (SendGrid).
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.dates import format_date, format_time
from babel import Locale, UnknownLocaleError
from jinja2 import DictLoader, StrictUndefined, Template, TemplateError, TemplateSyntaxError, nodes, pass_context, pass_eval_context
from jinja2.filters import FILTERS
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer
from markupsafe import Markup, escape
import orjson

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


# A recipient's own value in a part rendered for many recipients: `{TOKEN_MARK}{variable}:h%` in
# HTML (where the value goes in escaped), `...:t%` in text.
TOKEN_MARK = "%usher:"

# (html, text, substitutions): an e-mail's bodies with tokens, and each token's value.
Factored = tuple[str, str, dict[str, str]]


def personal_token(variable: str, html: bool) -> str:
    return f"{TOKEN_MARK}{variable}:{'h' if html else 't'}%"


@dataclass(frozen=True, slots=True)
class Rendered:
    language: str
    subject: str | None
    html_body: str | None
    text_body: str
    segments: int | None
    encoding: str | None
    # An e-mail rendered once for many recipients: its bodies hold a token for each of the
    # recipient's own values, and these are the tokens' values (see `render`). A provider that
    # substitutes (SendGrid) sends the bodies as they are, so they are filled in only when read.
    substitutions: Mapping[str, str] | None = None

    @property
    def html(self) -> str | None:
        """The HTML as the recipient gets it."""
        if self.html_body is None or not self.substitutions:
            return self.html_body
        return substitute(self.html_body, self.substitutions)

    @property
    def text(self) -> str:
        return substitute(self.text_body, self.substitutions) if self.substitutions else self.text_body


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


@dataclass(frozen=True, slots=True, eq=False)  # compared by identity: a key of the renderer's caches
class _Compiled:
    """A compiled part, with what every render of it needs made once: its globals, as
    `Template.render` copies them into each new context (from a ChainMap, every time);
    and how it uses its variables (`_variable_uses`, None: in ways that are not plain)."""

    source: str
    template: Template
    globals: dict[str, Any]
    globals_keys: frozenset[str]
    uses: dict[str, frozenset[str]] | None = None

    @classmethod
    def of(cls, source: str, template: Template, uses: dict[str, frozenset[str]] | None = None) -> _Compiled:
        return cls(source, template, dict(template.globals), frozenset(template.globals), uses)

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


PRINTED, TESTED, OTHER = "printed", "tested", "other"
# Nodes whose output does not go straight into the part (a macro's or a block's result can be
# filtered), or that change how it is escaped: a part holding one is rendered for each recipient.
_NOT_PLAIN_NODES = (nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.AssignBlock, nodes.Include,
                    nodes.EvalContextModifier, nodes.OverlayScope)
# Names that reach rendered output or the context as a whole.
_NOT_PLAIN_NAMES = frozenset({"self", "super", "caller", "varargs", "kwargs"})


class _NotPlain(Exception):
    pass


def _variable_uses(template: nodes.Template, env: _LayoutEnvironment) -> dict[str, frozenset[str]] | None:
    """How a parsed part (with the templates it extends) uses each variable path it names
    (`contact.first_name`, `unsubscribe_url`): PRINTED (output as it is), TESTED (only its truth
    or definedness counts: `{% if x %}`, `x is defined`, `not x`) or OTHER. None when the part
    does anything that makes output other than plain (see `_NOT_PLAIN_NODES`).

    When every use of a value is PRINTED or TESTED, the part's output is its output with the
    value replaced by a token of the same truth, with each token then replaced by the value
    (escaped in HTML, as autoescape would): what the value is decides nothing else."""
    uses: dict[str, set[str]] = defaultdict(set)

    def use(path: str, reference: nodes.Node, parent: nodes.Node | None) -> None:
        if isinstance(parent, nodes.Output):
            uses[path].add(PRINTED)
        elif (isinstance(parent, (nodes.If, nodes.CondExpr)) and parent.test is reference) or isinstance(parent, nodes.Not) or (
            isinstance(parent, nodes.Test) and parent.name in ("defined", "undefined")
        ):
            uses[path].add(TESTED)
        else:
            uses[path].add(OTHER)

    def visit(node: nodes.Node, parent: nodes.Node | None) -> None:
        if isinstance(node, _NOT_PLAIN_NODES) or (isinstance(node, (nodes.Import, nodes.FromImport)) and node.with_context):
            raise _NotPlain
        if isinstance(node, nodes.Extends):
            if not isinstance(node.template, nodes.Const) or not isinstance(node.template.value, str):
                raise _NotPlain
            visit(env.parse(env.loader.get_source(env, node.template.value)[0]), node)
            return
        if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name) and node.node.ctx == "load":
            if node.node.name in _NOT_PLAIN_NAMES:
                raise _NotPlain
            # `a_dict.items` is the dict's method: a use of the whole dict.
            use(node.node.name if node.attr in _DICT_ATTRIBUTES else f"{node.node.name}.{node.attr}", node, parent)
            return
        if isinstance(node, nodes.Name) and node.ctx == "load":
            if node.name in _NOT_PLAIN_NAMES:
                raise _NotPlain
            use(node.name, node, parent)
            return
        for child in node.iter_child_nodes():
            visit(child, node)

    try:
        visit(template, None)
    except (_NotPlain, TemplateError):  # TemplateError: a parent that cannot be found or parsed
        return None
    return {path: frozenset(kinds) for path, kinds in uses.items()}


# A rendering's key cannot be told (a value that is not JSON, a path through a non-mapping).
_MISSING = object()
_ABSENT = object()
# Layouts' plans and renderings with tokens kept (one rendering per message and language, normally).
RENDERINGS_KEPT = 256

# A variable path split for lookups: (path, root, name or "").
_Path = tuple[str, str, str]
# A layout's parts rendered with tokens: part -> (text, (variable, token) pairs it holds).
_Tokened = dict[str, tuple[str, tuple[tuple[str, str], ...]]]


def _lookup(variables: Mapping[str, Any], root: str, name: str) -> Any:
    """The value at `root.name` (or `root`): _ABSENT when there is none, _MISSING when the path
    goes through something other than a plain dict (what a layout sees there is no key's value)."""
    value = variables.get(root, _ABSENT)
    if name and value is not _ABSENT:
        if type(value) is not dict:
            return _MISSING
        value = value.get(name, _ABSENT)
    return value


def _value_key(value: Any) -> Any:
    """A value as part of a rendering's key."""
    if value is _MISSING or value is _ABSENT:
        return value
    if value is None or type(value) in (str, int, float, bool):
        return (type(value), value)  # typed: 1, 1.0 and True print differently
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return _MISSING


def _token_plan(uses: Iterable[dict[str, frozenset[str]] | None], personal: frozenset[str]) -> tuple[tuple[_Path, ...], tuple[_Path, ...]] | None:
    """(the personal variables a layout's parts use, the other variables they use), or None when
    a part uses a personal value other than plainly, or a personal value's container or attribute."""
    merged: dict[str, set[str]] = defaultdict(set)
    for part_uses in uses:
        if part_uses is None:
            return None
        for path, kinds in part_uses.items():
            merged[path].update(kinds)
    containers = {path.partition(".")[0] for path in personal}
    mine, others = [], []
    for path, kinds in merged.items():
        split = (path, *path.partition(".")[::2])
        if path in personal:
            if OTHER in kinds:
                return None
            mine.append(split)
        elif path in containers or split[1] in personal:
            return None
        else:
            others.append(split)
    return tuple(mine), tuple(others)


def _fill_in(tokened: _Tokened, values: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """One recipient's parts from the renderings with tokens, and the substitutions of an e-mail's
    bodies: those keep their tokens (see `Rendered`), an e-mail's subject and an SMS go out filled in."""
    parts, substitutions = {}, {}
    email = "html" in tokened
    for part, (text, held) in tokened.items():
        if part == "html":
            own = {token: str(escape(values[path])) for path, token in held}
        else:
            own = {token: values[path] for path, token in held}
        if email and part != "subject":
            parts[part] = text
            substitutions.update(own)
        else:
            parts[part] = substitute(text, own)
    return parts, substitutions


def substitute(text: str, substitutions: Mapping[str, str]) -> str:
    """Each token replaced by its value (as SendGrid does with a personalization's substitutions).
    No value holds a token, so the order does not matter."""
    for token, value in substitutions.items():
        text = text.replace(token, value)
    return text


def _where(cache_key: tuple[str, str, str, str, str]) -> str:
    _, layout_id, channel, language, part = cache_key
    return f"{channel} layout {layout_id!r} ({language}, {part})"


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
        # By the layout's compiled parts and personal variables (see `_tokened`).
        self._plans: dict[tuple[tuple[_Compiled, ...], frozenset[str]], tuple[tuple[_Path, ...], tuple[_Path, ...]] | None] = {}
        self._renders: dict[tuple[Any, ...], _Tokened | None] = {}

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
        personal: frozenset[str] = frozenset(),
    ) -> Rendered:
        """Renders the first of `languages` the layout has, with the variables
        `variables_for(language)` gives for that language. Raises RenderError.

        `personal` names the variables that differ from one recipient of a message to the next
        (`contact.first_name`, `unsubscribe_url`): when every part uses them plainly, the parts are
        rendered once for all recipients alike and filled in (see `_variable_uses`), and an
        e-mail's bodies keep their tokens, with their `substitutions`."""
        layout = self.layout_for(layout_id, channel, override)
        if layout is None:
            raise RenderError(f"there is no {channel} layout {layout_id!r}")
        sources = layout.get("languages") or {}
        language = next((lang for lang in languages if lang in sources), None)
        if language is None:
            raise RenderError(f"the {channel} layout {layout_id!r} has none of the languages {', '.join(languages)}")
        owner = tenant if layout is override else ""  # defaults are compiled once for all tenants
        variables = variables_for(language)
        compiled = {part: self._part((owner, layout_id, channel, language, part), sources[language].get(part)) for part in PARTS[channel]}
        filled_in = self._tokened(compiled, variables, personal) if personal else None
        if filled_in is None:
            parts = {part: self._render_part(compiled_part, variables) for part, compiled_part in compiled.items()}
            substitutions = None
        else:
            parts, substitutions = filled_in
        if channel == "sms":
            text = parts["text"].strip()
            segments, encoding = sms_segments(text)
            return Rendered(language, None, None, text, segments, encoding)
        return Rendered(language, " ".join(parts["subject"].split()), parts["html"], parts["text"], None, None, substitutions)

    def forget(self, tenant: str, layout_id: str) -> None:
        for cache_key in [k for k in self._compiled if k[0] == tenant and k[1] == layout_id]:
            del self._compiled[cache_key]
        self._plans.clear()  # they hold the forgotten parts
        self._renders.clear()

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
                    self._run(_Compiled.of(sources[part], self._compile(part, sources[part])[0]), variables)
                except RenderError as error:
                    return f"language {language!r}, {part}: {error}"
        return None

    def _part(self, cache_key: tuple[str, str, str, str, str], source: str | None) -> tuple[tuple[str, str, str, str, str], _Compiled]:
        """The compiled part (compiled now if new or changed), with its cache key."""
        if source is None:
            raise RenderError(f"{_where(cache_key)} is missing")
        cached = self._compiled.get(cache_key)
        if cached is None or cached.source != source:
            try:
                template, uses = self._compile(cache_key[4], source)
            except RenderError as error:
                raise RenderError(f"{_where(cache_key)}: {error}") from None
            cached = self._compiled[cache_key] = _Compiled.of(source, template, uses)
        return cache_key, cached

    def _render_part(self, part: tuple[tuple[str, str, str, str, str], _Compiled], variables: Mapping[str, Any]) -> str:
        cache_key, compiled = part
        try:
            return self._run(compiled, variables)
        except RenderError as error:
            raise RenderError(f"{_where(cache_key)}: {error}") from None

    def _tokened(
        self, compiled: Mapping[str, tuple[tuple[str, str, str, str, str], _Compiled]], variables: Mapping[str, Any], personal: frozenset[str]
    ) -> tuple[dict[str, str], dict[str, str]] | None:
        """The parts filled in from their renderings with tokens, but an e-mail's bodies, and those
        bodies' substitutions (see `_fill_in`); None when a part is not plain (it is then rendered as usual)."""
        entries = tuple(entry for _, entry in compiled.values())
        plan = self._plans.get((entries, personal), _MISSING)
        if plan is _MISSING:
            if len(self._plans) >= RENDERINGS_KEPT:
                self._plans.clear()
            plan = self._plans[(entries, personal)] = _token_plan((entry.uses for entry in entries), personal)
        if plan is None:
            return None
        personal_paths, other_paths = plan
        values = {}  # the truthy personal values, which tokens stand in for
        states = []
        for path, root, name in personal_paths:
            value = _lookup(variables, root, name)
            if value is _ABSENT or not value:  # absent or falsy: rendered as it is
                states.append(_value_key(value))
            elif type(value) is str:
                values[path] = value
                states.append(True)
            else:  # _MISSING, or a value that is no text: its token would not print as it does
                return None
        others = tuple(_value_key(_lookup(variables, root, name)) for _, root, name in other_paths)
        if _MISSING in others:
            return None
        render_key = (entries, tuple(states), others)
        tokened = self._renders.get(render_key, _MISSING)
        if tokened is _MISSING:
            if len(self._renders) >= RENDERINGS_KEPT:
                self._renders.clear()
            tokened = self._renders[render_key] = self._render_tokened(compiled, variables, values)
        if tokened is None:
            return None
        return _fill_in(tokened, values)

    def _render_tokened(
        self, compiled: Mapping[str, tuple[tuple[str, str, str, str, str], _Compiled]], variables: Mapping[str, Any],
        values: Mapping[str, str],
    ) -> _Tokened | None:
        """Each part rendered with a token in place of each of `values` (by variable), with the
        tokens it holds; None when a part holds the token mark otherwise."""
        tokened = {}
        for part, compiled_part in compiled.items():
            html = part == "html"
            with_tokens = dict(variables)
            tokens = {}
            for path in values:
                token = tokens[path] = personal_token(path, html)
                root, _, name = path.partition(".")
                with_tokens[root] = {**with_tokens[root], name: token} if name else token
            text = self._render_part(compiled_part, with_tokens)
            held = tuple((path, token) for path, token in tokens.items() if token in text)
            if text.count(TOKEN_MARK) != sum(text.count(token) for _, token in held):
                return None  # the mark in the layout's own text, or in a value: tokens would not be exact
            tokened[part] = (text, held)
        return tokened

    def _compile(self, part: str, source: str) -> tuple[Template, dict[str, frozenset[str]] | None]:
        """The compiled part, and how it uses its variables (`_variable_uses`)."""
        html = part == "html"
        env = self._html_env if html else self._text_env
        source = CUSTOMTEXT.sub("{{ custom_text|nl2br }}" if html else "{{ custom_text }}", source)
        try:
            template = env.from_string(source)
            return template, _variable_uses(env.parse(source), env)
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
