"""Launching a run: Ray connection, one ``build_run`` for every kind of run, Ray Train, the driver.

* ``cluster`` - connect to a Ray cluster, or start a private local instance with its own token
* ``build``   - :func:`build.build_run`: loaders, model, Trainer of an Experiment (pre-training,
  fine-tuning and Tune trials alike), :func:`build.resume`
* ``train``   - Ray Train ``TorchTrainer`` launch (driver) and the per-worker function
* ``store``   - checkpoints on storage (``StorageCheckpointStore``, where a run's checkpoints live)
* ``lease``   - the run folder's lease (one live run per folder)
* ``driver``  - :func:`driver.launch`: MLflow run + lease + Ray Train + registration

Heavy imports (ray, torch, deepspeed) happen inside the functions that need them.
"""
