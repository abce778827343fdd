"""Typed config sections shared by every component (stdlib only; imports nothing of ours).

Each component owns a small frozen dataclass made of sections (``TrainConfig(optim=...,
schedule=...)``, ``DataConfig(augment=..., io=...)``); this package holds the two things they
all need, written once:

* :class:`Checker` (``confkit.checks``): field validation (range, finite, choice, int) with
  one message style, ``lr=inf must be a finite number > 0``;
* ``confkit.paths``: nested sections as plain dicts and back (:func:`to_dict`,
  :func:`from_dict`, :func:`flatten`), and typed replacement by dotted path
  (:func:`replace_paths`: ``{"optim.lr": 3e-4}``), whose errors name the full path and, for a
  misspelled key, the closest valid ones.

It sits below ``model``, ``pipeline`` and ``training`` in the one-way import order (they may
import it; it imports only the standard library).
"""

from .checks import Checker, ConfigValueError
from .paths import (
    PathError,
    closest_keys,
    field_paths,
    flatten,
    from_dict,
    replace_paths,
    section_types,
    to_dict,
)

__all__ = [
    "Checker",
    "ConfigValueError",
    "PathError",
    "closest_keys",
    "field_paths",
    "flatten",
    "from_dict",
    "replace_paths",
    "section_types",
    "to_dict",
]
