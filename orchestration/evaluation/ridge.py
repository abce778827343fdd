"""Closed-form ridge regression onto {-1, 1}^C targets, as big_vision's ``fewshot_lsr``.

Features are whitened with the support set's mean and std and get a constant column
``BIAS_CONSTANT`` (a bias that the L2 penalty barely touches, big_vision's trick), then

    W(l2) = (X^T X + l2 I)^-1 X^T Y,    Y = 2 * onehot(y) - 1.

One eigendecomposition of the smaller Gram matrix (X^T X when N >= D, else X X^T) gives W and
the exact leave-one-out predictions for every l2 of the grid at the cost of a matmul each, so
the regulariser is chosen on the support set itself (each support image held out in turn, as
sklearn's ``RidgeCV`` does) and never looks at the test split. Everything is float64 on the
features' device (the accelerator during training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_finite

#: The constant feature that stands for the bias (big_vision ``fewshot_lsr.BIAS_CONSTANT``).
BIAS_CONSTANT = 100.0
#: big_vision's regulariser grid: 2**-10 .. 2**19.
L2_GRID: tuple[float, ...] = tuple(2.0**k for k in range(-10, 20))
_STD_EPS = 1e-5


@dataclass(frozen=True)
class Whitening:
    mean: Tensor  # (1, D) float64
    std: Tensor  # (1, D) float64

    def __call__(self, x: Tensor) -> Tensor:
        """(N, D) features -> (N, D + 1) whitened float64 features with the bias column."""
        z = (x.to(torch.float64) - self.mean) / self.std
        return torch.nn.functional.pad(z, (0, 1), value=BIAS_CONSTANT)


def whitening(x: Tensor) -> Whitening:
    x = x.to(torch.float64)
    return Whitening(mean=x.mean(0, keepdim=True), std=x.std(0, unbiased=False, keepdim=True) + _STD_EPS)


def targets(y: Tensor, num_classes: int) -> Tensor:
    """Labels (N,) -> (N, C) float64 in {-1, 1}."""
    return 2.0 * torch.nn.functional.one_hot(y.long(), num_classes).to(torch.float64) - 1.0


class RidgeSolver:
    """Ridge fits for many regularisers from one eigendecomposition of ``x`` (N, D)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        x, y = x.to(torch.float64), y.to(torch.float64)  # (N, D), (N, C)
        self.x, self.y = x, y
        self.dual = x.shape[0] < x.shape[1]
        gram = x @ x.T if self.dual else x.T @ x  # (N, N) or (D, D)
        e, q = torch.linalg.eigh(gram)
        self.e = e.clamp_min(0.0)  # round-off can make zero eigenvalues slightly negative
        self.q = q
        # P diag(1/(e + l2)) P^T is the hat matrix X (X^T X + l2)^-1 X^T in both forms.
        self.p = q * self.e.sqrt() if self.dual else x @ q  # (N, r)
        self.pty = self.p.T @ y  # (r, C)

    def weights(self, l2: float) -> Tensor:
        """W (D, C) with ``x @ W`` the ridge fit."""
        inv = 1.0 / (self.e + l2)
        if self.dual:  # X^T (X X^T + l2)^-1 Y
            return self.x.T @ (self.q @ (inv[:, None] * (self.q.T @ self.y)))
        return self.q @ (inv[:, None] * (self.q.T @ (self.x.T @ self.y)))

    def loo_predictions(self, l2: float) -> Tensor:
        """Exact leave-one-out predictions (N, C): row i from a fit without sample i."""
        inv = 1.0 / (self.e + l2)
        fitted = self.p @ (inv[:, None] * self.pty)  # (N, C)
        h = (self.p.square() * inv).sum(1, keepdim=True)  # (N, 1) hat diagonal
        # y_i - loo_i = (y_i - fitted_i) / (1 - h_ii)  (Sherman-Morrison)
        return self.y - (self.y - fitted) / (1.0 - h).clamp_min(1e-12)


def choose_l2(solver: RidgeSolver, labels: Tensor, grid: tuple[float, ...] = L2_GRID) -> float:
    """The grid value with the best leave-one-out accuracy on the support set.

    Ties go to the lower leave-one-out squared error, then to the larger regulariser. When
    the accuracy says nothing (equal for the whole grid, as always at 1 shot: a held-out
    image's class has no other example) the squared error would pick the largest value, which
    shrinks the map to its bias; the smallest regulariser (nearest the least-squares fit)
    is taken instead.
    """
    if not grid:
        raise ValueError("the regulariser grid is empty; pass e.g. ridge.L2_GRID")
    labels = labels.long()
    scored = []
    for l2 in grid:
        loo = solver.loo_predictions(l2)
        acc = (loo.argmax(1) == labels).double().mean().item()
        mse = (loo - solver.y).square().mean().item()
        scored.append((acc, -mse, l2))
    if len({s[0] for s in scored}) == 1:
        return min(grid)
    return max(scored)[2]


@dataclass(frozen=True)
class LinearClassifier:
    """A fitted few-shot classifier: whitening + ridge weights."""

    white: Whitening
    w: Tensor  # (D + 1, C) float64
    l2: float

    def scores(self, feats: Tensor) -> Tensor:
        return self.white(feats.to(self.w.device)) @ self.w  # (N, C)

    def predict(self, feats: Tensor) -> Tensor:
        return self.scores(feats).argmax(1)


def fit_fewshot(feats: Tensor, labels: Tensor, num_classes: int, grid: tuple[float, ...] = L2_GRID,
                l2: float | None = None) -> LinearClassifier:
    """Fit on support features (N, D) with labels (N,); ``l2=None`` picks it from ``grid``.

    NaN/Inf features raise :class:`~.checks.NonFiniteError` (an eigendecomposition of them would
    fail with an unrelated ``LinAlgError``)."""
    check_finite(feats, "fit_fewshot")
    white = whitening(feats)
    solver = RidgeSolver(white(feats), targets(labels.to(feats.device), num_classes))
    chosen = choose_l2(solver, labels.to(feats.device), grid) if l2 is None else float(l2)
    return LinearClassifier(white=white, w=solver.weights(chosen), l2=chosen)
