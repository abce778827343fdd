"""Downstream evaluation of a pre-trained model: few-shot linear (``fewshot``, also inside training:
``in_training``), linear probe (``linear``), support sets (``support_sets``), what is not a
measurement (``checks``), and the result rows that they and fine-tune results share (``results``).

CLI: ``python orchestration/evaluate.py fewshot|linear --model models:/NAME/VERSION --data URL``.
"""

from .checks import EvaluationError, NonFiniteError, nonfinite_parameters
from .fewshot import DEFAULT_SHOTS, FewShotConfig, FewShotResult, evaluate_fewshot, open_pools, pre_logits
from .linear import evaluate_linear
from .results import EvalReport, ResultRow
from .ridge import L2_GRID, LinearClassifier, RidgeSolver, choose_l2, fit_fewshot
from .support_sets import FewShotDataError, check_classes, check_shots, open_pool, select_support

__all__ = [
    "DEFAULT_SHOTS",
    "L2_GRID",
    "EvalReport",
    "EvaluationError",
    "FewShotConfig",
    "FewShotDataError",
    "FewShotResult",
    "LinearClassifier",
    "NonFiniteError",
    "ResultRow",
    "RidgeSolver",
    "check_classes",
    "check_shots",
    "choose_l2",
    "evaluate_fewshot",
    "evaluate_linear",
    "fit_fewshot",
    "nonfinite_parameters",
    "open_pool",
    "open_pools",
    "pre_logits",
    "select_support",
]
