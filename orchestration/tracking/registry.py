"""Model registry and loading a model by URI, without pickles.

* :func:`log_and_register_model` logs the model as an MLflow *logged model* that is a pyfunc
  ("models from code", :mod:`orchestration.serving.package`) around ``model.safetensors`` +
  ``config.json`` + ``serving.json`` (no pickle) and registers it as ``vit-<variant>-<dataset>``
  (a timm network: ``<timm name>-<dataset>``, its ``config.json`` carrying the timm name and the
  timm version, also set as the version's ``timm_name`` / ``timm_version`` tags) with lineage
  tags; :func:`load_model` rebuilds the network from the first two files and never unpickles;
  ``mlflow.pyfunc.load_model`` / ``mlflow models serve`` serve it.
* Embedded store vs ``mlflow server``: a server validates a model version's source against the
  ids sent with it (``models:/m-...`` needs ``model_id``), stores artifacts behind
  ``mlflow-artifacts:/`` (proxied, local disk or S3) instead of ``file://`` paths, and puts the
  tracking URI (user-info included) into its messages. Registration sends ``model_id`` and
  ``run_id``, every artifact goes through MLflow's artifact API (never a local path), and every
  printed or logged line is redacted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow

if TYPE_CHECKING:
    from torch import nn

    from orchestration.serving.spec import ServingSpec
from orchestration.tracking.redact import redact, redact_text
from orchestration.tracking.runs import client, public_uri, resolve_uri

log = logging.getLogger(__name__)


MODEL_WEIGHTS_FILE = "model.safetensors"


MODEL_CONFIG_FILE = "config.json"


PYFUNC_ARTIFACTS = "artifacts"  # where a registered pyfunc keeps the two files above


MODEL_FORMAT = "vitscale-pyfunc-1"  # tag on the logged model: which loader reads it (safetensors-1: no pyfunc)


_PICKLE_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")


class UnsafeModelError(ValueError):
    """A model artifact that could only be loaded by unpickling it (which runs arbitrary code)."""


def write_model_dir(model: nn.Module, out_dir: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.safetensors`` (weights + config metadata, plus ``metadata``: e.g. the
    ``vitscale.objective`` it was trained with) and ``config.json`` into ``out_dir``."""
    from model.weights import save_weights

    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, out_dir / MODEL_WEIGHTS_FILE, metadata=metadata)
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2, sort_keys=True))
    return out_dir


def register_model_dir(
    local_dir: Path,
    *,
    run_id: str,
    name: str,
    tags: Mapping[str, Any],
    description: str = "",
    uri: str | None = None,
    await_s: int = 300,
) -> int:
    """Log ``local_dir`` as a logged model of ``run_id`` and register it as a new version of ``name``.

    The version's source is ``models:/<model_id>`` and the request carries both ``model_id`` and
    ``run_id``: an ``mlflow server`` validates the source against them (the embedded store does
    not), and the version keeps its lineage to the run. MLflow's own wait
    (``await_creation_for``) raises unless the version becomes READY. Returns the version number.
    """
    c = client(uri)
    clean = redact(tags)
    run = c.get_run(run_id)
    logged = c.create_logged_model(
        run.info.experiment_id, name="model", source_run_id=run_id,
        tags={"vitscale.format": MODEL_FORMAT, **{k: v for k, v in clean.items() if len(v) < 500}},
    )
    try:
        c.log_model_artifacts(logged.model_id, str(local_dir))
    except BaseException:
        c.finalize_logged_model(logged.model_id, "FAILED")
        raise
    c.finalize_logged_model(logged.model_id, "READY")
    try:
        c.create_registered_model(name, description=description or None)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = c.create_model_version(
        name, source=f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id,
        tags=clean, description=description or None, await_creation_for=await_s,
    )
    return int(mv.version)


