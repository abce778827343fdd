"""Served and batch-predicted images/s against a plain decode + forward loop on the same images.

Baseline (named "plain"): for each batch of ``--batch`` encoded images, ``decode_eval`` each one,
normalise, one forward pass, softmax + top-5; nothing else (no threads of ours, no HTTP, no Ray).
Then, on the same images and the same weights, in the same run:

* **HTTP**: ``mlflow models serve --env-manager local`` of the registered pyfunc folder, one
  client posting ``--batch`` base64 images per request (``dataframe_split``), sequentially;
* **offline**: ``orchestration.serving.batch.run_predict`` over a dataset of the same images on a
  private local Ray (one actor, ``--cpus`` decode threads). Reported two ways: steady state (images
  / the actors' summed per-shard seconds) and the whole job (wall time including Ray Data's start
  and the actor's model load, which a 14M-image job pays once).

Prints images/s of each and the ratio to the baseline (goal >= 0.8), and the load average (a
busy shared machine moves both sides, not always equally).

    .venv/bin/python bench/serve.py                       # ViT-Ti/16 @ 224, 256 photos, batch 32
    .venv/bin/python bench/serve.py --variant S/16 --images 512
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import create_model  # noqa: E402
from orchestration.serving.spec import ServingSpec  # noqa: E402
from pipeline.decode import decode_eval  # noqa: E402


def plain_loop(model: torch.nn.Module, images: list[bytes], spec: ServingSpec, batch: int) -> float:
    """images/s of decode + normalise + forward + top-5, one batch at a time."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for a in range(0, len(images), batch):
            x = torch.stack([torch.from_numpy(decode_eval(d, size=spec.image_size, crop_pct=spec.crop_pct))
                             .permute(2, 0, 1) for d in images[a:a + batch]]).float().div_(255)
            model((x - mean) / std).softmax(-1).topk(5)
    return len(images) / (time.perf_counter() - t0)


def http_rate(folder: Path, images: list[bytes], batch: int, port: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(folder),
                             "--env-manager", "local", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(d).decode()]
                                                                               for d in images[a:a + batch]]}}).encode()
                  for a in range(0, len(images), batch)]

        def post(body: bytes) -> None:
            req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                assert r.status == 200
        post(bodies[0])  # warm-up (first request pays lazy imports)
        t0 = time.perf_counter()
        for body in bodies:
            post(body)
        return len(images) / (time.perf_counter() - t0)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def offline_rate(folder: Path, images: list[bytes], tmp: Path, batch: int, cpus: float) -> tuple[float, float]:
    from orchestration.launch.cluster import connect_ray
    from orchestration.serving.batch import PredictConfig, run_predict
    from pipeline import write_dataset
    from pipeline.loader.meta import load_meta

    src = tmp / "src" / "0"
    src.mkdir(parents=True)
    for i, d in enumerate(images):
        (src / f"{i:05d}.jpg").write_bytes(d)
    url = str(tmp / "ds")
    write_dataset(tmp / "src", url, samples_per_shard=64, val_fraction=0.0, seed=0, max_side=None, progress=False)
    meta = load_meta(url, "train")
    connect_ray(None)
    cfg = PredictConfig(model_uri=str(folder), data_url=url, split="train", out_url=str(tmp / "out"),
                        dataset_version=meta.version, top_k=5, batch_size=batch, num_cpus=cpus)
    t0 = time.perf_counter()
    summary = run_predict(cfg, echo=lambda line: None)
    wall = time.perf_counter() - t0
    return summary["images_this_run"] / summary["actor_seconds"], summary["images_this_run"] / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="Ti/16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1), help="decode threads (servers, actor)")
    a = p.parse_args()
    torch.manual_seed(0)
    from orchestration.serving.package import write_pyfunc_dir
    from orchestration.tracking.registry import write_model_dir
    from pipeline.demo_data import make_photos

    model = create_model(a.variant, num_classes=1000, image_size=a.image_size).eval()
    spec = ServingSpec(image_size=a.image_size, class_names=[f"c{i}" for i in range(1000)], max_rows=max(256, a.batch))
    images = make_photos(a.images, size=(500, 375))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_pyfunc_dir(write_model_dir(model, Path(tmp) / "plain"), spec, Path(tmp) / "pyfunc")
        plain = plain_loop(model, images, spec, a.batch)
        http = http_rate(folder, images, a.batch, _free_port())
        plain2 = plain_loop(model, images, spec, a.batch)
        steady, wall = offline_rate(folder, images, Path(tmp), a.batch, a.cpus)
        plain3 = plain_loop(model, images, spec, a.batch)
    base = max(plain, plain2, plain3)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {a.variant} @ {a.image_size} px, "
          f"{a.images} photos 500x375, batch {a.batch}")
    print(f"plain decode+forward loop: {plain:.1f} / {plain2:.1f} / {plain3:.1f} images/s (best {base:.1f})")
    print(f"HTTP (mlflow models serve, batch {a.batch}): {http:.1f} images/s, ratio {http / base:.3f} (goal >= 0.8)")
    print(f"offline predict (Ray Data, 1 actor): steady {steady:.1f} images/s, ratio {steady / base:.3f} "
          f"(goal >= 0.8); whole job incl. start-up {wall:.1f} images/s, ratio {wall / base:.3f}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
