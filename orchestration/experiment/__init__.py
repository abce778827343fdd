"""Defining a run: the :class:`Experiment` dataclass, recipes, typed overrides, validation.

* ``config``     - :class:`Experiment` (model spec + component configs + eval + Ray resources), (de)serialisation
* ``recipes``    - one function per thing we train (paper Table 3, T4, CPU smoke)
* ``overrides``  - typed ``--set path=value`` (:func:`apply_overrides`: ``train.optim.lr=3e-4``)
* ``checks``     - launch-level checks of a whole experiment (no I/O), :class:`ConfigError`
* ``validation`` - checks that need I/O (dataset, storage) and how every CLI reports problems

Pre-training, fine-tuning and every Tune trial are all an ``Experiment``: one way to define a run.
"""

from orchestration.experiment.checks import (
    ConfigError,
    OverrideError,
    experiment_problems,
    validate,
    with_workers,
)
from orchestration.experiment.config import (
    EvalSpec,
    Experiment,
    Resources,
    experiment_from_dict,
    experiment_to_dict,
    flatten_experiment,
    name_problems,
)
from orchestration.experiment.overrides import apply_overrides, parse_typed
from orchestration.experiment.recipes import RECIPES, get_recipe

__all__ = [
    "RECIPES", "ConfigError", "EvalSpec", "Experiment", "OverrideError", "Resources", "apply_overrides",
    "experiment_from_dict", "experiment_problems", "experiment_to_dict", "flatten_experiment", "get_recipe",
    "name_problems", "parse_typed", "validate", "with_workers",
]
