"""Serve a registered model over HTTP on Ray Serve, autoscaled: the ``serve.py`` CLI.

Usage::

    python orchestration/serve.py --model models:/vit-b16-i21k@champion --replicas 1-4
    RAY_ADDRESS=ray://head:10001 python orchestration/serve.py --model models:/vit-b16-i21k/3 --host 0.0.0.0

Then ``POST http://HOST:PORT/invocations`` with MLflow's scoring format (the same as
``mlflow models serve``)::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG>"], ...]},
     "params": {"top_k": 5, "return_embedding": false}}

-> ``{"predictions": [{"classes": [...], "probabilities": [...]}, ...]}``. ``--model`` takes
``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` (resolved once at start: every replica serves
that version), ``runs:/ID/PATH`` or a local pyfunc folder. Without ``RAY_ADDRESS`` / ``--address``
a private local Ray instance is started and stopped with the command. ``--replicas MIN-MAX``
autoscales on ongoing requests; each replica takes one GPU where the cluster has GPUs
(``--gpus-per-replica`` overrides). Listens on 127.0.0.1 unless ``--host`` says otherwise;
request bodies over the model's limit (64 MiB) get 413 before they are parsed. Runs until
interrupted (Ctrl-C / SIGTERM), then shuts the deployment down.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: repo root on the path
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import re
import signal
import sys
import threading


def parse_replicas(text: str) -> tuple[int, int] | None:
    """``"2"`` -> (2, 2); ``"1-4"`` -> (1, 4); None when malformed."""
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    if not m:
        return None
    low, high = int(m[1]), int(m[2] or m[1])
    return (low, high) if 1 <= low <= high else None


def main(argv: list[str] | None = None) -> int:
    from orchestration import tracking
    from orchestration.experiment import validation

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS | models:/NAME/VERSION | runs:/ID/PATH | folder")
    p.add_argument("--replicas", default="1", help="N or MIN-MAX replicas (autoscaled on ongoing requests)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="Ray cluster (default $RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 where the cluster has GPUs")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite)")
    a = p.parse_args(argv)
    tracking.install_log_redaction()
    problems = []
    replicas = parse_replicas(a.replicas)
    if replicas is None:
        problems.append(f"--replicas {a.replicas!r}: want N or MIN-MAX with 1 <= MIN <= MAX")
    if not 0 < a.port < 65536:
        problems.append(f"--port {a.port} must be in 1..65535")
    if a.cpus_per_replica < 0 or (a.gpus_per_replica is not None and a.gpus_per_replica < 0):
        problems.append("--cpus-per-replica / --gpus-per-replica must be >= 0")
    model_uri = a.model
    try:
        uri = tracking.resolve_uri(a.tracking_uri)
        if a.model.startswith(("models:/", "runs:/")):
            source = tracking.resolve_model_source(a.model, uri)
            model_uri = source["uri"] if source["kind"] == "registry" else a.model
        _check_pyfunc(model_uri, uri)
    except Exception as e:  # noqa: BLE001 - unknown name/alias, not a pyfunc: one line
        problems.append(f"--model {a.model}: {validation.one_line(e)}")
    if problems or replicas is None:
        return validation.report(problems)

    from orchestration.launch.cluster import connect_ray
    from orchestration.serving import ray_serve

    print(f"[serve] Ray: {connect_ray(a.address)}", flush=True)
    gpus = a.gpus_per_replica if a.gpus_per_replica is not None else (1.0 if ray_serve.cluster_gpus() else 0.0)
    public = tracking.redact_text(uri)
    cfg = ray_serve.ServeConfig(model_uri=model_uri, tracking_uri=uri if public == uri else None,
                                min_replicas=replicas[0], max_replicas=replicas[1], num_gpus=gpus,
                                num_cpus=a.cpus_per_replica)
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = ray_serve.start(cfg, host=a.host, port=a.port)
        print(f"[serve] {a.model} ({model_uri}) on {replicas[0]}-{replicas[1]} replica(s), {gpus:g} GPU each: "
              f"POST {url}", flush=True)
        stop.wait()
    finally:
        print("[serve] shutting down", flush=True)
        serve.shutdown()
    return 0


def _check_pyfunc(model_uri: str, uri: str) -> None:
    """The source is a servable pyfunc (reads its MLmodel only, not the weights)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(model_uri)
    if "python_function" not in info.flavors or info.signature is None:
        raise ValueError(f"{model_uri} is not a vitscale pyfunc (flavors {sorted(info.flavors)}): it was registered "
                         "before serving existed; register it again")


if __name__ == "__main__":
    sys.exit(main())
