"""Render the KubeRay RayJob that pre-trains one recipe on its own, right-sized Ray cluster.

    python -m orchestration.rayjob vit_s16_t4 --data s3://vitscale/demo > rayjob.yaml
    kubectl apply -n vitscale -f rayjob.yaml
    kubectl get rayjob -n vitscale -w

The job's cluster is the head and one GPU worker group copied from ``base/raycluster.yaml`` (the
single source of pod shapes), with the group pinned to the number of pods the recipe needs:
``workers * gpus_per_worker`` GPUs, packed ``gpus-per-pod / gpus_per_worker`` ranks to a pod.
KubeRay deletes that cluster when the job ends (``shutdownAfterJobFinishes``). The entrypoint is
``python -m orchestration.pretrain`` (the image installs the project, so this works from any
working directory) with ``--resume auto``, so a retried job (``backoffLimit``)
continues from the newest checkpoint under ``--storage``.

The experiment is checked here, before anything reaches the cluster: unknown ``--set`` keys,
a recipe that asks for more CPUs per rank than the pod advertises, or a dataloader that would
not fit in the pod's ``/dev/shm`` fail with a message that names the fix.

It lives in ``orchestration/`` (which may import every package) rather than ``infra/``
(which holds no Python imports, docs/design.md); it reads the pod shapes from ``infra/k8s/``.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RAYCLUSTER = ROOT / "infra" / "k8s" / "base" / "raycluster.yaml"

PRETRAIN = ("python", "-m", "orchestration.pretrain")
DEFAULT_STORAGE = "s3://vitscale/runs"
NAMESPACE = "vitscale"

# Accelerator of a worker group -> the groupName in base/raycluster.yaml.
GROUPS = ("t4", "a100", "h100")

# Headroom for decode buffers and the eval loader over the train batches in flight.
_SHM_HEADROOM = 2.0
# Bytes per pixel channel of the batches that cross /dev/shm: the training workers build their
# loaders with output="uint8" (launch.build.build_loaders; the Trainer normalizes on the device).
_WORKER_BATCH_ITEMSIZE = 1

_QUANTITY = re.compile(r"^(?P<num>[0-9.]+)(?P<unit>Ki|Mi|Gi|Ti|k|M|G|T|m)?$")
_UNITS = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (``"4Gi"``, ``"3500m"``, ``8``) as a plain number."""
    m = _QUANTITY.match(str(value))
    if not m:
        raise ValueError(f"cannot read Kubernetes quantity {value!r}")
    return float(m["num"]) * _UNITS[m["unit"]]


def default_accelerator(exp: Any) -> str:
    """The worker group a recipe runs on when ``--accelerator`` is not given.

    ``train.profile`` when it names a GPU; otherwise fp16 recipes go to T4 (it has no bf16)
    and bf16/fp32 ones to A100.
    """
    profile = getattr(exp.train, "profile", "auto")
    if profile in GROUPS:
        return profile
    return "t4" if exp.train.engine.precision == "fp16" else "a100"


def _group(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    for group in cluster["spec"]["workerGroupSpecs"]:
        if group["groupName"] == name:
            return group
    names = [g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]]
    raise ValueError(f"no worker group {name!r} in {RAYCLUSTER.name}; groups: {', '.join(names)}")


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod["volumes"] if v["name"] == name)


def dns_name(text: str) -> str:
    """``"vit_s16_t4"`` -> ``"vit-s16-t4"``: a DNS-1123 label short enough for KubeRay's suffixes."""
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return slug[:40].rstrip("-")


def entrypoint_args(
    recipe_name: str,
    data_url: str,
    *,
    experiment: str,
    storage: str,
    workers: int | None = None,
    overrides: Sequence[str] = (),
) -> list[str]:
    """The pretrain command line of the job (argv, not yet shell-quoted)."""
    args = [
        *PRETRAIN,
        "--recipe",
        recipe_name,
        "--data",
        data_url,
        "--resume",
        "auto",
        "--experiment",
        experiment,
        "--storage",
        storage,
    ]
    if workers is not None:
        args += ["--workers", str(workers)]
    for item in overrides:
        args += ["--set", item]
    return args


