"""Orchestration: the only package that sees a whole experiment (DESIGN.md).

Sub-packages are the steps of a run:

* ``experiment/`` - the ``Experiment`` dataclass, recipes, typed ``--set`` overrides, validation
* ``launch/``     - Ray connection, one ``build_run`` for pre-training, fine-tuning and Tune trials,
  Ray Train launch, checkpoints on storage, the run lease, the run driver
* ``tracking/``   - secret redaction, MLflow runs and sink, registry, loading a model by URI
* ``studies/``    - a study = base recipe + grid of overrides; trial, driver, scaling fit/report/plots

Thin CLIs, the commands users run: ``pretrain.py``, ``finetune.py``, ``sweep.py``,
``visualize.py``, ``scaling.py`` (fit a points table) and ``rayjob.py`` (render a KubeRay RayJob).
Heavy imports (ray, mlflow, torch) happen in the submodules, not here.
"""
