"""The project's state directory: the one place vitscale writes for itself (docs/design.md, convention 13).

``$VITSCALE_HOME``, else ``<checkout>/.vitscale`` when the code runs from a source checkout
(``pyproject.toml`` next to the packages), else ``~/.vitscale`` (an installed package). It holds
the local services' pids, logs and ``env.sh`` (``infra/local/start_services.sh``, which resolves
the same default in shell), the default MLflow store ``sqlite:///<state>/mlflow.db`` and the
default run storage ``<state>/runs``. Sourcing ``env.sh`` exports ``VITSCALE_HOME`` (and the same
MLflow URI), so a shell with it and a shell without it use one tracking store.

Under ``ray job submit --working-dir`` the code runs from a temporary copy of the checkout; the
local services' ``env.sh`` gives the Ray head (hence every job) ``VITSCALE_HOME``, so a job's
defaults stay in the original checkout's state dir. Only ``orchestration/`` reads this module:
``pipeline/`` and ``training/`` take their paths as arguments.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

#: The folder holding the project's packages (a checkout, an unpacked Ray working_dir, or site-packages).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
HOME_ENV = "VITSCALE_HOME"
STORAGE_ENV = "VITSCALE_STORAGE"


def is_checkout(root: Path | None = None) -> bool:
    """Whether ``root`` (default: where this code is) is a source checkout of the project (its
    pyproject.toml next to the packages)."""
    root = root or PACKAGE_ROOT
    return (root / "pyproject.toml").is_file() and (root / "orchestration").is_dir()


def state_dir() -> Path:
    """``$VITSCALE_HOME``, else ``<checkout>/.vitscale`` from a source checkout, else ``~/.vitscale``.

    Not created here: whoever writes into it creates what it needs.
    """
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if is_checkout():
        if _in_ray_working_dir():
            log.warning("%s is not set and this code runs from a Ray working_dir copy (%s): state written to the "
                        "default %s is deleted with the job; source the local services' env.sh before starting "
                        "the Ray head, or set %s", HOME_ENV, PACKAGE_ROOT, PACKAGE_ROOT / ".vitscale", HOME_ENV)
        return PACKAGE_ROOT / ".vitscale"
    return Path.home() / ".vitscale"


def default_tracking_uri() -> str:
    """The MLflow store when ``MLFLOW_TRACKING_URI`` is not set: ``sqlite:///<state>/mlflow.db``."""
    return f"sqlite:///{state_dir() / 'mlflow.db'}"


def default_storage() -> str:
    """Run storage when ``--storage`` is not given: ``$VITSCALE_STORAGE`` or ``<state>/runs``
    (use s3:// on a multi-node cluster: every node must reach it)."""
    return os.environ.get(STORAGE_ENV) or str(state_dir() / "runs")


def _in_ray_working_dir() -> bool:
    return "runtime_resources" in str(PACKAGE_ROOT)
