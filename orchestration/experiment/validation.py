"""Input checks that need I/O, and the one way every CLI reports a bad configuration.

The range checks live with the configs (``DataConfig`` / ``TrainConfig`` / ``ViTConfig``
``__post_init__``, launch-level ones in :func:`orchestration.experiment.checks.experiment_problems`,
study-level ones in ``StudySpec``). This module adds what can only be known by looking:
the dataset exists and is readable, holds the split, enough samples for one batch per rank and
a usable class count; run storage can be written. Dataset metadata is read only through
``pipeline.build_loader`` (``pipeline.loader.load_meta`` plus the loader's own size check), so
the driver judges the dataset exactly as every worker will, whatever its published layout.

All of it runs on the driver before Ray or MLflow start; :func:`report` prints one
``error: ...`` line per problem and returns exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from orchestration.experiment.checks import ConfigError
from training.objectives import objective_for

if TYPE_CHECKING:
    from orchestration.experiment.config import Experiment
    from pipeline import DataConfig

#: Exit status of a CLI whose arguments or configuration are invalid (argparse uses it too).
EXIT_USAGE = 2
_SCHEMES = ("s3://", "file://")


def problems_of(error: Exception) -> list[str]:
    """One line per problem of a ConfigError / component ValueError / any other error."""
    if isinstance(error, ConfigError):
        return list(error.problems)
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("invalid ") and lines[0].endswith(":"):
        lines = lines[1:]  # the "invalid StudySpec:" header of a component's error
    return lines or [type(error).__name__]


def one_line(error: BaseException) -> str:
    """The first line of an exception's text (MLflow and boto3 add pages of detail)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def location_problems(url: str, key: str = "--data") -> list[str]:
    """A local dataset folder exists and is readable; a URL has a supported scheme."""
    if "://" in url and not url.startswith(_SCHEMES):
        return [f"{key} {url}: unsupported URL scheme; use a local path, file://PATH or s3://BUCKET/PREFIX"]
    if url.startswith("s3://"):
        bucket = url[len("s3://"):].split("/", 1)[0]
        return [] if bucket else [f"{key} {url}: no bucket; use s3://BUCKET/PREFIX"]
    path = _local(url)
    if not path.exists():
        return [f"{key} {url}: no such folder (write a dataset with python -m pipeline.write_shards SRC DEST)"]
    if not path.is_dir():
        return [f"{key} {url}: not a folder (a dataset is the folder python -m pipeline.write_shards writes)"]
    if not os.access(path, os.R_OK | os.X_OK):
        return [f"{key} {url}: not readable by this user"]
    return []


def dataset_problems(
    url: str,
    data: DataConfig,
    *,
    world_size: int,
    loss: str = "softmax",
    needs_labels: bool = True,
    split_key: str = "data.source.split",
    eval_split: str | None = None,
    eval_key: str = "eval.split",
    key: str = "--data",
) -> list[str]:
    """What a worker's ``build_loader`` would fail on, found on the driver, one line each.

    ``data`` is the train split's config (``url`` is replaced by ``url``); ``eval_split``, when
    given, must exist too. Also, when the objective ``needs_labels``: the dataset has labels
    (not written ``--unlabelled``), and >= 2 classes for a softmax. An objective that needs none
    (MAE) trains on any dataset, labelled or not.
    """
    from pipeline import build_loader
    from pipeline import format as fmt

    problems = location_problems(url, key)
    if problems:
        return problems
    cfg = data.replace(**{"source.url": url})
    num_classes = None
    unlabelled = False
    try:
        loader = build_loader(cfg, rank=0, world_size=world_size)
        num_classes = int(loader.num_classes)
        unlabelled = not fmt.is_labelled(loader.info)
    except FileNotFoundError as e:
        return [f"{key} {url}: {one_line(e)}"]
    except ValueError as e:  # split missing, or too few samples for one batch per rank
        problems.append(f"{key} {url}, {split_key}={data.source.split!r}: {one_line(e)}")
    except Exception as e:  # noqa: BLE001 - unreadable metadata (denied, no bucket, damaged): one line
        return [f"{key} {url}: cannot read the dataset's metadata ({type(e).__name__}: {one_line(e)})"]
    if needs_labels and unlabelled:
        problems.append(f"{key} {url}: dataset has no labels (written with --unlabelled): a supervised recipe "
                        "(train.objective.kind=classification) cannot train on it; use an objective that needs "
                        "none, e.g. --recipe mae_vit_mu_digits")
    elif needs_labels and num_classes is not None and (num_classes < 1 or (num_classes < 2 and loss == "softmax")):
        problems.append(f"{key} {url}: num_classes={num_classes}; training needs >= 1 class, and a softmax "
                        "over one class learns nothing (use train.objective.loss=sigmoid or more classes)")
    if eval_split:
        try:
            build_loader(cfg.for_eval(eval_split), rank=0, world_size=world_size)
        except Exception as e:  # noqa: BLE001 - same reasons as above, for the eval split
            problems.append(f"{key} {url}, {eval_key}={eval_split!r}: {one_line(e)} (set {eval_key}=none "
                            "to train without evaluation)")
    return problems


def experiment_data_problems(exp: Experiment | None, url: str) -> list[str]:
    """The dataset at ``url`` for a (valid) experiment and both splits it names (train and eval;
    the few-shot datasets are checked by ``evaluation.during.fewshot_data_problems``); only its
    location when ``exp`` is None."""
    if exp is None:
        return location_problems(url)
    objective = exp.train.objective
    return dataset_problems(url, exp.data, world_size=exp.resources.workers,
                            loss=getattr(objective, "loss", "softmax"),  # only a classification objective has one
                            needs_labels=objective_for(objective).num_classes(2) > 0, eval_split=exp.eval.split)


def _local(url: str) -> Path:
    """The folder of a local path / ``file://`` URL, parsed as the loaders and stores parse it."""
    from pipeline.storage import LocalStorage, open_storage

    storage = open_storage(url)
    assert isinstance(storage, LocalStorage)  # s3:// was handled by the caller
    return storage.root.expanduser()


def storage_problems(url: str, key: str = "--storage") -> list[str]:
    """A local run-storage root can be created and written (s3:// is checked when first written)."""
    if "://" in url and not url.startswith(_SCHEMES):
        return [f"{key} {url}: unsupported URL scheme; use a local path, file://PATH or s3://BUCKET/PREFIX"]
    if url.startswith("s3://"):
        return location_problems(url, key)
    path = _local(url).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return [f"{key} {url}: {existing} is not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{key} {url}: {existing} is not writable by this user"]
    return []


def report(problems: list[str], stream: TextIO | None = None) -> int:
    """Print ``error: <problem>`` per problem (credentials redacted) and return exit status 2."""
    from orchestration.tracking import redact_text

    out = stream or sys.stderr
    for p in problems:
        print(f"error: {redact_text(' '.join(str(p).splitlines()))}", file=out)
    return EXIT_USAGE
