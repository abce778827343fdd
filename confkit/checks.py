"""Field validation for config sections: one helper, one message style.

A section's ``__post_init__`` makes a :class:`Checker`, states its rules, and calls
:meth:`Checker.done`, which raises one :class:`ConfigValueError` listing *every* problem, one
line each, as ``field=value must be ...`` (so a launch reports all its mistakes at once, and the
override layer can prefix each line with the section's path: ``train.optim.lr=inf ...``).

Each rule returns whether it held, so a cross-field rule can skip values already reported
(``if c.int("global_batch", ge=1) and c.int("micro_batch", ge=1): c.require(...)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


class ConfigValueError(ValueError):
    """Every problem of one config section; ``problems`` has one line per problem.

    ``str()`` is ``invalid <Owner>:`` followed by the indented lines, as the CLIs print it.
    """

    def __init__(self, owner: str, problems: Sequence[str]) -> None:
        self.owner = owner
        self.problems = [" ".join(str(p).split("\n")) for p in problems]
        super().__init__(f"invalid {owner}:\n  " + "\n  ".join(self.problems))


def is_int(v: Any) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count to a user)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): inf/nan slip through range comparisons otherwise."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _bounds(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    high = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" >= {ge}" if ge is not None else f" > {gt}"
    if high:
        return f" <= {le}" if le is not None else f" < {lt}"
    return ""


def _within(v: float, ge: float | None, gt: float | None, le: float | None, lt: float | None) -> bool:
    return ((ge is None or v >= ge) and (gt is None or v > gt) and (le is None or v <= le)
            and (lt is None or v < lt))


class Checker:
    """Collects the problems of one config object; see the module docstring."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.problems: list[str] = []

    def _value(self, name: str) -> Any:
        return getattr(self.cfg, name)

    def fail(self, message: str) -> bool:
        self.problems.append(message)
        return False

    def require(self, ok: bool, message: str) -> bool:
        """A rule that only this section can state (cross-field); ``message`` is the whole line."""
        return True if ok else self.fail(message)

    def int(self, name: str, *, ge: int | None = None, gt: int | None = None, le: int | None = None,
            optional: bool = False, why: str = "") -> bool:
        """An int (not a bool) within the bounds; ``optional``: None is allowed too."""
        v = self._value(name)
        if optional and v is None:
            return True
        if is_int(v) and _within(v, ge, gt, le, None):
            return True
        alt = " (or none)" if optional else ""
        return self.fail(f"{name}={v!r} must be an int{_bounds(ge, gt, le, None)}{alt}{why}")

    def number(self, name: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
               lt: float | None = None, unit: str = "", optional: bool = False, why: str = "") -> bool:
        """A finite number within the bounds; ``unit="seconds"`` reads "a finite number of seconds > 0"."""
        v = self._value(name)
        if optional and v is None:
            return True
        if is_number(v) and _within(v, ge, gt, le, lt):
            return True
        of = f" of {unit}" if unit else ""
        alt = " (or none)" if optional else ""
        return self.fail(f"{name}={v!r} must be a finite number{of}{_bounds(ge, gt, le, lt)}{alt}{why}")

    def numbers(self, name: str, count: int, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None, ordered: bool = False,
                optional: bool = False, why: str = "") -> bool:
        """A tuple of ``count`` finite numbers, each within the bounds (``ordered``: non-decreasing)."""
        v = self._value(name)
        if optional and v is None:
            return True
        ok = (isinstance(v, tuple | list) and len(v) == count and all(is_number(x) for x in v)
              and all(_within(x, ge, gt, le, lt) for x in v))
        if ok and ordered:
            ok = all(a <= b for a, b in zip(v, v[1:], strict=False))
        if ok:
            return True
        order = " with min <= max" if ordered else ""
        each = f", each{_bounds(ge, gt, le, lt)}" if _bounds(ge, gt, le, lt) else ""
        return self.fail(f"{name}={v!r} must be {count} finite numbers{each}{order}{why}")

    def choice(self, name: str, choices: Iterable[Any], why: str = "") -> bool:
        """One of ``choices``."""
        v = self._value(name)
        options = tuple(choices)
        if v in options and type(v) is type(options[options.index(v)]):
            return True
        listed = ", ".join(repr(c) for c in options)
        return self.fail(f"{name}={v!r} must be one of {listed}{why}")

    def flag(self, name: str) -> bool:
        """True or False (not 0/1, not a string)."""
        v = self._value(name)
        return True if isinstance(v, bool) else self.fail(f"{name}={v!r} must be True or False")

    def text(self, name: str, *, why: str = "") -> bool:
        """A non-empty string."""
        v = self._value(name)
        return True if isinstance(v, str) and v else self.fail(f"{name}={v!r} must be a non-empty string{why}")

    def done(self) -> None:
        """Raise :class:`ConfigValueError` with every problem found, if any."""
        if self.problems:
            raise ConfigValueError(type(self.cfg).__name__, self.problems)
