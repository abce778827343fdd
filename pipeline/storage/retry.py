"""Which storage failures are retried, by whom, and the errors that say a retry budget is spent.

Exactly two retry layers, each for failures the other cannot see, so attempts never multiply:
botocore's ``standard`` retries (``S3Settings.request_attempts`` per request) own every failure
of a request up to its parsed response (connect errors, resets before the body, 5xx, throttling,
timeouts while waiting for headers); the :class:`~pipeline.storage.ranges.RangeReader` owns what
comes after botocore returned: the body stream breaking, and responses botocore accepted but that
are damaged (headers cut mid-way parse as a response without ``Content-Range``/``Content-Length``,
see :class:`DamagedResponse`). A request error that botocore already retried is final for the
reader. The classification lives here, in one place, so the reader and
:class:`~pipeline.storage.s3.S3Storage` cannot disagree on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

#: Default attempts for one streamed object before giving up (each one resumes, not restarts).
DEFAULT_RETRIES = 6


class StorageError(IOError):
    """An object could not be read or written after all retries; the message names it."""


class NoCredentialsStorageError(StorageError, PermissionError):
    """No S3 credentials were found: a set-up problem, never retried (a PermissionError)."""

    def __init__(self, target: str) -> None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        super().__init__(
            f"no S3 credentials for {target} (endpoint: {endpoint or 'AWS, AWS_ENDPOINT_URL is not set'}): for "
            "the project's local S3 run `make services-up && source .vitscale/env.sh`; for another store set "
            "AWS_ENDPOINT_URL and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or an AWS profile)")


class DamagedResponse(Exception):
    """A response botocore accepted but that cannot be right (e.g. headers cut mid-way).

    An HTTP response whose connection closes inside the header block parses as a complete
    response with the remaining headers missing; using it raised ``KeyError: 'ContentLength'``.
    Raised by our parsing, and retried by the RangeReader like a broken connection.
    """



def _botocore_classes() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(errors botocore's standard mode retries per request, errors of a streaming body)."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import ProtocolError

    # HTTPClientError covers ConnectionClosedError, ReadTimeoutError, ResponseStreamingError;
    # botocore's ConnectionError covers EndpointConnectionError and ConnectTimeoutError.
    request = (ClientError, BotoConnectionError, HTTPClientError)
    stream = (HTTPClientError, BotoConnectionError, IncompleteReadError, ProtocolError)
    return request, stream


def _retried_by_botocore(exc: BaseException) -> bool:
    """A request-level error: if transient, botocore already retried it ``request_attempts`` times."""
    return isinstance(exc, _botocore_classes()[0])


def _retryable(exc: BaseException) -> bool:
    """Errors worth a resume-from-offset retry: broken or stalled streams, damaged responses, 5xx."""
    from botocore.exceptions import ClientError

    if isinstance(exc, DamagedResponse):
        return True
    if isinstance(exc, ClientError):
        meta = exc.response.get("ResponseMetadata", {})
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(meta.get("HTTPStatusCode", 0) or 0)
        return status >= 500 or status == 429 or code in {"SlowDown", "RequestTimeout", "InternalError"}
    if isinstance(exc, _botocore_classes()[1]):
        return True
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    return isinstance(exc, OSError | EOFError)  # local files, raw sockets, our own short-stream check


def _parsed(what: str, call: Callable[[], Any]) -> Any:
    """Run one botocore call; a response it could not parse becomes :class:`DamagedResponse`.

    A header block cut mid-way can end inside a value botocore parses (``Last-Modified: Mon,
    30 Nov 2026 2`` raises ``ValueError: Invalid timestamp``); botocore does not retry that.
    Only the call is wrapped, so a KeyError of our own code is never mistaken for one.
    """
    from botocore.exceptions import BotoCoreError, NoCredentialsError
    from botocore.parsers import ResponseParserError

    try:
        return call()
    except NoCredentialsError as exc:
        raise NoCredentialsStorageError(what) from exc
    except (ResponseParserError, KeyError, ValueError, IndexError) as exc:
        if isinstance(exc, BotoCoreError):  # e.g. UnknownEndpointError: configuration, not a response
            raise
        raise DamagedResponse(f"{what}: unparseable response ({exc!r})") from exc

