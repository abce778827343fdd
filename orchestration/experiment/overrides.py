"""Typed ``--set section.key=value`` overrides of an :class:`Experiment`.

Every key and value is checked against the dataclass field types *before* any Ray worker
starts: an unknown key lists the valid keys of its section, a wrong type names key, expected
type and value (DESIGN.md convention 2).
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from model import ViTConfig
from orchestration.experiment.checks import ConfigError, OverrideError, build_component, experiment_problems
from orchestration.experiment.config import Experiment
from pipeline import DataConfig
from training import TrainConfig

_SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig, "model": ViTConfig}


# Fields the experiment derives itself; overriding them would be silently undone.
_MODEL_FIXED = {"num_classes", "image_size", "variant"}


_EXP_FIXED = {"data", "train", "model_overrides"}
# Overrides of a value the experiment derives: (section, key) -> (section or None for top level, key).
_ALIASES: dict[tuple[str, str], tuple[str | None, str]] = {
    ("data", "image_size"): (None, "image_size"),
    ("data", "batch_size"): ("train", "micro_batch"),
}


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
        raise OverrideError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
    key, value = item.split("=", 1)
    return key.strip(), value


def _valid_keys(cls: type, exclude: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    return sorted(f.name for f in dataclasses.fields(cls) if f.name not in exclude)


def _parse_one(item: str, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
    """Parse one ``key=value`` into ``top`` / ``sections``; OverrideError names key, type and value."""
    key, text = _split(item)
    if "." in key:
        section, name = key.split(".", 1)
        if section not in _SECTIONS:
            raise OverrideError(
                f"unknown section {section!r} in {key!r}; valid sections: data, model, train "
                f"(or a top-level key: {', '.join(_valid_keys(Experiment, _EXP_FIXED))})"
            )
        cls = _SECTIONS[section]
        exclude = _MODEL_FIXED if section == "model" else set()
        hints = typing.get_type_hints(cls)
        if name not in hints or name in exclude or name not in {f.name for f in dataclasses.fields(cls)}:
            raise OverrideError(
                f"unknown key {key!r}; valid keys of {section!r}: "
                + ", ".join(f"{section}.{k}" for k in _valid_keys(cls, exclude))
            )
        tp, target = hints[name], sections[section]
    else:
        name = key
        hints = typing.get_type_hints(Experiment)
        if name not in hints or name in _EXP_FIXED:
            raise OverrideError(
                f"unknown key {key!r}; valid top-level keys: {', '.join(_valid_keys(Experiment, _EXP_FIXED))}"
                " (and data.*, train.*, model.*)"
            )
        tp, target = hints[name], top
    try:
        target[name] = parse_typed(text, tp)
    except (ValueError, SyntaxError, TypeError):
        raise OverrideError(f"bad value for {key!r}: expected {_type_name(tp)}, got {text!r}") from None


def apply_overrides(exp: Experiment, overrides: Sequence[str]) -> Experiment:
    """Return ``exp`` with ``["train.lr=3e-4", "data.batch_size=64", "workers=2", ...]`` applied.

    Keys: top-level Experiment fields (``workers``, ``image_size``, ...), ``data.<field>``,
    ``train.<field>``, ``model.<ViTConfig field>`` (stored in ``model_overrides``). Values are
    parsed to the field's annotated type. Unknown keys raise :class:`OverrideError` listing the
    valid keys of that section; values of the wrong type name key, expected type and value.
    ``data.image_size`` is another name for ``image_size`` and ``data.batch_size`` for
    ``train.micro_batch`` (the experiment derives the data config's copies from those);
    ``train.global_batch`` (the optimisation hyper-parameter) stays, and the gradient
    accumulation is re-derived from it.

    Every problem is collected (unparsable overrides, each component config's own range checks,
    the launch-level checks of :func:`experiment_problems`) and raised at once as a
    :class:`ConfigError`, one line per problem.
    """
    problems: list[str] = []
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {"data": {}, "train": {}, "model": {}}
    for item in overrides:
        try:
            _parse_one(item, top, sections)
        except OverrideError as e:
            problems.append(str(e))
    for (section, name), (target, key) in _ALIASES.items():
        if name in sections[section]:
            (top if target is None else sections[target]).setdefault(key, sections[section].pop(name))

    train = build_component("train", lambda: replace(exp.train, **sections["train"]), problems)
    derived = {"image_size": top.get("image_size", exp.image_size), "batch_size": (train or exp.train).micro_batch}
    data = build_component("data", lambda: replace(exp.data, **sections["data"], **derived), problems)
    if data is None:  # its lines already name a bad image_size; keep the recipe's so the rest still runs
        top.pop("image_size", None)
    model_overrides = {**exp.model_overrides, **sections["model"]}
    # A component that failed is replaced by the recipe's own, so the remaining checks still run.
    out = replace(exp, data=data or exp.data, train=train or exp.train, model_overrides=model_overrides, **top)
    problems += experiment_problems(out, consistency=data is not None and train is not None)
    if problems:
        raise ConfigError(problems)
    return out
