"""Nested config sections by dotted path: to and from plain dicts, flattening, typed replacement.

A *section* is a dataclass field whose type is a dataclass (``TrainConfig.optim``), or a union
of dataclasses told apart by their ``kind`` field (``TrainConfig.objective``: classification or
MAE); a *leaf* is any other field. Paths name leaves: ``optim.lr``, ``objective.mask_ratio``.
Paths through a union section follow the instance at hand, so ``objective.mask_ratio`` exists
only while the objective is MAE.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from .checks import ConfigValueError


class PathError(ValueError):
    """A dotted path that names no field, or a dict that does not fit its dataclass."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_options(tp: Any) -> tuple[type, ...]:
    """The dataclasses a field of type ``tp`` may hold (empty for a leaf)."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return (tp,)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = tuple(a for a in typing.get_args(tp) if dataclasses.is_dataclass(a))
        if options and len(options) == len([a for a in typing.get_args(tp) if a is not type(None)]):
            return options
    return ()


def section_types(cls: type) -> dict[str, tuple[type, ...]]:
    """``{field name: the dataclass types it may hold}`` for the section fields of ``cls``."""
    out = {}
    for f in dataclasses.fields(cls):
        options = _dataclass_options(_hints(cls)[f.name])
        if options:
            out[f.name] = options
    return out


def _kind(cls: type) -> str | None:
    for f in dataclasses.fields(cls):
        if f.name == "kind" and isinstance(f.default, str):
            return f.default
    return None


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-able nested dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def _is_tuple_type(tp: Any) -> bool:
    if typing.get_origin(tp) is tuple:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is tuple for a in typing.get_args(tp))
    return False


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def from_dict(cls: type, values: Mapping[str, Any], *, where: str = "") -> Any:
    """Inverse of :func:`to_dict`: rebuild ``cls`` (and its sections) from a nested dict.

    Missing keys take their defaults; an unknown key is a :class:`PathError` naming it (a config
    written by another version of the code must not be half-read). Union sections pick their
    class by the dict's ``kind``.
    """
    if not isinstance(values, Mapping):
        raise PathError(f"{where or cls.__name__}: expected a mapping of fields, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PathError(f"unknown field(s) {', '.join(where + k for k in unknown)} for {cls.__name__}; valid: "
                        + ", ".join(where + k for k in sorted(fields)))
    sections = section_types(cls)
    kwargs: dict[str, Any] = {}
    for name, v in values.items():
        if name in sections and isinstance(v, Mapping):
            kwargs[name] = from_dict(_pick(sections[name], v, where + name), v, where=f"{where}{name}.")
        elif _is_tuple_type(_hints(cls)[name]) and isinstance(v, list):
            kwargs[name] = _tuples(v)
        else:
            kwargs[name] = v
    return cls(**kwargs)


def _pick(options: tuple[type, ...], values: Mapping[str, Any], where: str) -> type:
    if len(options) == 1:
        return options[0]
    kinds = {_kind(c): c for c in options}
    kind = values.get("kind")
    if kind not in kinds:
        raise PathError(f"{where}.kind={kind!r} must be one of {', '.join(repr(k) for k in kinds)}")
    return kinds[kind]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 1e-3, "schedule.total_steps": 1000, ...}``: every leaf by its path."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out.update(flatten(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def field_paths(obj: Any, *, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Every leaf path of the config instance ``obj``, sorted (for "valid keys" messages)."""
    return sorted(p for p in flatten(obj) if p not in exclude)


def closest_keys(key: str, valid: list[str], n: int = 3) -> list[str]:
    """The valid keys most like ``key`` (a misspelling, or the right leaf in another section)."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [v for v in valid if v.rsplit(".", 1)[-1] == leaf]
    if same_leaf:  # the right name in another section (an old flat key, a section left out)
        return same_leaf[:n]
    return difflib.get_close_matches(key, valid, n=n, cutoff=0.6) or difflib.get_close_matches(leaf, valid, n=n,
                                                                                               cutoff=0.5)


def leaf_type(obj: Any, path: str) -> Any:
    """The annotated type of the leaf ``path`` of ``obj``; :class:`PathError` if it names none.

    The error suggests the closest valid paths and lists the keys of the deepest section the
    path did reach (all top-level keys and section names when it reached none).
    """
    node, parts, reached = obj, path.split("."), ""
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(node)}
        value = getattr(node, part, None) if part in names else None
        last = i == len(parts) - 1
        is_section = dataclasses.is_dataclass(value) and not isinstance(value, type)
        if part not in names or is_section == last:
            hint = closest_keys(path, field_paths(obj))
            where = f"valid keys of {reached.rstrip('.')!r}" if reached else "valid keys"
            listed = [reached + k for k in field_paths(node)] if reached else _top_keys(node)
            raise PathError(f"unknown key {path!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
                            + f" ({where}: {', '.join(listed)})")
        if last:
            return _hints(type(node))[part]
        node, reached = value, f"{reached}{part}."
    raise PathError(f"empty key {path!r}")


def _top_keys(obj: Any) -> list[str]:
    """Leaves of ``obj`` itself, then its sections as ``name.*``."""
    leaves, sections = [], []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        (sections if dataclasses.is_dataclass(v) and not isinstance(v, type) else leaves).append(f.name)
    return sorted(leaves) + [f"{s}.*" for s in sorted(sections)]


def replace_paths(obj: Any, values: Mapping[str, Any]) -> Any:
    """``obj`` with each ``{"optim.lr": 3e-4, "seed": 1}`` leaf replaced, sections rebuilt bottom-up.

    Every section re-validates itself; all problems are raised at once as one
    :class:`ConfigValueError` whose lines carry the full path (``optim.lr=-1 must be ...``).
    A section that fails leaves its parent unbuilt (the parent's cross-field rules would only
    restate the same mistake).
    """
    for path in values:
        leaf_type(obj, path)  # PathError for an unknown key, before anything is built
    problems: list[str] = []
    out = _replace(obj, dict(values), "", problems)
    if problems:
        raise ConfigValueError(type(obj).__name__, problems)
    return out


_FIELD_FIRST = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def prefixed(prefix: str, line: str) -> str:
    """``optim.`` + ``lr=inf must be ...``; a line that does not start with ``field=`` gets ``optim: ``."""
    if not prefix or _FIELD_FIRST.match(line):
        return prefix + line
    return f"{prefix.rstrip('.')}: {line}"


def _replace(obj: Any, values: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, v in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = v
        else:
            direct[head] = v
    failed = False
    for name, sub in nested.items():
        built = _replace(getattr(obj, name), sub, f"{prefix}{name}.", problems)
        if built is None:
            failed = True  # keep the old section, so this level's own fields are still checked
        else:
            direct[name] = built
    try:
        out = dataclasses.replace(obj, **direct)
        return None if failed else out
    except ConfigValueError as e:
        problems.extend(prefixed(prefix, p) for p in e.problems)
    except (ValueError, TypeError) as e:
        problems.extend(f"{prefix.rstrip('.') or type(obj).__name__}: {line.strip()}"
                        for line in str(e).splitlines() if line.strip())
    return None
