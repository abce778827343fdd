"""Secret redaction: no environment variable whose *name* contains KEY/SECRET/TOKEN/PASSWORD (nor
its value) ever reaches params, tags or log records; URL user-info is masked too, in log records,
tracebacks and everything the CLIs print (:func:`install_log_redaction`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD")


REDACTED = "***"


_MIN_SECRET_LEN = 6  # shorter values ("1", "on", "token") would mask half the config


# Any user-info in a URL (``user:password@``, ``token@``) is a credential.
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")


_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


_EXTRA_SECRETS: set[str] = set()  # passwords of URLs seen by client() (e.g. from --tracking-uri)


def is_secret_name(name: str) -> bool:
    """True for names like ``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``, ``db_password``."""
    upper = name.upper()
    return any(w in upper for w in SECRET_WORDS)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret environment variables, longest first (so substrings mask cleanly).

    An env var is secret when KEY/SECRET/TOKEN/PASSWORD appears in its name *or* its value
    (``DB_URL=postgres://app:password@db``); values shorter than 6 characters are ignored.
    """
    env = os.environ if environ is None else environ
    vals = {
        v for k, v in env.items()
        if v and len(v) >= _MIN_SECRET_LEN and (is_secret_name(k) or is_secret_name(v))
    }
    # The password of a URL in the environment (MLFLOW_TRACKING_URI=http://u:pw@host) is masked
    # on its own too: HTTP libraries move it into headers and messages without the URL around it.
    for v in env.values():
        if "://" in v and "@" in v:
            vals.update(url_passwords(v))
    vals.update(_EXTRA_SECRETS)
    return sorted(vals, key=len, reverse=True)


def url_passwords(text: str) -> set[str]:
    """Passwords (raw and percent-decoded, at least 6 characters) of the URLs in ``text``."""
    out: set[str] = set()
    for url in _URL_IN_TEXT.findall(text):
        try:
            password = urllib.parse.urlsplit(url).password
        except ValueError:  # e.g. an invalid port: not a URL we can parse, the regex still masks it
            continue
        if password:
            out |= {p for p in (password, urllib.parse.unquote(password)) if len(p) >= _MIN_SECRET_LEN}
    return out


def add_url_secrets(uri: str) -> None:
    """Mask the password of ``uri`` (e.g. a ``--tracking-uri``) like a secret environment value."""
    _EXTRA_SECRETS.update(url_passwords(uri))


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every secret env value and URL credential replaced by ``***``."""
    out = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    for value in secret_values(environ):
        out = out.replace(value, REDACTED)
    return out


def redact(mapping: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Stringify and redact a params/tags mapping: secret-named keys are dropped entirely."""
    out: dict[str, str] = {}
    for key, value in mapping.items():
        # A secret-named key ("AWS_SECRET_ACCESS_KEY", "api_token") is dropped outright unless its
        # value is a plain number/bool (config fields such as "num_prefix_tokens=1" are no secret).
        if is_secret_name(str(key)) and not isinstance(value, (bool, int, float)):
            continue
        out[redact_text(str(key), environ)] = redact_text(_to_str(value), environ)
    return out


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record passing through a handler/logger."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging API name
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record must not kill logging
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class RedactingStream:
    """A text stream that redacts everything written through it (wraps ``sys.stdout``/``stderr``).

    MLflow and boto3 also print (``eprint``) and raise with URLs in their text; wrapping the
    process's streams catches what no logging filter sees. Each ``write`` is redacted on its own:
    ``print``, logging handlers and tracebacks write whole lines, so a URL is never split.
    """

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(redact_text(text))
        return len(text)  # what the caller passed: print() and logging check nothing else

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, buffer, ...
        return getattr(self._inner, name)


def _redacting_excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    (sys.stderr or sys.__stderr__).write(redact_text(text))


def _redacting_thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    (sys.stderr or sys.__stderr__).write(redact_text(f"Exception in thread {name}:\n{text}"))


def install_log_redaction() -> None:
    """Redact secrets in everything this process prints: log records, uncaught exceptions, stdout/err.

    Attaches :class:`RedactingFilter` to the root logger's handlers and the mlflow/ray loggers,
    replaces ``sys.excepthook``/``threading.excepthook`` with redacting ones, and wraps
    ``sys.stdout``/``sys.stderr`` in :class:`RedactingStream` (idempotent).
    """
    for stream_name in ("stdout", "stderr"):
        stream = getattr(sys, stream_name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, stream_name, RedactingStream(stream))
    sys.excepthook = _redacting_excepthook
    threading.excepthook = _redacting_thread_excepthook
    flt = RedactingFilter()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(flt)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # "Found credentials in ..." per client
    for name in ("", "mlflow", "ray", "orchestration", "training", "pipeline"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in lg.filters):
            lg.addFilter(flt)


def iter_secret_env(environ: Mapping[str, str] | None = None) -> Iterable[str]:
    """Names of secret-looking environment variables (for warnings; values never printed)."""
    env = os.environ if environ is None else environ
    return sorted(k for k in env if is_secret_name(k))
