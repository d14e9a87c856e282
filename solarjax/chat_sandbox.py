"""The one jinja environment chat templates render in: transformers' sandbox plus a render budget.

A chat template is code from whoever published the tokenizer. jinja2's
``ImmutableSandboxedEnvironment`` (kept: it holds against escapes) stops it reaching Python, but
not from looping for hours or building a string of gigabytes. Here every place a template can
spend time or memory goes through a check: each loop iteration (every ``{% for %}``, recursive
``loop(...)`` calls included), ``range``, function and method calls, filters and tests, attribute
and item access, the ``+ * % **`` and ``~`` operators, captured blocks (macros, ``{% set %}``
blocks, ``caller()``) and every value and chunk written out. Sizes are checked *before* the
allocation where the size can be known (``'x' * n``, ``s.ljust(n)``, ``|indent``, ``|join``,
``|replace``, ``|tojson(indent=...)``, ``'%10000d' % x``, ...), after it otherwise; the clock is read
every 16th check (each step between checks is bounded by the size limits), so the wall-time limit
holds on any thread, with no signals.

Limits, per render, and why (real templates are far inside every one of them):

* ``MAX_CHARS`` = 2**24 (16.8 M characters) for the output and for any one string: a model's whole
  context (128 K tokens, ~0.5 M characters) rendered 32 times over; a few copies of it are tens of MB.
* ``MAX_ITEMS`` = 2**20 items in any list, tuple, dict or set a template builds (8 MB of references;
  real templates hold messages, tools and their properties: thousands).
* ``MAX_LOOP_ITERATIONS`` = 2**20 iterations over all loops: real templates loop over messages,
  tools and their properties (a 10 K-turn chat is ~10**4-10**5); a guarded iteration costs under a
  microsecond (the whole limit: 0.65 s on a shared 2-core VM).
* ``MAX_SECONDS`` = 10 s of wall time: real renders take milliseconds (a 20-turn Llama 4 chat: 0.7 ms).
* ``MAX_WIDTH`` = 2**20 for widths and counts a filter or ``str`` method pads or repeats by
  (``center``, ``ljust``, ``batch``, ``slice``, ...), and ``MAX_INT_BITS`` = 2**16 for integers
  built by ``*`` and ``**`` (no chat template needs a 20 000-digit number).

Over a limit, :class:`TemplateBudgetError` says which one; :class:`solarjax.data.ChatTemplate` turns
it into one :class:`solarjax.data.ChatTemplateBudgetError` line naming the template's file.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import json
import re
import time
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, Sequence

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_CHARS = 2**24
MAX_ITEMS = 2**20
MAX_LOOP_ITERATIONS = 2**20
MAX_SECONDS = 10.0
MAX_WIDTH = 2**20
MAX_INT_BITS = 2**16
_SIZED = (str, bytes, list, tuple, dict, set, frozenset)


class TemplateBudgetError(jinja2.exceptions.TemplateRuntimeError):
    """A template that went over its render budget (time, loop iterations or size)."""


@dataclasses.dataclass
class _Budget:
    deadline: float
    iterations: int = 0
    ticks: int = 0

    def tick(self) -> None:
        # the clock every 16th check: each step between two checks is bounded by the size limits
        self.ticks += 1
        if not self.ticks & 15 and time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"over {MAX_SECONDS:g} s of render time")


_CURRENT: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _tick() -> _Budget | None:
    budget = _CURRENT.get()
    if budget is not None:
        budget.tick()
    return budget


@contextlib.contextmanager
def budget() -> Iterator[_Budget]:
    """The budget of one render (outside one, only the size limits apply)."""
    token = _CURRENT.set(_Budget(time.monotonic() + MAX_SECONDS))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def limited_render(chunks: Iterable[str]) -> Iterator[str]:
    """The chunks of ``Template.generate``, stopped once their total is over ``MAX_CHARS``."""
    budget = _tick()
    total = 0
    for chunk in chunks:
        total += len(chunk)
        _check_size(total, "its output")
        if budget is not None:
            budget.tick()
        yield chunk


# ----------------------------------------------------------------------------- sizes


def text_size(value: Any, limit: int = MAX_CHARS) -> int:
    """About ``len(str(value))`` (an upper bound for the containers templates build), walking no
    further than ``limit`` characters: what writing the value out, joining or formatting it costs."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item) + 2
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        else:
            total += 8
    return total


