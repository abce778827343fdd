"""Fine-tune a pre-trained ViT at a (higher) resolution: the paper's transfer recipe, on Ray.

Examples::

    ray job submit --working-dir . -- python orchestration/finetune.py \\
        --from models:/vit-b16-i21k/3 --data s3://bucket/imagenet1k --image-size 384

    python orchestration/finetune.py --from models:/vit-mu4-digits/latest --data s3://vitscale/digits \\
        --image-size 48 --set train.schedule.total_steps=100 --set train.schedule.warmup_steps=10 --set train.global_batch=32

Three protocols (``--protocol``; ``orchestration.experiment.finetune_protocols``), chosen by how the
source was pre-trained unless asked for:

* ``vit`` (Dosovitskiy et al. 2020, Section 3.2 and Appendix B.1.1 / Table 4): the pre-training
  head (and its hidden "pre-logits" layer) is replaced by one zero-initialised linear layer on the
  class token; SGD with momentum 0.9, no weight decay, linear warmup then cosine decay, gradient
  clipping at global norm 1, batch 512.
* ``mae`` (He et al. 2021, facebookresearch/mae FINETUNE.md), the default for a model pre-trained
  with MAE: mean pooling with a fresh ``fc_norm`` and a zero-initialised head, drop path
  0.1/0.2/0.3 (B/L/H), AdamW with lr = blr x batch / 256 (blr 5e-4 B, 1e-3 L/H), weight decay
  0.05, layer decay 0.65 (B) / 0.75 (L, H), 5 warm-up epochs then cosine to 1e-6, batch 1024,
  100 (B) / 50 (L, H) epochs of the fine-tuning set, RandAugment (2, 9), mixup 0.8, cutmix 1.0,
  label smoothing 0.1.
* ``beit`` (Bao et al. 2021, microsoft/unilm ``beit/``), the default for a BEiT backbone pre-trained
  here: the MAE protocol's shape on timm's BEiT (mean pooling into a fresh ``fc_norm``) with BEiT's
  numbers: lr 4e-3 (B) / 1e-3 (L) at batch 1024, layer decay 0.65 (B) / 0.75 (L), drop path 0.1 /
  0.2, 20 / 5 warm-up epochs, 100 / 50 epochs (docs/beit.md).

A learnt position embedding is 2D-interpolated to the new patch grid; a fixed sin-cos one (MAE's
encoder) is recomputed for it; BEiT's relative position bias tables are resized to the new grid. The patch size and the rest of the shape are the source's (a
``--set model.patch_size=...`` that differs is refused before anything starts). Without a GPU
either protocol is sized for the machine (300 steps at batch 64), said before the run starts.
The result is evaluated (top-1), logged as an MLflow run nested under the source run, and
registered as ``<source name>-ft<size>`` with lineage tags pointing at the source model.

``--from`` accepts ``models:/NAME/VERSION`` (or ``/latest``), ``runs:/RUN_ID/model`` (or a
``runs:/.../weights/model.safetensors`` artifact), or a local ``.safetensors`` file written
by ``model.weights.save_weights`` / ``training.export_weights``.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (ray job submit -- python orchestration/finetune.py)
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import logging
import sys
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from model import TimmConfig, TimmSpec, ViTConfig, ViTSpec
from orchestration import tracking
from orchestration.evaluation.results import EvalReport, ResultRow
from orchestration.experiment import Experiment, OverrideError, apply_overrides, validation
from orchestration.experiment.finetune_protocols import (
    CPU_SCHEDULE,  # noqa: F401 - re-exported: finetune.CPU_SCHEDULE
    PROTOCOLS,
    choose_protocol,
    finetune_experiment,
    source_objective,
    source_shape_problems,
)
from orchestration.state import state_dir
from pipeline.storage import open_storage, url_join

log = logging.getLogger("orchestration.finetune")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestration/finetune.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--from", dest="source", required=True,
                   help="models:/NAME/VERSION | runs:/RUN_ID/PATH | weights.safetensors")
    p.add_argument("--data", required=True, help="fine-tuning dataset URL (path, file:// or s3://)")
    p.add_argument("--image-size", type=int, default=384, help="fine-tuning resolution (default 384, paper)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="typed override, repeatable (train.optim.lr=0.003, train.schedule.total_steps=500, ...)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=int, default=None, help="default: 1 if CUDA is visible here, else 0")
    p.add_argument("--protocol", choices=("auto", *PROTOCOLS), default="auto",
                   help="vit: the ViT paper's (SGD, class token); mae: MAE's FINETUNE.md (AdamW, layer decay, "
                        "mean pooling, mixup/cutmix); auto (default): mae for a model pre-trained with MAE, else vit")
    p.add_argument("--dataset-name", default=None, help="name used in the registry (default: source's dataset)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the source run's, so the "
                   "fine-tune nests under it)")
    p.add_argument("--storage", default=None, help="run storage root (default $VITSCALE_STORAGE or "
                   f"{state_dir() / 'runs'})")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of the source model and the new run "
                   f"(default $MLFLOW_TRACKING_URI or sqlite:///{state_dir() / 'mlflow.db'})")
    p.add_argument("--address", default=None, help="Ray address (default $RAY_ADDRESS; else a local Ray)")
    p.add_argument("--no-register", action="store_true")
    p.add_argument("--summary-json", default=None)
    p.add_argument("--report", default=None, help="also write the evaluation report (JSON, the format of "
                   "orchestration/evaluate.py: a finetune/<dataset>/full top-1 row) to this file")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved experiment, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    import json

    from orchestration.evaluation.in_training import fewshot_data_problems
    from orchestration.experiment import flatten_experiment
    from orchestration.launch.lease import LeaseHeldError
    from orchestration.launch.pretrain_run import emit, launch
    from orchestration.state import default_storage

    args = build_parser().parse_args(argv)
    tracking.install_log_redaction()
    uri = args.tracking_uri or tracking.tracking_uri()
    try:  # a bad --from is one line and exit 2, before anything starts
        source = tracking.resolve_model_source(args.source, uri)
        src_model = tracking.load_model(source["uri"] if source["kind"] != "file" else args.source, uri)
    except Exception as e:  # noqa: BLE001 - missing file, unknown registry name, not a model: all one line
        return validation.report([f"--from {args.source}: {validation.one_line(e)}",
                                  *validation.location_problems(args.data)])
    objective, known_from = source_objective(source["tags"], _file_metadata(args.source, source))
    protocol = choose_protocol(args.protocol, objective)
    gpus = _gpus(args)
    how = {"protocol": protocol, "objective": objective}
    exp, problems = _resolve(args, src_model.cfg, source, gpus=gpus, **how)
    train_images = _train_images(args.data, exp) if exp is not None and protocol in ("mae", "beit") else None
    if train_images:  # MAE and BEiT count epochs of the fine-tuning set: again with its size
        exp, problems = _resolve(args, src_model.cfg, source, gpus=gpus, train_images=train_images, **how)
    print(_protocol_note(protocol, objective, known_from, args.protocol), file=sys.stderr, flush=True)
    problems += validation.experiment_data_problems(exp, args.data)
    if exp is not None:
        problems += fewshot_data_problems(exp)
    problems += validation.storage_problems(args.storage or default_storage())
    if exp is None or problems:  # nothing started: no Ray, no MLflow run
        return validation.report(problems)
    if args.dry_run:
        print(json.dumps(flatten_experiment(exp), indent=2, default=str))
        return 0
    if not exp.resources.gpus_per_worker:
        full, _ = _resolve(args, src_model.cfg, source, gpus=1, train_images=train_images, overrides=[], **how)
        paper = (f"--set train.schedule.total_steps={full.train.schedule.total_steps} --set "
                 f"train.schedule.warmup_steps={full.train.schedule.warmup_steps} --set "
                 f"train.global_batch={full.train.global_batch}") if full is not None else "(see docs)"
        print(f"finetune: no GPU: {exp.train.schedule.total_steps} steps at global batch {exp.train.global_batch} "
              f"(sized for a CPU; the {protocol} protocol's full length is {paper}, hours here); the run prints "
              "its progress and ETA", flush=True)
    before, experiment = _source_run(source, args.experiment, uri)
    storage = args.storage or default_storage()
    init_url = _stage_weights(src_model, url_join(storage, exp.name, "init", f"{uuid.uuid4().hex[:12]}.safetensors"),
                              exp.image_size, pool=getattr(exp.model, "pool", None), spec=exp.model)
    try:  # Ray starts inside launch, once the run folder's lease is held
        summary = launch(
            exp, data_url=args.data, storage=storage, uri=uri, experiment=experiment, address=args.address,
            run_name=f"{exp.name} <- {source['uri']}", register=not args.no_register, init_weights=init_url,
            parent_run_id=source.get("run_id"),
            extra_tags={**_lineage_tags(source, src_model.cfg), "source_objective": objective,
                        "finetune_protocol": protocol},
            extra_params={"finetune.source": source["uri"], "finetune.source_image_size": src_model.cfg.image_size,
                          "finetune.protocol": protocol},
        )
    except LeaseHeldError as e:  # another run owns the run folder: nothing was changed
        print(f"error: {e}", file=sys.stderr)
        return 3
    summary.update(source=source["uri"], source_run_id=source.get("run_id"), top1_before=before,
                   top1_after=summary["metrics"].get("eval_top1"), image_size_before=src_model.cfg.image_size,
                   image_size_after=exp.image_size)
    rep = finetune_report(exp, summary)
    if rep is not None:  # the fine-tune's top-1 in the report format few-shot and probes share
        publish_report(rep, summary["run_id"], uri, args.report)
        summary["report"] = rep.metrics()
    emit(summary, args.summary_json)
    return 0


def finetune_report(exp: Experiment, summary: dict[str, Any]) -> EvalReport | None:
    """The fine-tune's final top-1 as a ``finetune/<dataset>/full`` report row (None: no eval split)."""
    top1 = summary.get("top1_after")
    if top1 is None:
        return None
    row = ResultRow(method="finetune", dataset=exp.dataset_name, setting="full", value=float(top1),
                    details={"image_size": exp.image_size, "steps": exp.train.schedule.total_steps,
                             "source": summary.get("source"), "top1_before": summary.get("top1_before"),
                             "run_id": summary.get("run_id")})
    return EvalReport(model=str(summary.get("model_uri") or summary.get("run_id") or ""), rows=(row,),
                      info={"recipe": "finetune", "source": summary.get("source")})