def render_rayjob(
    recipe_name: str,
    data_url: str,
    *,
    overrides: Sequence[str] = (),
    workers: int | None = None,
    accelerator: str | None = None,
    experiment: str | None = None,
    storage: str = DEFAULT_STORAGE,
    image: str | None = None,
) -> dict[str, Any]:
    """The RayJob (a dict, ready for ``yaml.safe_dump``) that pre-trains ``recipe_name``.

    ``overrides`` are pretrain.py's ``--set key=value`` items and ``workers`` its ``--workers``;
    both are applied to the recipe here too, to size the cluster and to fail early. ``accelerator``
    picks the worker group (``t4``, ``a100``, ``h100``; default :func:`default_accelerator`).
    ``image`` replaces the image of every container (default: the one in raycluster.yaml, which
    kustomize's ``images:`` does not reach in a separately applied RayJob).
    """
    exp = _experiment(recipe_name, overrides, workers)
    experiment = experiment or exp.name
    accel = accelerator or default_accelerator(exp)
    if accel not in GROUPS:
        raise ValueError(f"accelerator {accel!r} is not one of {', '.join(GROUPS)}")
    if exp.resources.gpus_per_worker < 1:
        raise ValueError(
            f"recipe {recipe_name!r} asks for no GPUs (gpus_per_worker={exp.resources.gpus_per_worker}); "
            "run it with `ray job submit` on the RayCluster's CPUs or with `make smoke`"
        )

    cluster = yaml.safe_load(RAYCLUSTER.read_text())
    group = copy.deepcopy(_group(cluster, accel))
    head = copy.deepcopy(cluster["spec"]["headGroupSpec"])
    ranks_per_pod, replicas = _pack(exp, group, accel)
    _check_shm(exp, group["template"]["spec"], ranks_per_pod, accel)

    # A job-sized, fixed cluster: no autoscaling, exactly the pods the ranks need.
    group.update(replicas=replicas, minReplicas=replicas, maxReplicas=replicas)
    labels = {
        "app.kubernetes.io/name": "vitscale-pretrain",
        "app.kubernetes.io/part-of": "vitscale",
        "vitscale.io/recipe": recipe_name,
        "vitscale.io/experiment": dns_name(experiment),
    }
    _label(head, group, labels, image)

    # Per-job environment; cluster settings (MLFLOW_TRACKING_URI, S3 endpoint, keys) reach every
    # pod through envFrom (vitscale-config ConfigMap, vitscale-s3 Secret) in raycluster.yaml.
    env_vars = {
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "VITSCALE_RECIPE": recipe_name,
        "DS_ACCELERATOR": "cuda",
        "NCCL_DEBUG": "WARN",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    }
    runtime_env = {"env_vars": env_vars}
    argv = entrypoint_args(
        recipe_name, data_url, experiment=experiment, storage=storage, workers=workers, overrides=overrides
    )
    return _job(cluster, head, group, experiment=experiment, labels=labels, argv=argv, runtime_env=runtime_env)


def _experiment(recipe_name: str, overrides: Sequence[str], workers: int | None) -> Any:
    """The recipe with pretrain.py's ``--set`` items and ``--workers`` (fails early, as pretrain.py would)."""
    from orchestration.experiment import apply_overrides, get_recipe, with_workers

    exp = get_recipe(recipe_name)
    if overrides:
        exp = apply_overrides(exp, list(overrides))
    return with_workers(exp, workers) if workers is not None else exp


def _label(head: dict[str, Any], group: dict[str, Any], labels: dict[str, str], image: str | None) -> None:
    for template in (head["template"], group["template"]):
        template["metadata"].setdefault("labels", {}).update(labels)
        if image:
            for c in template["spec"]["containers"]:
                c["image"] = image


