"""The MLflow pyfunc of a registered vitscale model, logged as "models from code".

MLflow copies this file into the model folder and runs it on load (``mlflow.pyfunc.load_model``,
``mlflow models serve``): it defines :class:`VitPyfunc` and hands an instance to
``mlflow.models.set_model``. Nothing is pickled: the weights are ``artifacts/model.safetensors``,
the config and the eval transform JSON (``config.json``, ``serving.json``). The serving host needs
vitscale importable (the project's container image, or ``pip install -e .``).

Input: a DataFrame with a binary ``image`` column (JPEG/PNG/WebP bytes; base64 strings in a JSON
request, which MLflow decodes from the signature). Params: ``top_k`` (default from
serving.json), ``return_embedding``. Output: one row per image with ``classes`` and
``probabilities`` (top-k, best first) and ``embedding`` when asked (always, and only, for a
model without a head). A bad row fails the request with a 400 naming the row.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

INPUT_COLUMN = "image"


class VitPyfunc(mlflow.pyfunc.PythonModel):
    """A :class:`orchestration.serving.predictor.Predictor` behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        from pathlib import Path

        from orchestration.serving.predictor import Predictor

        folder = Path(context.artifacts["weights"]).parent  # model.safetensors, config.json, serving.json
        self.predictor = Predictor.from_dir(folder, where="registered model")

    # ``model_input`` is left unannotated on purpose: MLflow reads a type hint there as a
    # type-hint signature and would then parse requests differently (an ``inputs`` key only).
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> Any:  # noqa: ANN001
        import pandas as pd

        from orchestration.serving.predictor import BadRequest

        rows = _rows(model_input)
        params = params or {}
        try:
            results = self.predictor.predict(rows, top_k=params.get("top_k"),
                                             return_embedding=params.get("return_embedding", False), strict=True)
        except BadRequest as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(results)


def _rows(model_input: Any) -> list[Any]:
    """The ``image`` column as a list (a DataFrame, a dict of columns or a bare list of bytes)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            cols = list(model_input.columns)
            if len(cols) != 1:
                raise MlflowException(f"expected a column {INPUT_COLUMN!r} of encoded images, got columns {cols}",
                                      error_code=INVALID_PARAMETER_VALUE)
            return model_input[cols[0]].tolist()
        return model_input[INPUT_COLUMN].tolist()
    if isinstance(model_input, dict) and INPUT_COLUMN in model_input:
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    raise MlflowException(f"expected a DataFrame with a column {INPUT_COLUMN!r} of encoded images, got "
                          f"{type(model_input).__name__}", error_code=INVALID_PARAMETER_VALUE)


mlflow.models.set_model(VitPyfunc())
