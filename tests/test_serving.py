"""Serving registered models over real HTTP (issue #27).

A model is registered in a real ``mlflow server`` (sqlite + proxied artifacts) with a recorded
eval transform that is *not* the default (ImageNet mean/std, crop 0.875) and named classes, and
given the alias ``champion``. Then:

* ``mlflow models serve -m models:/NAME@champion --env-manager local`` (a subprocess) answers
  ``/invocations``; the top-k and probabilities equal a direct forward of the same weights on the
  same image (decode_eval + normalise + model) to 1e-5, under concurrent requests too; bad rows
  (not an image, a truncated JPEG, a decompression bomb) get a 400 naming the row;
* ``python orchestration/serve.py --model models:/NAME@champion --replicas 1-2`` (Ray Serve on a
  private local Ray) answers the same requests the same way, and refuses an over-size body (413);
* a model without a head (an MAE encoder: num_classes 0) serves its embedding only.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT, VENV_BIN, free_port, mlflow_server

from orchestration import tracking
from orchestration.serving.spec import ServingSpec

pytestmark = pytest.mark.integration

IMG = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NAMES = tuple(f"digit {i}" for i in range(10))
MAX_BODY = 400_000  # the test model's request cap (small, so a 413 is cheap to provoke)


def _model(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    from model import create_model

    torch.manual_seed(seed)
    m = create_model("mu/4", num_classes=num_classes, image_size=IMG).eval()
    with torch.no_grad():  # the head starts at zero: make the probabilities differ
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def _spec(**kw: Any) -> ServingSpec:
    return ServingSpec(image_size=IMG, crop_pct=0.875, mean=MEAN, std=STD, class_names=NAMES,
                       max_request_bytes=MAX_BODY, **kw)


def _images() -> list[bytes]:
    """A JPEG, a PNG and a WebP of different sizes and aspect ratios."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for fmt, size in (("JPEG", (50, 40)), ("PNG", (33, 61)), ("WEBP", (80, 80))):
        buf = io.BytesIO()
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(buf, fmt)
        out.append(buf.getvalue())
    return out


def _reference(model: torch.nn.Module, data: bytes, k: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A direct forward: the loader's eval decode, the recorded mean/std, the model, softmax."""
    from pipeline.decode import decode_eval

    x = torch.from_numpy(decode_eval(data, size=IMG, crop_pct=0.875)).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = model.forward_head(model.forward_features(x), pre_logits=True)
        p = model.head(emb).softmax(-1)[0]
    top = p.topk(k)
    return [NAMES[i] for i in top.indices.tolist()], top.values.numpy(), emb[0].numpy()


def _body(images: list[bytes], **params: Any) -> bytes:
    rows = [[base64.b64encode(b).decode()] for b in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}, "params": params}).encode()


