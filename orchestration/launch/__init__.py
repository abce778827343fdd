"""Launching a run: Ray connection, one ``build_run`` for every kind of run, Ray Train, one run end to end.

* ``cluster``          - connect to a Ray cluster, or start a private local instance in a folder of ours
* ``build``            - :func:`build.build_run`: loaders, model, Trainer of an Experiment (pre-training,
  fine-tuning and Tune trials alike), :func:`build.resume`
* ``ray_train``        - Ray Train ``TorchTrainer`` launch (on the driver) and the per-worker function
* ``checkpoint_store`` - checkpoints on storage (``StorageCheckpointStore``, where a run's checkpoints live)
* ``lease``            - the run folder's lease (one live run per folder)
* ``pretrain_run``     - :func:`pretrain_run.launch`: lease + MLflow run + Ray Train + registration

Heavy imports (ray, torch, deepspeed) happen inside the functions that need them.
"""
