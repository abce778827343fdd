"""vitscale data pipeline: WebDataset shards on object storage, streamed deterministically.

Public API:

* :class:`DataConfig`, :func:`build_loader` -> :class:`Loader` (``pipeline.loader``);
* :mod:`pipeline.storage`: ``open_storage(url)``, ``url_join``, :class:`StorageError`;
* :func:`write_dataset` and the ``python -m pipeline.write_shards SRC DEST`` CLI; its steps
  (plan, write one shard, finish) in :mod:`pipeline.shards`, the source layouts in
  :mod:`pipeline.sources` and :mod:`pipeline.synset_tars` (orchestration/prepare.py runs the
  same steps on Ray);
* :mod:`pipeline.shard_audit`: per-shard integrity check, content and perceptual hashes;
* :mod:`pipeline.demo_data`: ``make_digits_folder`` and friends (``python -m pipeline.demo_data``).
"""

from typing import Any

from .loader import (
    AugmentConfig,
    BadDataError,
    DataConfig,
    IOConfig,
    Loader,
    PreprocessConfig,
    SourceConfig,
    build_loader,
)
from .storage import StorageError, open_storage, url_join

__all__ = ["AugmentConfig", "BadDataError", "DataConfig", "IOConfig", "PreprocessConfig", "SourceConfig", "Loader", "StorageError", "build_loader", "open_storage", "url_join",
           "write_dataset"]


def __getattr__(name: str) -> Any:
    # Imported lazily so `python -m pipeline.write_shards` does not import itself twice.
    if name == "write_dataset":
        from .write_shards import write_dataset

        return write_dataset
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
