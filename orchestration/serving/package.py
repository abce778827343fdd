"""The folder a registered model is: an MLflow pyfunc ("models from code") around safetensors.

::

    MLmodel                      flavor python_function, loader = the code file, the signature
    pyfunc_model.py              orchestration/serving/pyfunc_model.py, copied (never pickled)
    artifacts/model.safetensors  the weights (tracking.load_model reads them as before)
    artifacts/config.json        the ViTConfig
    artifacts/serving.json       the eval transform and class names (ServingSpec)
    requirements.txt, python_env.yaml, conda.yaml

The signature: input a ``binary`` column ``image``; params ``top_k`` (long) and
``return_embedding`` (boolean); output ``classes`` (string array), ``probabilities`` (double
array), ``embedding`` (float array, optional; the only output of a model without a head).
"""

from __future__ import annotations

import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestration.serving.spec import SERVING_FILE, ServingSpec

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_REQUIREMENTS = ("torch", "safetensors", "pillow", "numpy", "pandas", "mlflow")


def signature(spec: ServingSpec, *, tokenizer: bool = False) -> Any:
    """The model signature MLflow validates requests against (see the module docstring); a
    ``tokenizer`` (BEiT's dVAE) answers ``tokens`` only: one visual token id per patch."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    outputs = [] if spec.embedding_only else [ColSpec(Array(DataType.string), "classes"),
                                              ColSpec(Array(DataType.double), "probabilities")]
    outputs.append(ColSpec(Array(DataType.float), "embedding", required=spec.embedding_only))
    if tokenizer:
        outputs = [ColSpec(Array(DataType.long), "tokens")]
    params = ParamSchema([ParamSpec("top_k", DataType.long, spec.top_k),
                          ParamSpec("return_embedding", DataType.boolean, False)])
    return ModelSignature(inputs=Schema([ColSpec(DataType.binary, "image")]), outputs=Schema(outputs), params=params)


def requirements() -> list[str]:
    """The installed versions of what the pyfunc imports (besides vitscale itself)."""
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def _is_tokenizer(config_file: Path) -> bool:
    import json

    return json.loads(config_file.read_text()).get("kind") == "dvae"


def write_pyfunc_dir(plain: Path, spec: ServingSpec, out: Path) -> Path:
    """Wrap ``plain`` (``model.safetensors`` + ``config.json``, ``tracking.write_model_dir``) and
    ``spec`` into the pyfunc folder ``out`` (which must not exist). Returns ``out``."""
    import mlflow

    (plain / SERVING_FILE).write_text(spec.to_json())
    artifacts = {"weights": plain / WEIGHTS_FILE, "config": plain / CONFIG_FILE, "serving": plain / SERVING_FILE}
    missing = [str(p) for p in artifacts.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot package the model: missing {missing}")
    with warnings.catch_warnings():
        # An input example would make MLflow run the model at save time; the signature says it all.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        mlflow.pyfunc.save_model(
            path=str(out), python_model=str(PYFUNC_FILE), artifacts={k: str(v) for k, v in artifacts.items()},
            signature=signature(spec, tokenizer=_is_tokenizer(plain / CONFIG_FILE)),
            pip_requirements=requirements(),
        )
    return out

