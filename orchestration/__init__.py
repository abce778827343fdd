"""Orchestration: the only package that sees a whole experiment (docs/design.md).

Sub-packages are the steps of a run:

* ``experiment/`` - the ``Experiment`` (typed sections), recipes, typed ``--set`` overrides, validation
* ``launch/``     - Ray connection, one ``build_run`` for pre-training, fine-tuning and Tune trials,
  Ray Train launch, checkpoints on storage, the run lease, one training run end to end
* ``tracking/``   - secret redaction, MLflow runs and sink, registry, loading a model by URI
* ``studies/``    - a study = base recipe + grid of overrides; trials, the Tune study, scaling fit/report/plots
* ``evaluation/`` - few-shot linear and linear-probe evaluation, their result rows
* ``data/``       - data preparation and audits distributed as Ray tasks

Thin CLIs, the commands users run: ``pretrain.py``, ``finetune.py``, ``sweep.py``, ``evaluate.py``,
``visualize.py``, ``prepare.py``, ``audit.py``, ``scaling.py`` (fit a points table) and ``rayjob.py``
(render a KubeRay RayJob).
Heavy imports (ray, mlflow, torch) happen in the submodules, not here.
"""