def publish_report(rep: EvalReport, run_id: str, uri: str, path: str | None) -> None:
    """Log the report's metrics and ``eval/report.json`` to the run; write it to ``path`` too."""
    c = tracking.client(uri)
    for key, value in rep.metrics().items():
        c.log_metric(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        c.log_artifact(run_id, str(rep.write(Path(tmp) / "report.json")), "eval")
    if path:
        rep.write(path)


def _resolve(args: argparse.Namespace, src_cfg: ViTConfig | TimmConfig, source: dict[str, Any], *, protocol: str,
             gpus: int,
             train_images: int | None = None, overrides: list[str] | None = None,
             objective: str = "classification") -> tuple[Experiment | None, list[str]]:
    """The fine-tuning experiment (with ``--set``, or ``overrides``) and its problems (no I/O)."""
    tags = source["tags"]
    kind = "" if objective == "classification" else f"{objective}-"  # a file's MAE encoder: mae-vit-...
    arch = src_cfg.name if isinstance(src_cfg, TimmConfig) else f"vit-{ViTSpec.of(src_cfg).slug}"
    source_name = source.get("name") or f"{kind}{arch}"
    try:
        exp = finetune_experiment(
            src_cfg, image_size=args.image_size, source_recipe=tags.get("recipe"),
            dataset_name=args.dataset_name or tags.get("dataset", "dataset"), source_model_name=source_name,
            workers=args.workers, gpus_per_worker=gpus, protocol=protocol, train_images=train_images,
        )
        exp = apply_overrides(exp, args.overrides if overrides is None else overrides)
    except (OverrideError, ValueError) as e:
        return None, validation.problems_of(e)
    problems = source_shape_problems(exp, src_cfg, f"--from {args.source}")
    return (None, problems) if problems else (exp, [])


def _gpus(args: argparse.Namespace) -> int:
    if args.gpus_per_worker is not None:
        return args.gpus_per_worker
    import torch

    return 1 if torch.cuda.is_available() else 0


def _file_metadata(path: str, source: dict[str, Any]) -> dict[str, str] | None:
    """A local ``.safetensors`` source's metadata (the registry's and runs' tags say the rest)."""
    if source["kind"] != "file" or not path.endswith(".safetensors"):
        return None
    from model.weights import read_header

    return read_header(path)[1]


def _train_images(url: str, exp: Experiment) -> int | None:
    """Images in the fine-tuning set's train split (None when it cannot be read: validation says why)."""
    from pipeline.loader import load_meta

    src = exp.data.source
    try:
        return load_meta(url, src.split, limit=src.limit_samples, version=src.dataset_version).num_samples
    except Exception:  # noqa: BLE001 - reported by the dataset checks that follow
        return None


def _protocol_note(protocol: str, objective: str, known_from: str, asked: str) -> str:
    """The line that says which protocol runs and why (stderr, before anything starts)."""
    why = f"the source was pre-trained with {objective} ({known_from})"
    line = f"finetune: the {protocol} fine-tuning protocol ({'--protocol ' + asked if asked != 'auto' else why})"
    if protocol == "mae" and objective != "mae":
        line += (f"; {why}: MAE's recipe applies as is (mean pooling with a fresh fc_norm instead of the class "
                 "token's final norm, drop path, AdamW with layer decay, RandAugment, mixup/cutmix), the "
                 "source's own position embedding kept")
    elif protocol == "vit" and objective == "mae":
        line += f"; {why}: the ViT paper's recipe (class token head, SGD) on an MAE encoder"
    return line


def _source_run(source: dict[str, Any], experiment: str | None, uri: str) -> tuple[float | None, str]:
    """(pre-training top-1 of the source, the MLflow experiment: the source run's unless given)."""
    before = None
    parent = source.get("run_id")
    if parent:
        src_run = tracking.client(uri).get_run(parent)
        before = src_run.data.metrics.get("eval_top1")
        if experiment is None:
            experiment = tracking.client(uri).get_experiment(src_run.info.experiment_id).name
    return before, experiment or "finetune"


def _stage_weights(model: Any, init_url: str, image_size: int, *, pool: str | None = None,
                   spec: Any = None) -> str:
    """Upload the source weights, at the fine-tuning resolution and pooling, to ``init_url`` (every
    worker reads them).

    A learnt position embedding is resampled to the new patch grid here, explicitly and once
    (``allow_resample``: the paper's recipe; ``--image-size`` asked for it), so the workers load a
    file whose grid is the model's and their loader never converts anything silently. MAE's
    mean pooling (``pool="avg"`` on a class-token source) drops the encoder's final ``norm`` and
    adds a fresh ``fc_norm`` (weight 1, bias 0), as main_finetune.py's ``--global_pool`` load does
    (its missing keys are exactly the head and fc_norm). A timm network is staged the same way:
    its position embeddings and relative position bias tables resized (``model.zoo_weights``),
    for a Swin to the windows it has at the new size.
    """
    from model import build_network, load_network_weights
    from model.weights import save_weights

    timm = isinstance(model.cfg, TimmConfig)
    if timm:  # the fine-tune's architecture (a Swin may have asked for other windows) at its resolution
        cfg = (spec.config(num_classes=model.cfg.num_classes, image_size=image_size) if isinstance(spec, TimmSpec)
               else replace(model.cfg, image_size=image_size))
    else:
        cfg = replace(model.cfg, image_size=image_size, pool=pool or model.cfg.pool)
    if cfg != model.cfg:
        log.info("staging the source weights at %d px (trained at %d px)", image_size, model.cfg.image_size)
        target = build_network(cfg)
        sd = model.state_dict()
        if not timm and cfg.pool == "avg" and model.cfg.pool != "avg":
            fresh = target.state_dict()
            sd = {**{k: v for k, v in sd.items() if not k.startswith("norm.")},
                  **{k: v for k, v in fresh.items() if k.startswith("fc_norm.")}}
        model = load_network_weights(target, sd, allow_resample=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "init.safetensors"
        save_weights(model, local)
        parent_url, name = init_url.rsplit("/", 1)
        open_storage(parent_url).upload_file(local, name)
    return init_url


def _lineage_tags(source: dict[str, Any], src_cfg: ViTConfig | TimmConfig) -> dict[str, Any]:
    tags = source["tags"]
    return {
        "finetune_from": source["uri"],
        "source_run_id": source.get("run_id") or "",
        "source_model": f"{source.get('name', '')}/{source.get('version', '')}".strip("/"),
        "source_recipe": tags.get("recipe", ""),
        "source_dataset_index_sha256": tags.get("dataset_index_sha256", ""),
        "source_image_size": src_cfg.image_size,
    }


if __name__ == "__main__":
    raise SystemExit(main())
