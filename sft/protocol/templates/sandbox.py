"""The environment chat templates render in: transformers' (same text for the same template) plus bounds.

transformers (5.x) renders in an `ImmutableSandboxedEnvironment` with trim_blocks/lstrip_blocks, loop
controls, a plain-JSON `tojson`, `raise_exception`, `strftime_now` (here: a fixed date, see jinja.py), a
`dict` global that is only a constructor, and a `namespace` that refuses underscore names; jinja2>=3.1.6.
A template is code from a stranger (a model directory, a checkpoint), so
rendering is also bounded here: a wall-clock budget checked at every call, filter, operator, attribute
and item access, range item and output piece; an output size; ranges, string and list repetition and
powers checked before they are built; no `{% include %}`/`{% import %}`/`{% extends %}` (there are no
files to read). Going past a bound raises `RenderLimit`.
"""

from __future__ import annotations

import contextvars
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

TIME_LIMIT_S = 10.0  # per render: real templates take milliseconds, even on long conversations
OUTPUT_LIMIT = 1 << 25  # characters per render, and per string or list a template builds (32 Mi)
MAX_RANGE = 100_000  # as jinja's sandbox
MAX_EXPONENT = 4096

# Unicode noncharacters, reserved for a program's internal use: they bracket the output of each
# `{% generation %}` block so its position survives macros, `set` blocks and filters, then are removed.
OPEN, CLOSE = "\ufdd0", "\ufdd1"
MARKERS = re.compile(f"[{OPEN}{CLOSE}]")
_WIDE_FORMAT = re.compile(r"\d{8,}")  # a width or precision of 10^7 or more in a format string


class RenderLimit(jinja2.exceptions.SecurityError):
    """A template went past a bound on rendering time or size."""


@dataclass
class _Budget:
    deadline: float
    output_limit: int

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimit("rendering took longer than its time limit")

    def size(self, value: Any) -> Any:
        if isinstance(value, str | list | tuple | dict | range) and len(value) > self.output_limit:
            raise RenderLimit(f"it built a value of {len(value):,} items (limit {self.output_limit:,})")
        return value


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")


def _check_arguments(budget: _Budget, args: tuple, kwargs: dict) -> None:
    budget.check()
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and abs(value) > budget.output_limit:
            raise RenderLimit(f"an argument of {value:,} is past the output limit")


def _bounded(function: Callable) -> Callable:
    """A filter or global that checks the budget before it runs and the size of what it returns."""

    @wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        _check_arguments(budget, args, kwargs)
        return budget.size(function(*args, **kwargs))

    return call


def _range(*args: int) -> Iterator[int]:
    values = range(*args)
    if len(values) > MAX_RANGE:
        raise RenderLimit(f"range of {len(values):,} items (limit {MAX_RANGE:,})")
    budget = _BUDGET.get()
    for value in values:
        budget.check()
        yield value


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with every operation charged to the current render's budget."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        budget.check()
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, str | list | tuple) and isinstance(count, int):
                    if len(sequence) * count > budget.output_limit:
                        raise RenderLimit(f"a repetition of {len(sequence) * count:,} items")
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise RenderLimit(f"an exponent of {right:,} (limit {MAX_EXPONENT:,})")
        return budget.size(super().call_binop(context, operator, left, right))

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _BUDGET.get()
        _check_arguments(budget, args, kwargs)
        return budget.size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _WIDE_FORMAT.search(value.__self__):
            raise RenderLimit("a format string with a width or precision past the output limit")
        return wrapped

    def getattr(self, obj: Any, attribute: str) -> Any:
        _BUDGET.get().check()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _BUDGET.get().check()
        return super().getitem(obj, argument)


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks the text the model generates (transformers' tag)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: jinja2.runtime.Macro) -> str:
        return OPEN + caller() + CLOSE


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON (as transformers renders it).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` only: no attribute of the real type to climb out through."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore-prefixed names (no access to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's own signature trick)
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")


def _environment() -> BoundedEnvironment:
    environment = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.filters = {name: _bounded(function) for name, function in environment.filters.items()}
    environment.tests = {name: _bounded(function) for name, function in environment.tests.items()}
    environment.globals.pop("lipsum")  # generates text of any size; no chat template uses it
    environment.globals["range"] = _range
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment


ENVIRONMENT = _environment()
FORBIDDEN_NODES = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from … import"}
FORBIDDEN_NODES[nodes.Extends] = "extends"


def forbidden_statement(parsed: nodes.Template) -> str | None:
    """The first statement that would read another template (there are none to read), or None."""
    for node_type, statement in FORBIDDEN_NODES.items():
        if next(parsed.find_all(node_type), None) is not None:
            return statement
    return None


@contextmanager
def render_budget(time_limit_s: float, output_limit: int) -> Iterator[_Budget]:
    budget = _Budget(time.monotonic() + time_limit_s, output_limit)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def bounded_render(template: jinja2.Template, time_limit_s: float, output_limit: int, **context: Any) -> str:
    """Render with the time and size bounds; RenderLimit (or RecursionError/MemoryError) past them."""
    with render_budget(time_limit_s, output_limit) as budget:
        pieces, length = [], 0
        for piece in template.generate(**context):
            length += len(piece)
            if length > output_limit:
                raise RenderLimit(f"its output passed {output_limit:,} characters")
            budget.check()
            pieces.append(piece)
        return "".join(pieces)