def log_and_register_model(
    model: Any,
    *,
    run_id: str,
    name: str,
    tags: Mapping[str, Any],
    description: str = "",
    uri: str | None = None,
    metadata: dict[str, str] | None = None,
    serving: ServingSpec | None = None,
) -> int:
    """Register ``model`` (a VisionTransformer or a timm zoo network) as a pyfunc around
    ``model.safetensors`` + ``config.json`` + ``serving.json``.

    Nothing is pickled: :func:`load_model` rebuilds the network from the config with this
    repository's ``model`` package and loads the tensors with safetensors; the pyfunc is a code
    file of ours. ``serving``: the eval transform and class names the model was trained with
    (``serving.spec.spec_for_experiment``); without it the project's default transform at the
    model's image size and index class names (tagged ``serving.preprocess=default``). ``tags``
    (lineage) go on the model version; ``metadata`` into the safetensors file. Returns the new
    version number.
    """
    from orchestration.serving.package import write_pyfunc_dir
    from orchestration.serving.spec import default_spec

    spec = serving or default_spec(model.cfg)
    spec.check_model(model.cfg, f"registering {name}")
    serving_tags = {"serving.preprocess": "recorded" if serving else "default", "serving.image_size": spec.image_size,
                    "serving.crop_pct": spec.crop_pct, "serving.outputs": "embedding" if spec.embedding_only
                    else f"top-k of {len(spec.class_names)} classes ({spec.activation}) + embedding"}
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "kind", None) == "timm":  # which timm architecture, built by which timm
        tags = {**tags, "timm_name": cfg.name, "timm_version": cfg.timm_version}
    with tempfile.TemporaryDirectory() as tmp:
        plain = write_model_dir(model.cpu().eval(), Path(tmp) / "plain", metadata)
        local = write_pyfunc_dir(plain, spec, Path(tmp) / "model")
        return register_model_dir(local, run_id=run_id, name=name, tags={**serving_tags, **tags},
                                  description=description, uri=uri)


def load_model(source: str, uri: str | None = None, *, allow_resample: bool = False,
               allow_cast: bool = False) -> nn.Module:
    """A network (our ViT or a timm zoo network) from ``models:/NAME/VERSION``, ``models:/m-<id>``,
    ``runs:/ID/PATH`` or a path.

    The artifacts are downloaded through MLflow's artifact API (``file://``, proxied
    ``mlflow-artifacts:/`` and S3 alike) and must be ``model.safetensors`` (+ ``config.json``) or
    a single ``.safetensors`` file with ``vitscale.config`` metadata. Nothing is unpickled: a
    pickled model (an ``mlflow.pytorch`` ``data/model.pth``, any ``.pt``/``.pkl``) raises
    :class:`UnsafeModelError` without its bytes ever reaching ``pickle``. The tensors are checked
    against the config before the model is built (:func:`model_from_path`).
    """
    conv = {"allow_resample": allow_resample, "allow_cast": allow_cast}
    if not source.startswith(("models:/", "runs:/")):
        return model_from_path(Path(source), source, **conv)
    uri = resolve_uri(uri)
    client(uri)  # sets the fluent API's tracking/registry URI for the artifact download
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri)
        except mlflow.exceptions.MlflowException as e:
            if source.startswith("models:/"):
                _model_version(source, uri)  # an unknown name/version/alias: what the store has instead
            raise FileNotFoundError(f"could not download model {source} from tracking store {store_name(uri)}: "
                                    f"{redact_text(e.message)}") from e
        return model_from_path(Path(local), source, **conv)


def model_from_path(path: Path, source: str, *, allow_resample: bool = False,
                    allow_cast: bool = False) -> nn.Module:
    """Rebuild a model from a downloaded model folder or ``.safetensors`` file (see :func:`load_model`).

    The file's tensors (names, shapes, dtypes: its header) are checked against the config before
    the model is built, so a file that only claims a huge model is refused without allocating it.
    ``allow_resample`` / ``allow_cast`` are ``model.weights.load_weights``'s opt-in conversions.
    """
    from model import build_network, config_from_dict, load_network_weights
    from model.network import check_network_file
    from model.weights import read_header

    if not path.exists():
        raise FileNotFoundError(f"model source {source!r}: not a models:/ or runs:/ URI and no such file")
    pyfunc = path / PYFUNC_ARTIFACTS
    if path.is_dir() and not (path / MODEL_WEIGHTS_FILE).exists() and (pyfunc / MODEL_WEIGHTS_FILE).is_file():
        path = pyfunc  # the pyfunc layout (serving.package): the two files sit under artifacts/
    if path.is_dir():
        weights, config_file = path / MODEL_WEIGHTS_FILE, path / MODEL_CONFIG_FILE
    else:
        weights, config_file = path, None
    if not weights.is_file() or weights.suffix != ".safetensors":
        _refuse_non_safetensors(path, source)
    try:
        _, meta = read_header(weights)  # the safetensors header only: no code runs, no tensor is read
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise UnsafeModelError(f"{source}: {weights.name} is not a valid safetensors file ({e})") from e
    raw = meta.get("vitscale.config")
    try:
        meta_cfg = config_from_dict(json.loads(raw)) if raw else None
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{source}: the 'vitscale.config' inside {weights.name} is not a valid model config "
                         f"({' '.join(str(e).split())})") from e
    cfg = meta_cfg
    if config_file is not None and config_file.is_file():
        try:
            cfg = config_from_dict(json.loads(config_file.read_text()))
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{source}: {MODEL_CONFIG_FILE} is not a valid model config "
                             f"({' '.join(str(e).split())})") from e
    if cfg is None:
        raise ValueError(f"{source}: {weights.name} carries no 'vitscale.config' metadata and there is no "
                         f"{MODEL_CONFIG_FILE}; export it with model.weights.save_weights")
    if meta_cfg is not None and meta_cfg != cfg:
        raise ValueError(f"{source}: {MODEL_CONFIG_FILE} and the config inside {weights.name} disagree "
                         f"({cfg} vs {meta_cfg}); the artifact was modified after registration")
    check_network_file(weights, cfg, allow_resample=allow_resample, allow_cast=allow_cast)  # before allocating
    return load_network_weights(build_network(cfg), weights, allow_resample=allow_resample, allow_cast=allow_cast)


