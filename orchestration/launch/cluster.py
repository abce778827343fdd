"""Connecting to Ray: a cluster (``$RAY_ADDRESS``, ``ray job submit``) or a private local instance."""

from __future__ import annotations

import os
import shutil
import tempfile


def connect_ray(address: str | None = None) -> str:
    """Connect to a Ray cluster and return a description of it.

    ``address`` (or ``$RAY_ADDRESS``, which ``ray job submit`` sets for the job's driver) joins
    an existing cluster; ``"auto"`` joins the newest cluster started on this machine. With
    neither, a private local Ray instance is started. We do not try ``"auto"`` implicitly: on a
    shared machine it would attach to somebody else's ``ray start --head``.
    """
    import ray

    if ray.is_initialized():
        return "already connected"
    addr = address or os.environ.get("RAY_ADDRESS") or None
    if addr:
        ray.init(address=addr, log_to_driver=True)
        return f"cluster at {addr}"
    _private_auth_token()
    ray.init(include_dashboard=False, log_to_driver=True)
    return "local Ray instance"


def _private_auth_token() -> None:
    """Give a private local Ray instance its own token (token auth stays on).

    Without one, ``ray.init()`` would create and keep ``~/.ray/auth_token``: state outside the
    project that later runs silently depend on (DESIGN.md rule 13). The token lives in a 0700
    temp folder for this process's lifetime; Ray's processes inherit the path, never the value.
    A token the caller already configured (``RAY_AUTH_TOKEN[_PATH]``) is used as it is.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return  # the caller chose another mode explicitly
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    import atexit
    import secrets

    folder = tempfile.mkdtemp(prefix="vitscale-ray-auth-")  # mode 0700
    path = os.path.join(folder, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    atexit.register(shutil.rmtree, folder, True)
    # Only the path is set: with RAY_AUTH_MODE unset, ray.init() turns token mode on itself
    # (and refreshes its cached config, which an env change alone would not reach).
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