def _depth(value: Any, cap: int = 64) -> int:
    """Nesting depth of lists and dicts (up to ``cap``): how many indents ``tojson(indent=)`` stacks."""
    level, depth = [value], 0
    while level and depth < cap:
        level = [v for x in level if isinstance(x, (list, tuple, dict))
                 for v in (x.values() if isinstance(x, dict) else x)][:MAX_WIDTH]
        depth += 1
    return depth


def _check_size(size: int, what: str) -> None:
    if size > MAX_CHARS:
        raise TemplateBudgetError(f"{what} would be over {MAX_CHARS} characters")


def _check_length(value: Any, length: int, what: str) -> None:
    """A string's length against ``MAX_CHARS``, a container's against ``MAX_ITEMS``."""
    if isinstance(value, (str, bytes)):
        _check_size(length, what)
    elif length > MAX_ITEMS:
        raise TemplateBudgetError(f"{what} would hold over {MAX_ITEMS} items")


def _check_width(width: Any, what: str) -> None:
    if isinstance(width, int) and width > MAX_WIDTH:
        shown = width if width <= 10**12 else "over 10**12"
        raise TemplateBudgetError(f"{what}: a width or count of {shown} (limit {MAX_WIDTH})")


def _check_result(value: Any, what: str) -> Any:
    if isinstance(value, _SIZED):
        _check_length(value, len(value), what)
    elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise TemplateBudgetError(f"{what} made an integer of over {MAX_INT_BITS} bits")
    return value


def _length(value: Any) -> int:
    return len(value) if isinstance(value, _SIZED) else text_size(value)


def _format_size(fmt: str, args: Any, marker: str, what: str) -> int:
    """An upper bound on ``fmt % args`` / ``fmt.format(*args)``: each field is at most the largest
    argument padded to the largest width the format names."""
    widths = [int(w) for w in re.findall(r"\d+", fmt)] or [0]
    for width in widths:
        _check_width(width, what)
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, (list, tuple)) else [args]
    if "*" in fmt or re.search(r":[^}]*\{", fmt):  # a width taken from the arguments ('%*d', '{:{w}}')
        for v in values:
            _check_width(v, what)
    largest = max([text_size(v) for v in values] or [0])
    return len(fmt) + fmt.count(marker) * (largest + max(widths))


# ----------------------------------------------------------------------------- what may grow, estimated first

