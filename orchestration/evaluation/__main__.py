"""``python -m orchestration.evaluation ...``: the same CLI as ``python orchestration/evaluate.py``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
