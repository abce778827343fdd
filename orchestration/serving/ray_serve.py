"""A registered model's pyfunc as an autoscaled Ray Serve deployment (``orchestration/serve.py``).

Every replica loads the same pyfunc ``mlflow models serve`` loads (``mlflow.pyfunc.load_model``)
and answers with MLflow's own scoring code (``scoring_server.invocations``): the same request
format (``dataframe_split`` with base64 images, ``params``), the same response and the same 4xx
errors, whichever server a client talks to. On top of it, each request's body is capped
(``ServingSpec.max_request_bytes``, checked from ``Content-Length`` and again while reading, 413)
before anything is parsed. Replicas scale between ``min_replicas`` and ``max_replicas`` on
ongoing requests, with one GPU each when the cluster has GPUs.

The model version is resolved once by the caller (``models:/NAME@ALIAS`` -> ``models:/NAME/7``), so
every replica, including ones started later by autoscaling, serves the same weights even if the
alias moves meanwhile. Replicas read the tracking URI from their own environment (credentials
never go into what Ray keeps); ``tracking_uri`` is passed only when it holds no secret.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from ray import serve

#: A replica's ongoing requests before autoscaling adds one (Ray Serve's default is 2).
TARGET_ONGOING = 2


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """What the deployment needs: the pinned model URI and the deployment's shape."""

    model_uri: str  # models:/NAME/VERSION (resolved), runs:/..., or a local pyfunc folder
    tracking_uri: str | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_request_bytes: int = 64 << 20
    max_ongoing_requests: int = 8


class PyfuncServer:
    """One replica: the pyfunc and MLflow's scoring protocol behind a capped request body."""

    def __init__(self, cfg: ServeConfig) -> None:
        import mlflow

        if cfg.tracking_uri:
            mlflow.set_tracking_uri(cfg.tracking_uri)
        self.cfg = cfg
        self.model = mlflow.pyfunc.load_model(cfg.model_uri)
        self.schema = self.model.metadata.get_input_schema()
        predictor = getattr(self.model.unwrap_python_model(), "predictor", None)
        limit = predictor.spec.max_request_bytes if predictor is not None else cfg.max_request_bytes
        self.max_bytes = min(limit, cfg.max_request_bytes)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        path = request.url.path.rstrip("/")
        if request.method == "GET" and path in ("", "/ping", "/health"):
            return Response("\n", status_code=200, media_type="application/json")
        if request.method != "POST" or path != "/invocations":
            return _error(404, "ENDPOINT_NOT_FOUND", "POST encoded images to /invocations (GET /ping for health)")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return _error(413, "REQUEST_LIMIT_EXCEEDED", f"request body of {declared} bytes is over the limit of "
                                                         f"{self.max_bytes} bytes; send fewer or smaller images")
        body = bytearray()
        async for chunk in request.stream():  # chunked uploads carry no Content-Length: cap while reading
            body += chunk
            if len(body) > self.max_bytes:
                return _error(413, "REQUEST_LIMIT_EXCEEDED", f"request body over the limit of {self.max_bytes} "
                                                             "bytes; send fewer or smaller images")
        return await asyncio.to_thread(self._invoke, bytes(body), request.headers.get("content-type", ""))

    def _invoke(self, body: bytes, content_type: str) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import invocations
        from starlette.responses import Response

        try:
            res = invocations(body, content_type, self.model, self.schema)
        except MlflowException as e:
            return Response(e.serialize_as_json(), status_code=e.get_http_status_code(), media_type="application/json")
        return Response(res.response, status_code=res.status, media_type=res.mimetype)


def _error(status: int, code: str, message: str) -> Any:
    from starlette.responses import Response

    return Response(json.dumps({"error_code": code, "message": message}), status_code=status,
                    media_type="application/json")


def build_app(cfg: ServeConfig) -> Any:
    """The Ray Serve application: :class:`PyfuncServer` with autoscaling and resources from ``cfg``."""
    autoscaling = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                   "target_ongoing_requests": TARGET_ONGOING, "upscale_delay_s": 2.0, "downscale_delay_s": 60.0}
    deployment = serve.deployment(
        PyfuncServer, name="vitscale-model", autoscaling_config=autoscaling,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    )
    return deployment.bind(cfg)


def start(cfg: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, name: str = "vitscale") -> str:
    """Start Serve's HTTP proxy on ``host:port`` (Ray must be connected) and deploy ``cfg``; returns
    the invocations URL once every initial replica has loaded the model."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/invocations"


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster (0 on a CPU cluster)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
