"""What makes an evaluation number a measurement: the errors raised when it would not be one.

A top-1 over fewer than two classes is 1.0 whatever the model; a class without training images
can never be predicted; NaN/Inf features give a classifier of NaNs (``torch.linalg`` then fails
obscurely, or ``argmax`` picks class 0 for everything). Each of these raises an
:class:`EvaluationError` (a ``ValueError``) naming the dataset or model and the fix; the CLIs
print it as one ``error:`` line and exit 2. Inside training see
:mod:`orchestration.evaluation.in_training` for what happens instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EvaluationError(ValueError):
    """An evaluation would not measure anything; the message says what and how to fix it."""


class NonFiniteError(EvaluationError):
    """A model's weights or its features hold NaN/Inf values."""


def _weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    m = getattr(model, "module", model)
    return [*m.named_parameters(), *((n, b) for n, b in m.named_buffers() if b.is_floating_point())]


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters and float buffers that hold a NaN or an Inf."""
    return [name for name, t in _weights(model) if t.numel() and not bool(torch.isfinite(t).all())]


def check_finite_weights(model: nn.Module, what: str) -> None:
    """Raise :class:`NonFiniteError` when ``model`` (called ``what`` in the message, e.g. ``--model
    PATH``) has NaN/Inf weights. Needs full tensors: not for a ZeRO-3 partitioned model."""
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(
            f"{what}: {len(bad)} of its {len(_weights(model))} weight tensors hold NaN/Inf values (e.g. "
            f"{', '.join(bad[:3])}): a damaged checkpoint or a diverged run; use an earlier checkpoint")


def count_nonfinite(x: Tensor) -> int:
    return int((~torch.isfinite(x)).sum().item())


def check_finite(x: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` when features ``x`` hold NaN/Inf; ``what`` names them."""
    n = count_nonfinite(x)
    if n:
        raise NonFiniteError(nonfinite_message(what, n, x.numel()))


def nonfinite_message(what: str, n: int, total: int) -> str:
    return (f"{what}: {n} of {total} feature values are NaN/Inf, so no classifier can be fitted or scored; the "
            "model's weights are damaged or it diverged (or its precision overflows): use an earlier checkpoint")