def _post(url: str, body: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real mlflow server with the model registered (v1: a decoy, v2: champion) and an encoder."""
    state = tmp_path_factory.mktemp("serving")
    with mlflow_server(state, backend=f"sqlite:///{state / 'mlflow.db'}", artifacts=str(state / "artifacts")) as uri:
        run_id = tracking.start_run("serving-test", run_name="src", uri=uri)
        model = _model()
        tracking.log_and_register_model(_model(seed=1), run_id=run_id, name="vit-serve", tags={}, uri=uri,
                                        serving=_spec(top_k=2))  # v1: other weights, not the champion
        v2 = tracking.log_and_register_model(model, run_id=run_id, name="vit-serve", tags={}, uri=uri,
                                             serving=_spec())
        tracking.client(uri).set_registered_model_alias("vit-serve", "champion", str(v2))
        encoder = _model(num_classes=0)
        tracking.log_and_register_model(encoder, run_id=run_id, name="mae-vit-serve", tags={}, uri=uri,
                                        serving=ServingSpec(image_size=IMG, mean=MEAN, std=STD, activation="none"))
        tracking.end_run(run_id, uri=uri)
        yield {"uri": uri, "model": model, "encoder": encoder, "state": state}


def _env(uri: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT),
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"not ready at {url} after {timeout}s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it leads its own), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _check_answers(url: str, model: torch.nn.Module) -> None:
    """Predictions equal the direct forward; concurrent requests too; bad rows are named."""
    images = _images()
    status, out = _post(url, _body(images, top_k=3, return_embedding=True))
    assert status == 200, out
    preds = out["predictions"]
    assert len(preds) == 3
    for data, pred in zip(images, preds, strict=True):
        names, probs, emb = _reference(model, data, 3)
        assert pred["classes"] == names
        np.testing.assert_allclose(pred["probabilities"], probs, atol=1e-5)
        np.testing.assert_allclose(pred["embedding"], emb, atol=1e-5)
    # The default top_k comes from serving.json (5); no embedding unless asked.
    status, out = _post(url, _body(images[:1]))
    assert status == 200 and len(out["predictions"][0]["classes"]) == 5 and "embedding" not in out["predictions"][0]

    def one(i: int) -> tuple[int, list[str]]:
        data = images[i % 3]
        s, o = _post(url, _body([data] * (1 + i % 4), top_k=2))
        return s, [p["classes"] for p in o.get("predictions", [])]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    for i, (s, classes) in enumerate(results):
        assert s == 200 and classes == [_reference(model, images[i % 3], 2)[0]] * (1 + i % 4)

    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(bomb, "PNG")  # 90 M pixels in a few KB
    truncated = images[0][: len(images[0]) // 2]
    for bad, reason in ((b"not an image at all", "corrupt_image"), (truncated, "corrupt_image"),
                        (bomb.getvalue(), "too_many_pixels")):
        status, out = _post(url, _body([images[1], bad]))
        assert status == 400, (status, out)
        assert f"row 1: {reason}" in out["message"] and "row 0" not in out["message"], out["message"][-500:]


def test_mlflow_models_serve_answers_like_a_direct_forward(registry: dict[str, Any]) -> None:
    port = free_port()
    log = registry["state"] / "mlflow-models-serve.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/vit-serve@champion",
                                 "--env-manager", "local", "-p", str(port)], env=_env(registry["uri"]), stdout=f,
                                stderr=subprocess.STDOUT, cwd=registry["state"], start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ping", proc, log)
        _check_answers(f"http://127.0.0.1:{port}/invocations", registry["model"])
        # A request over the model's limit is refused (the pyfunc counts the decoded images' bytes).
        status, out = _post(f"http://127.0.0.1:{port}/invocations", _body([b"\xff" * (MAX_BODY + 1)]))
        assert status == 400 and "more than the limit" in out["message"]
    finally:
        _stop(proc)


def test_ray_serve_cli_answers_the_same_and_caps_the_body(registry: dict[str, Any]) -> None:
    port = free_port()
    log = registry["state"] / "ray-serve.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "orchestration/serve.py", "--model", "models:/vit-serve@champion",
                                 "--replicas", "1-2", "--port", str(port), "--cpus-per-replica", "0.5"],
                                env={k: v for k, v in _env(registry["uri"]).items() if k != "RAY_ADDRESS"}, stdout=f,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ping", proc, log, timeout=150)
        deadline = time.monotonic() + 30
        while "POST http" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        line = next((ln for ln in log.read_text().splitlines() if "POST http" in ln), "")
        assert "(models:/vit-serve/2)" in line and "1-2 replica(s)" in line, log.read_text()[-2000:]
        _check_answers(f"http://127.0.0.1:{port}/invocations", registry["model"])
        status, out = _post(f"http://127.0.0.1:{port}/invocations", b"x" * (MAX_BODY + 1))
        assert status == 413 and "over the limit" in out["message"]
        status, _ = _post(f"http://127.0.0.1:{port}/other", b"{}")
        assert status == 404
    finally:
        _stop(proc)
    assert "shutting down" in log.read_text()


def test_encoder_serves_its_embedding_only(registry: dict[str, Any]) -> None:
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(registry["uri"])
    pyfunc = mlflow.pyfunc.load_model("models:/mae-vit-serve/1")
    images = _images()
    out = pyfunc.predict(pd.DataFrame({"image": images}), params={"top_k": 3})
    assert list(out.columns) == ["embedding"]
    enc = registry["encoder"]
    for data, emb in zip(images, out["embedding"], strict=True):
        from pipeline.decode import decode_eval

        x = torch.from_numpy(decode_eval(data, size=IMG, crop_pct=0.875)).permute(2, 0, 1)[None].float() / 255
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        with torch.no_grad():
            np.testing.assert_allclose(emb, enc(x)[0].numpy(), atol=1e-5)
    # The same folder still loads as a plain network (finetune / evaluate / visualize).
    assert tracking.load_model("models:/mae-vit-serve/1", registry["uri"]).cfg.num_classes == 0