def _indent_size(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> int:
    _check_width(width, "indent")
    pad = len(width) if isinstance(width, str) else int(width or 0)
    return _length(s) + (str(s).count("\n") + 2) * pad


def _replace_size(s: Any, old: Any, new: Any, count: Any = None) -> int:
    s, old, new = str(s), str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _join_size(items: Any, separator: Any = "") -> int:
    items = items if isinstance(items, (list, tuple, dict, set, frozenset, str)) else ()
    total = len(items) * len(str(separator))
    for item in items:
        if total > MAX_CHARS:
            break
        total += text_size(item)
    return total


def _wordwrap_size(s: Any, width: int = 79, break_long_words: bool = True, wrapstring: Any = None,
                   *_: Any, **__: Any) -> int:
    _check_width(width, "wordwrap")
    s = str(s)
    lines = len(s) // max(1, int(width)) + s.count("\n") + 1
    return len(s) + lines * len(str(wrapstring if wrapstring is not None else "\n"))


def _tojson_size(value: Any, ensure_ascii: bool = False, indent: Any = None, *_: Any, **__: Any) -> int:
    _check_width(indent, "tojson")
    pad = len(indent) if isinstance(indent, str) else int(indent or 0)
    chars = text_size(value)
    return chars * (6 if ensure_ascii else 1) + (chars * pad * _depth(value) if pad else 0)


def _padded_size(s: Any, width: Any = 80, *_: Any) -> int:
    _check_width(width, "padding")
    return _length(s) + (width if isinstance(width, int) else 0)


def _count_size(value: Any, count: Any = 0, *_: Any, **__: Any) -> int:
    _check_width(count, "batch/slice")
    _check_length([], _length(value) + (count if isinstance(count, int) else 0), "batch/slice")
    return 0


def _list_size(value: Any, *_: Any) -> int:
    _check_length([], _length(value), "filter 'list'")
    return 0


def _sum_size(value: Any, attribute: Any = None, start: Any = 0) -> int:
    # summing lists or strings copies the running total at each step
    if isinstance(start, (int, float)) or not isinstance(value, _SIZED):
        return 0
    return len(value) * sum(_length(item) for item in value)


FILTER_SIZES: dict[str, Callable[..., int]] = {
    "indent": _indent_size, "replace": _replace_size, "join": _join_size, "wordwrap": _wordwrap_size,
    "tojson": _tojson_size, "center": _padded_size, "truncate": lambda s, length=255, killwords=False,
    end="...", *_, **__: _length(s) + len(str(end)), "batch": _count_size, "slice": _count_size,
    "sum": _sum_size, "string": lambda v, *_: text_size(v), "list": _list_size,
    "pprint": lambda v, *_: text_size(v) * (1 + _depth(v)),
    "escape": lambda v, *_: 6 * text_size(v), "e": lambda v, *_: 6 * text_size(v),
    "forceescape": lambda v, *_: 6 * text_size(v), "urlencode": lambda v, *_: 3 * text_size(v),
    "format": lambda fmt, *args, **kwargs: _format_size(str(fmt), kwargs or args, "%", "format"),
}
STR_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "center": _padded_size, "ljust": _padded_size, "rjust": _padded_size, "zfill": _padded_size,
    "expandtabs": lambda s, tabsize=8: (_check_width(tabsize, "expandtabs"), len(s) + s.count("\t") * tabsize)[1],
    "replace": _replace_size, "join": lambda s, items: _join_size(items, s),
    "format": lambda fmt, *args, **kwargs: _format_size(fmt, {**dict(enumerate(args)), **kwargs}, "{", "format"),
    "format_map": lambda fmt, mapping: _format_size(fmt, mapping, "{", "format_map"),
}


def _binop_size(operator: str, left: Any, right: Any) -> None:
    """Refuse ``left OP right`` before computing it when its size is over the budget."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, _SIZED) and isinstance(n, int):
                _check_length(seq, len(seq) * max(n, 0), "a '*' repetition")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateBudgetError(f"a '*' would make an integer of over {MAX_INT_BITS} bits")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if left.bit_length() * right > MAX_INT_BITS:
            raise TemplateBudgetError(f"a '**' would make an integer of over {MAX_INT_BITS} bits")
    elif operator == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
        _check_length(left, len(left) + len(right), "a '+' concatenation")
    elif operator == "%" and isinstance(left, str):
        _check_size(_format_size(left, right, "%", "a '%' format"), "a '%' format")


# ----------------------------------------------------------------------------- the environment


class _BudgetedCodeGenerator(CodeGenerator):
    """Compiles every ``{% for %}`` over ``environment.guard_loop(...)`` and every ``~`` through
    ``environment.bounded_pieces(...)``: the two places jinja's sandbox has no hook."""

    def visit_For(self, node: nodes.For, frame: Any) -> None:
        guarded = copy.copy(node)
        guarded.iter = nodes.Call(nodes.EnvironmentAttribute("guard_loop"), [node.iter], [], None, None,
                                  lineno=node.lineno)
        super().visit_For(guarded, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"{join}(environment.bounded_pieces((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(")))")


class _Dict:
    """transformers' ``dict`` global: a callable without dict's class attributes to reach through."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(Namespace):
    """transformers' ``namespace``: no underscore-prefixed names stored on it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805  (jinja's signature trick: namespace(self=...))
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot store {name[:40]!r} on a namespace")


