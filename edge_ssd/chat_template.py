"""Rendering a bundle's chat template: Jinja's immutable sandbox, with bounds.

A chat template is code that comes with the bundle and runs on every chat request. The
sandbox keeps it from reaching the process, but not from running for ever or filling memory:
`range` is capped at 100k items per call, and nested loops multiply. A template past a bound
is a RequestError "chat template: ... too long", and the server answers 400.

* Every loop: a line tracer on the template's own frames (Jinja compiles templates to Python
  code named "<template>") counts the lines they run, so loops over range, messages, strings
  and recursive macros are bounded alike; it also checks the wall clock, and now and then
  the process's peak memory.
* One operation that would take all memory or minutes before the next line (`'x' * 10**10`,
  `3 ** 10**9`, `' '|center(10**10)`): `*` and `**`, and the arguments of calls and filters,
  are checked before they run.
* Growth from one step to the next: what a `namespace` (the only state a loop carries from
  one iteration to the next) holds, and what a macro is called with, is capped in size, so
  a string doubled forty times is stopped at 16M characters, not at 1 TB.
* The output is capped as it is produced.
"""
from __future__ import annotations

import functools
import sys
import time
from typing import Any

from .errors import RequestError

MAX_STEPS = 1_000_000       # lines of template code run per render (each loop iteration runs one)
MAX_SECONDS = 5.0           # wall clock per render
MAX_CHARS = 16 << 20        # rendered text
MAX_GROWTH = 256 << 20      # growth of the process's peak resident memory during a render
MAX_SIZE = 1 << 20          # items one `*` may make; largest integer argument of a call or filter
MEMORY_EVERY = 64           # steps between two looks at the peak memory (1-2 us each)
MAX_EXPONENT = 4096         # largest `**` exponent (of a base other than -1, 0, 1)


class TemplateTooLong(Exception):
    """A render went past one of the bounds."""


def render_template(source: str, **context: Any) -> str:
    """`source` rendered with `context`; RequestError for a template that fails or runs too long."""
    from jinja2.exceptions import TemplateError

    try:
        template = _compiled(source)
    except TemplateError as e:
        raise RequestError(f"chat template failed to compile: {e}") from e
    budget = Budget()
    previous = sys.gettrace()
    sys.settrace(budget.trace)  # this thread only
    try:
        return budget.collect(template.generate(**context))
    except RequestError:  # the template's own raise_exception
        raise
    except TemplateTooLong as e:
        raise RequestError(f"chat template: {e}") from None
    except RecursionError:
        raise RequestError("chat template: its recursion is too long (too deep)") from None
    except OverflowError as e:  # the sandbox's own range cap
        raise RequestError(f"chat template: a loop is too long ({e})") from None
    except MemoryError:
        raise RequestError("chat template: its output is too long (out of memory)") from None
    except TemplateError as e:
        raise RequestError(f"chat template failed to render: {e}") from e
    except Exception as e:  # noqa: BLE001 - the bundle's template is at fault, not the server
        raise RequestError(f"chat template failed to render: {type(e).__name__}: {e}") from e
    finally:
        sys.settrace(previous)


def _raise_exception(msg: str) -> None:
    """The `raise_exception` Hugging Face templates call to refuse messages."""
    raise RequestError(f"chat template: {msg}")


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    """A template compiled once (a few ms; rendering is tens of microseconds); Jinja's
    templates may be rendered from several threads at once."""
    from jinja2.utils import Namespace

    class BoundedNamespace(Namespace):
        def __setitem__(self, name: str, value: Any) -> None:
            _check_value(value)
            super().__setitem__(name, value)

    env = _bounded_sandbox()(trim_blocks=True, lstrip_blocks=True)
    env.globals.pop("lipsum", None)  # any amount of text in one call, and no template needs it
    env.globals.update(raise_exception=_raise_exception, namespace=BoundedNamespace)
    return env.from_string(source)


def _peak_rss() -> int:
    """Peak resident memory of the process in bytes (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Budget:
    """What one render may still spend: steps, time, memory, output."""

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS
        self.memory_limit = _peak_rss() + MAX_GROWTH

    def trace(self, frame, event, arg):
        """The global tracer: line-trace the template's frames only."""
        return self._line if frame.f_code.co_filename == "<template>" else None

    def _line(self, frame, event, arg):
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateTooLong(f"rendering is too long (more than {MAX_STEPS:,} steps)")
        if self.steps % MEMORY_EVERY == 0:
            if _peak_rss() > self.memory_limit:
                raise TemplateTooLong(f"rendering is too long (it took more than {MAX_GROWTH >> 20} MiB)")
            self.check_time()
        return self._line

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateTooLong(f"rendering is too long (more than {MAX_SECONDS:g} s)")

    def collect(self, chunks) -> str:
        out, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            if size > MAX_CHARS:
                raise TemplateTooLong(f"its output is too long (more than {MAX_CHARS:,} characters)")
            out.append(chunk)
        self.check_time()
        return "".join(out)


def _check_value(v: Any) -> None:
    """A value a template keeps or passes on: no huge count (an int that sizes something) and no
    huge string or list."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SIZE:
        raise TemplateTooLong(f"a value is too long ({v})")
    if isinstance(v, (str, list, tuple)) and len(v) > MAX_CHARS:
        raise TemplateTooLong(f"a value is too long ({len(v):,} items)")


def _check_arguments(args: tuple, kwargs: dict) -> None:
    for v in (*args, *kwargs.values()):
        _check_value(v)


def _bounded_filter(fn):
    @functools.wraps(fn)  # keeps Jinja's pass_context / pass_environment marks
    def bounded(*args, **kwargs):
        _check_arguments(args, kwargs)
        return fn(*args, **kwargs)

    return bounded


@functools.lru_cache(maxsize=1)
def _bounded_sandbox() -> type:
    """The sandbox class, made once (jinja2 is imported only when a template is rendered)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.filters = {name: _bounded_filter(f) for name, f in self.filters.items()}

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SIZE:
                        raise TemplateTooLong(f"a repetition is too long ({len(seq)} x {n})")
            elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > MAX_EXPONENT:
                raise TemplateTooLong(f"a power is too long (exponent {right})")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
            _check_arguments(args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

    return BoundedSandbox