def _pack(exp: Any, group: dict[str, Any], accel: str) -> tuple[int, int]:
    """(ranks per pod, pods): a pod's GPUs are split into ranks of gpus_per_worker each."""
    container = group["template"]["spec"]["containers"][0]
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    if gpus_per_pod % exp.resources.gpus_per_worker:
        raise ValueError(
            f"gpus_per_worker={exp.resources.gpus_per_worker} does not divide the {gpus_per_pod} GPUs of a "
            f"{accel!r} pod; use --set resources.gpus_per_worker=N with N dividing {gpus_per_pod}"
        )
    ranks_per_pod = min(gpus_per_pod // exp.resources.gpus_per_worker, exp.resources.workers)
    ray_cpus = quantity(group["rayStartParams"]["num-cpus"])
    if ranks_per_pod * exp.resources.cpus_per_worker > ray_cpus:
        raise ValueError(
            f"{ranks_per_pod} rank(s) x cpus_per_worker={exp.resources.cpus_per_worker} need "
            f"{ranks_per_pod * exp.resources.cpus_per_worker} CPUs but a {accel!r} pod has {ray_cpus:g}; "
            f"set cpus_per_worker <= {int(ray_cpus) // ranks_per_pod} or pick a larger accelerator"
        )
    return ranks_per_pod, math.ceil(exp.resources.workers / ranks_per_pod)


def _check_shm(exp: Any, pod: dict[str, Any], ranks_per_pod: int, accel: str) -> None:
    """(B, 3, S, S) uint8 batches, data.io.prefetch_batches in flight per dataloader process, per rank."""
    batch_bytes = exp.data.batch_size * 3 * exp.image_size**2 * _WORKER_BATCH_ITEMSIZE
    in_flight = max(exp.data.io.num_workers, 1) * exp.data.io.prefetch_batches
    shm_need = ranks_per_pod * in_flight * batch_bytes * _SHM_HEADROOM
    shm_have = quantity(_volume(pod, "dshm")["emptyDir"]["sizeLimit"])
    if shm_need > shm_have:
        raise ValueError(
            f"dataloaders need ~{shm_need / 2**30:.1f} GiB of /dev/shm per {accel!r} pod but it has "
            f"{shm_have / 2**30:.1f} GiB; lower data.io.num_workers, data.io.prefetch_batches or data.batch_size"
        )


def _job(cluster: dict[str, Any], head: dict[str, Any], group: dict[str, Any], *, experiment: str,
         labels: dict[str, str], argv: list[str], runtime_env: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": f"pretrain-{dns_name(experiment)}",
            "namespace": NAMESPACE,
            "labels": labels,
        },
        "spec": {
            "entrypoint": shlex.join(argv),
            "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=True),
            "submissionMode": "K8sJobMode",
            # Whole-job retries resume from the newest checkpoint (--resume auto).
            "backoffLimit": 2,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,  # keep the finished cluster an hour for its logs
            "rayClusterSpec": {
                "rayVersion": cluster["spec"]["rayVersion"],
                "enableInTreeAutoscaling": False,
                "headGroupSpec": head,
                "workerGroupSpecs": [group],
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML) as literal blocks, so the file reads like YAML."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(job: dict[str, Any], command: str) -> str:
    header = f"# Rendered by `{command}`;\n# edit base/raycluster.yaml or the recipe, then re-render.\n"
    return header + yaml.dump(job, Dumper=_Dumper, sort_keys=False, width=1000)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe name in orchestration/experiment/recipes.py, e.g. vit_s16_t4")
    p.add_argument("--data", help="dataset URL (default: the recipe's data.source.url)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="typed recipe override, passed on to pretrain.py (repeatable)",
    )
    p.add_argument("--workers", type=int, help="ranks (default: the recipe's)")
    p.add_argument("--accelerator", choices=GROUPS, help="worker group (default: from the recipe)")
    p.add_argument("--experiment", help="MLflow experiment / job name (default: the recipe's name)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="checkpoint/results URL for pretrain.py")
    p.add_argument("--image", help="container image (default: the one in base/raycluster.yaml)")
    p.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = p.parse_args(argv)
    try:
        data = args.data
        if data is None:
            from orchestration.experiment import get_recipe

            data = get_recipe(args.recipe).data.source.url
        job = render_rayjob(
            args.recipe,
            data,
            overrides=args.overrides,
            workers=args.workers,
            accelerator=args.accelerator,
            experiment=args.experiment,
            storage=args.storage,
            image=args.image,
        )
    except ValueError as e:
        print(f"render_rayjob: {e}", file=sys.stderr)
        return 2
    text = to_yaml(job, "python -m orchestration.rayjob " + shlex.join(list(argv or sys.argv[1:])))
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