def _guarded_filter(name: str, func: Callable, size: Callable[..., int] | None, kind: str) -> Callable:
    passes_arg = getattr(func, "jinja_pass_arg", None) is not None  # context/environment/eval context first

    @functools.wraps(func)  # keeps jinja_pass_arg
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        what = f"{kind} {name!r}"
        if size is not None:
            _check_size(size(*(args[1:] if passes_arg else args), **kwargs), what)
        return _check_result(func(*args, **kwargs), what)

    return guarded


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """``ImmutableSandboxedEnvironment`` whose every hook also checks the render budget."""

    code_generator_class = _BudgetedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(finalize=self._finalize_value, **kwargs)
        self.globals["range"] = self._range
        self.globals.pop("lipsum", None)  # lorem ipsum of n paragraphs: no template needs it
        self.filters = {n: _guarded_filter(n, f, FILTER_SIZES.get(n), "filter") for n, f in self.filters.items()}
        self.tests = {n: _guarded_filter(n, f, None, "test") for n, f in self.tests.items()}

    def add_filter(self, name: str, func: Callable) -> None:
        self.filters[name] = _guarded_filter(name, func, FILTER_SIZES.get(name), "filter")

    # hooks of SandboxedEnvironment
    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _binop_size(operator, left, right)
        return _check_result(super().call_binop(context, operator, left, right), f"a {operator!r}")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        _tick()
        if isinstance(__obj, LoopContext) and args:  # a recursive loop(...) iterates under the budget too
            args = (__self.guard_loop(args[0]),) + args[1:]
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        method = getattr(__obj, "__name__", "")
        if isinstance(owner, str) and method in STR_METHOD_SIZES:
            _check_size(STR_METHOD_SIZES[method](owner, *args, **kwargs), f"str.{method}")
        return _check_result(super().call(__context, __obj, *args, **kwargs), f"calling {method or 'a function'}")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    # hooks the code generator adds
    def guard_loop(self, iterable: Any) -> Iterator[Any]:
        budget = _CURRENT.get()
        for item in iterable:
            if budget is not None:
                budget.iterations += 1
                if budget.iterations > MAX_LOOP_ITERATIONS:
                    raise TemplateBudgetError(f"more than {MAX_LOOP_ITERATIONS} loop iterations")
                budget.tick()
            yield item

    def bounded_pieces(self, pieces: Sequence[Any]) -> Sequence[Any]:
        _tick()
        _check_size(sum(text_size(p) for p in pieces), "a '~' concatenation")
        return pieces

    def concat(self, pieces: Iterable[str]) -> str:  # macros, {% set %} blocks, caller(): buffered output
        pieces = list(pieces)
        _check_size(sum(map(len, pieces)), "a captured block")
        return "".join(pieces)

    def _finalize_value(self, value: Any) -> Any:
        _check_size(text_size(value), "a value written out")
        return value

    @staticmethod
    def _range(*args: Any) -> range:
        rng = range(*args)
        try:
            n = len(rng)
        except OverflowError:
            n = MAX_LOOP_ITERATIONS + 1
        if n > MAX_LOOP_ITERATIONS:
            raise TemplateBudgetError(f"a range of {n if n <= 10**12 else 'over 10**12'} items "
                                      f"(limit {MAX_LOOP_ITERATIONS} loop iterations)")
        return rng


def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping, with indent/separators/sort_keys
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    _check_size(16 * len(str(fmt)), "strftime_now")  # a directive writes at most a few dozen characters
    return datetime.now().strftime(fmt)


def chat_environment(extensions: Sequence[Any] = ()) -> BudgetedEnvironment:
    """The environment of ``transformers.apply_chat_template`` (trim/lstrip blocks, loop controls,
    ``tojson``, ``raise_exception``, ``strftime_now``, its ``dict`` and ``namespace``), budgeted."""
    env = BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=["jinja2.ext.loopcontrols", *extensions])
    env.add_filter("tojson", _tojson)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace)
    return env