def _refuse_non_safetensors(path: Path, source: str) -> None:
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path.name]
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    what = f"pickle files {pickles}" if pickles else f"files {files[:10]}"
    raise UnsafeModelError(
        f"{source} has no {MODEL_WEIGHTS_FILE} (found {what}); vitscale never unpickles a model artifact "
        "because loading a pickle runs arbitrary code. Register the model's safetensors export instead "
        "(orchestration.tracking.log_and_register_model, or load runs:/<RUN_ID>/weights/model.safetensors, "
        "which every training run logs)"
    )


def resolve_model_source(source: str, uri: str | None = None) -> dict[str, Any]:
    """Describe a ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/ID/PATH`` or local
    ``.safetensors`` source.

    Returns ``{"kind", "run_id" (or None), "tags" (version/run lineage tags), "uri"}``.
    ``models:/NAME/latest`` picks the highest version. A name, version, alias or run the tracking
    store does not have raises LookupError naming the store searched and what it does have.
    """
    if source.startswith("models:/"):
        mv = _model_version(source, uri)
        name = mv.name
        return {
            "kind": "registry",
            "run_id": mv.run_id,
            "tags": dict(mv.tags),
            "uri": f"models:/{name}/{mv.version}",
            "name": name,
            "version": int(mv.version),
        }
    if source.startswith("runs:/"):
        run_id = source[len("runs:/") :].split("/")[0]
        try:
            tags = dict(client(uri).get_run(run_id).data.tags)
        except mlflow.exceptions.MlflowException as e:
            if not _missing(e):
                raise
            raise LookupError(f"{source}: run {run_id!r} not found in tracking store {store_name(uri)}; "
                              f"{_WHICH_STORE}") from e
        return {"kind": "run", "run_id": run_id, "tags": tags, "uri": source}
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model source {source!r}: not a models:/ or runs:/ URI and no such file")
    return {"kind": "file", "run_id": None, "tags": {}, "uri": str(path.resolve())}


_WHICH_STORE = ("point --tracking-uri (or MLFLOW_TRACKING_URI) at the store that has it: runs started without "
                "it use sqlite:///<state dir>/mlflow.db, orchestration.state")


def store_name(uri: str | None = None) -> str:
    """The tracking store ``uri`` resolves to, fit for a message (no password, secrets masked)."""
    return redact_text(public_uri(resolve_uri(uri)))


def _missing(e: mlflow.exceptions.MlflowException) -> bool:
    return e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(e.message).lower()


def _model_version(source: str, uri: str | None) -> Any:
    """The ModelVersion ``models:/NAME/VERSION|latest`` or ``models:/NAME@ALIAS`` names; LookupError
    (with the store and what it holds) when the store has no such model, version or alias."""
    c = client(uri)
    ref = source[len("models:/") :].strip("/")
    name, _, alias = ref.partition("@") if "@" in ref.split("/")[0] else (ref.split("/")[0], "", "")
    version = "" if alias else (ref.split("/") + [""])[1]
    try:
        if alias:
            return c.get_model_version_by_alias(name, alias)
        if version in ("latest", ""):
            versions = c.search_model_versions(f"name='{name}'")
            if versions:
                return max(versions, key=lambda v: int(v.version))
        else:
            return c.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as e:
        if not _missing(e):
            raise
    raise LookupError(f"{source}: {_what_store_has(c, name, version, alias)} in tracking store {store_name(uri)}; "
                      f"{_WHICH_STORE}")


def _what_store_has(c: Any, name: str, version: str, alias: str) -> str:
    """'registered model X not found (it has: ...)' / 'model X has no version 3 (versions: 1, 2)' ..."""
    try:
        model = c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        names = sorted(m.name for m in c.search_registered_models(max_results=20))
        return f"registered model {name!r} not found (registered models there: {', '.join(names) or 'none'})"
    versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
    if alias:
        aliases = sorted(getattr(model, "aliases", {}) or {})
        return f"registered model {name!r} has no alias {alias!r} (aliases: {', '.join(aliases) or 'none'})"
    if not versions:
        return f"registered model {name!r} has no versions"
    return f"registered model {name!r} has no version {version} (versions: {', '.join(map(str, versions))})"
