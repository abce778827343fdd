"""Serving registered models: the pyfunc (models from code), Ray Serve, batch prediction on Ray Data.

* ``spec``       - :class:`ServingSpec` (``serving.json``): eval transform, class names, request limits
* ``predictor``  - :class:`Predictor`: encoded images -> top-k and embeddings (every server uses it)
* ``package``    - the MLflow pyfunc folder a registered model is (MLmodel, signature, artifacts)
* ``pyfunc_model`` - the "models from code" file MLflow loads (never pickled)
* ``ray_serve``  - the same pyfunc as an autoscaled Ray Serve deployment (``orchestration/serve.py``)
* ``batch``      - prediction over whole datasets on Ray Data, one Parquet file per shard
  (``orchestration/predict.py``)

This package's ``__init__`` imports nothing, so ``tracking.registry`` can use ``spec`` and
``package`` while ``ray_serve`` and ``batch`` use ``tracking`` (no import cycle).
"""
