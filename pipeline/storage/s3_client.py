"""The boto3 S3 client: its settings, and one client per process created lazily.

Reading is built for long streaming GETs from many processes: one client per process and
:class:`S3Settings`, created on first use (after a DataLoader fork, so forked workers never share
a parent's sockets), with a connection pool sized for the prefetch threads and connect/read
timeouts from the settings (``DataConfig.connect_timeout_s`` / ``read_timeout_s``), so a stalled
connection costs seconds, not boto3's fixed minute. The endpoint comes from
``AWS_ENDPOINT_URL`` (so MinIO and a local moto server work).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class S3Settings:
    """How the S3 client waits and retries; one boto3 client per process and settings.

    ``connect_timeout_s``/``read_timeout_s``: per socket connect / per socket read (a stall
    longer than this fails the attempt). ``request_attempts``: botocore ``standard`` mode
    attempts per request, the only request-level retry (see :mod:`pipeline.storage.retry`).
    """

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    request_attempts: int = 5
    max_pool_connections: int = 32

    def __post_init__(self) -> None:
        if not (self.connect_timeout_s > 0 and self.read_timeout_s > 0):
            raise ValueError(f"connect_timeout_s {self.connect_timeout_s} and read_timeout_s "
                             f"{self.read_timeout_s} must be > 0 seconds")
        if self.request_attempts < 1 or self.max_pool_connections < 1:
            raise ValueError(f"request_attempts {self.request_attempts} and max_pool_connections "
                             f"{self.max_pool_connections} must be >= 1")


_CLIENTS: dict[tuple[int, str | None, S3Settings], Any] = {}
_CLIENT_LOCK = threading.Lock()


def s3_client(settings: S3Settings | None = None) -> Any:
    """The process-wide boto3 S3 client for ``settings`` (endpoint from ``AWS_ENDPOINT_URL``)."""
    settings = settings or S3Settings()
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or None
    key = (os.getpid(), endpoint, settings)
    client = _CLIENTS.get(key)
    if client is not None:
        return client
    with _CLIENT_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(
                max_pool_connections=settings.max_pool_connections,
                retries={"total_max_attempts": settings.request_attempts, "mode": "standard"},
                connect_timeout=settings.connect_timeout_s,
                read_timeout=settings.read_timeout_s,
                tcp_keepalive=True,
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint, config=cfg)
            client.meta.events.register("before-send.s3", _no_expect_continue)
            _CLIENTS[key] = client
    return client


def _no_expect_continue(request: Any, **_: Any) -> None:
    """Send PUT bodies without waiting for ``100 Continue`` (botocore's default for S3 uploads).

    botocore reads the interim response's headers until a blank line and never stops at end
    of stream, so a connection closed inside ``HTTP/1.1 100 Continue`` spins a writer forever
    (botocore 1.44). Without ``Expect`` the body goes out at once and a cut connection is an
    ordinary, retried error. ``Expect`` is not a signed header, so removing it after signing is
    safe. Must return None: a value returned from ``before-send`` would be used as the response.
    """
    if "Expect" in request.headers:
        del request.headers["Expect"]
