"""Orchestration: the only package that sees a whole experiment (DESIGN.md).

* ``recipes``      - ``Experiment`` + recipe functions (paper Table 3, T4, CPU smoke), typed overrides
* ``tracking``     - MLflow runs/sink/registry, secret redaction
* ``ray_launch``   - Ray Train ``TorchTrainer`` plumbing and the per-worker training function
* ``pretrain``     - CLI: pre-train a recipe on Ray, register the model
* ``finetune``     - CLI: the paper's transfer recipe at a higher resolution, nested run, register
* ``visualize``    - [CLS] attention per layer/head and attention rollout as PNG
* ``storage_ckpt`` - ``training.checkpoint.CheckpointStore`` on ``pipeline.storage`` (S3 or path)

Heavy imports (ray, mlflow, torch) happen in the submodules, not here.
"""
