"""Studies: a base recipe + a grid of overrides, run as Ray Tune trials; the scaling-law analysis.

* ``spec``   - :class:`spec.StudySpec`, size specs, the trial's overrides and Tune's param space
* ``trial``  - one trial (a Tune function trainable) built by ``launch.build.build_run``
* ``points`` - what each evaluation adds to the study table; the trial's sink
* ``tune_study`` - run / resume a study on Ray Tune, then table, fit, plots and the study's MLflow run
* ``table``, ``law``, ``sizes``, ``plots``, ``scaling_report`` - the points table, the saturating power law
  fit, per-size curves, its plots and the report (``python -m orchestration.scaling``)
"""
