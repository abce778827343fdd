"""Promotion: move a registry alias (``champion``) to a version only when it measures better.

``evaluate.py ... --promote champion --metric fewshot/digits/10shot`` evaluates the candidate, and the
version the alias points at now with the same evaluation (same data, same seed: a number recorded
at another time on other data is not comparable), then calls :func:`promote`. Higher is better
(the project's evaluation metrics are accuracies). Both numbers go on the candidate version as
tags, whatever the decision, so a refused promotion is visible in the registry too::

    promote.<alias>.metric            fewshot/digits/10shot
    promote.<alias>.value             0.91
    promote.<alias>.champion_version  3          ("" when the alias was unset)
    promote.<alias>.champion_value    0.88       ("" when the alias was unset)
    promote.<alias>.decision          promoted | kept <alias> on version 3 | already <alias>
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlflow

from orchestration.tracking.runs import client


def current_holder(name: str, alias: str, uri: str | None = None) -> int | None:
    """The version ``name@alias`` points at, or None when the alias is not set."""
    try:
        return int(client(uri).get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def promote(name: str, version: int, alias: str, *, metric: str, value: float,
            champion_value: Callable[[int], float], uri: str | None = None) -> dict[str, Any]:
    """Point ``name@alias`` at ``version`` iff ``value`` beats the current holder's (strictly).

    ``champion_value(v)`` measures version ``v`` the same way ``value`` was measured; it is called
    only when another version holds the alias. Returns ``{"promoted", "decision", "value",
    "champion_version", "champion_value"}`` and records it on the candidate version as tags.
    """
    if not math.isfinite(value):
        raise ValueError(f"{metric}={value} is not a finite number: nothing to promote on")
    holder = current_holder(name, alias, uri)
    champ: float | None = None
    if holder == version:
        promoted, decision = False, f"already {alias}"
    elif holder is None:
        promoted, decision = True, "promoted"
    else:
        champ = float(champion_value(holder))
        promoted = value > champ
        decision = "promoted" if promoted else f"kept {alias} on version {holder}"
    c = client(uri)
    if promoted:
        c.set_registered_model_alias(name, alias, str(version))
    tags = {"metric": metric, "value": f"{value:.6g}", "champion_version": "" if holder is None else str(holder),
            "champion_value": "" if champ is None else f"{champ:.6g}", "decision": decision}
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), f"promote.{alias}.{k}", v)
    return {"promoted": promoted, "decision": decision, "value": value, "champion_version": holder,
            "champion_value": champ}
