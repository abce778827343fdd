"""Typed ``--set path=value`` overrides of an :class:`Experiment`.

Paths follow the experiment's sections (``train.optim.lr``, ``data.augment.hflip``,
``model.dropout``, ``resources.workers``, ``eval.split``). Every key and value is checked against
the dataclass field types *before* any Ray worker starts: an unknown key names the closest valid
ones and lists the keys of the section it reached, a wrong type names key, expected type and
value (docs/design.md, convention 2).
"""

from __future__ import annotations

import ast
import types
import typing
from collections.abc import Sequence
from typing import Any

from confkit import ConfigValueError, PathError
from confkit.paths import leaf_type, replace_paths
from orchestration.experiment.checks import ConfigError, OverrideError, experiment_problems
from orchestration.experiment.config import Experiment

# Values the experiment derives; overriding them is overriding their source.
_ALIASES: dict[str, str] = {"data.image_size": "image_size", "data.batch_size": "train.micro_batch"}
# Leaves that say which class a section is: a recipe chooses them, --set does not switch them.
_FIXED_SUFFIX = ".kind"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in {"true", "1", "yes", "on"}:
        return True
    if low in {"false", "0", "no", "off"}:
        return False
    raise ValueError(text)


def _literal_or_text(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_typed(text: str, tp: Any) -> Any:
    """Parse ``text`` as a value of type ``tp`` (int, float, bool, str, Literal, tuples, unions).

    Raises ValueError when it does not fit. ``none``/``null`` is accepted for optional types.
    Tuples accept ``0.9,0.999`` or ``(0.9, 0.999)``.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _literal_or_text(text)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in {"none", "null"}:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_typed(text, arg)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text.strip():
                return choice
        raise ValueError(text)
    if origin is tuple:
        raw = text.strip()
        if raw.startswith(("(", "[")):
            items = ast.literal_eval(raw)
            parts = [repr(x) if not isinstance(x, str) else x for x in items]
        else:
            parts = [p.strip() for p in raw.split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_typed(p, args[0]) for p in parts)
        if len(parts) != len(args):
            raise ValueError(text)
        return tuple(parse_typed(p, a) for p, a in zip(parts, args, strict=True))
    if tp is bool:
        return _parse_bool(text)
    if tp is int:
        value = text.strip().replace("_", "")
        if value.lower().endswith(("k", "m")) and value[:-1].isdigit():
            return int(value[:-1]) * (1000 if value[-1].lower() == "k" else 1_000_000)
        return int(value)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    if origin in (list, Sequence) or tp in (list, dict) or origin is dict:
        value = ast.literal_eval(text)
        if not isinstance(value, origin or tp):
            raise ValueError(text)
        return value
    raise ValueError(text)


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise OverrideError(f"override {item!r} is not of the form key=value (e.g. train.optim.lr=3e-4)")
    key, value = item.split("=", 1)
    return key.strip(), value


def _parse_one(exp: Experiment, item: str) -> tuple[str, Any]:
    """``(path, typed value)`` of one ``key=value``; OverrideError names key, type and value."""
    key, text = _split(item)
    path = _ALIASES.get(key, key)
    if path.endswith(_FIXED_SUFFIX) or path == "kind":
        raise OverrideError(f"{key!r} is chosen by the recipe (pick another --recipe), not by --set")
    try:
        tp = leaf_type(exp, path)
    except PathError as e:
        raise OverrideError(str(e)) from None
    try:
        return path, parse_typed(text, tp)
    except (ValueError, SyntaxError, TypeError):
        raise OverrideError(f"bad value for {key!r}: expected {_type_name(tp)}, got {text!r}") from None


def apply_overrides(exp: Experiment, overrides: Sequence[str]) -> Experiment:
    """Return ``exp`` with ``["train.optim.lr=3e-4", "data.io.num_workers=4", "resources.workers=2"]``
    applied.

    Values are parsed to the field's annotated type. ``data.image_size`` is another name for
    ``image_size`` and ``data.batch_size`` for ``train.micro_batch`` (the experiment derives the
    data config's copies from those); ``train.global_batch`` (the optimisation hyper-parameter)
    stays, and the gradient accumulation is re-derived from it.

    Every problem is collected (unknown keys, unparsable values, each section's own range
    checks, the launch-level checks of :func:`experiment_problems`) and raised at once as a
    :class:`ConfigError`, one line per problem.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    for item in overrides:
        try:
            path, value = _parse_one(exp, item)
            values[path] = value
        except OverrideError as e:
            problems.append(str(e))
    out = exp
    try:
        out = replace_paths(exp, values)
    except ConfigValueError as e:
        problems += e.problems
        out = None
    if out is not None:
        problems += experiment_problems(out)
    if problems:
        raise ConfigError(problems)
    return out
