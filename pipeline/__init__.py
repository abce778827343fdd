"""vitscale data pipeline: WebDataset shards on object storage, streamed deterministically.

Public API: :class:`DataConfig`, :func:`build_loader` / :class:`Loader`, :mod:`pipeline.storage`
(``open_storage``, ``url_join``), :mod:`pipeline.write_shards` (``write_dataset`` and the
``python -m pipeline.write_shards`` CLI) and :mod:`pipeline.demo_data`.
"""

from .loader import BadDataError, DataConfig, Loader, build_loader
from .storage import StorageError, open_storage, url_join
from .write_shards import write_dataset

__all__ = ["BadDataError", "DataConfig", "Loader", "StorageError", "build_loader", "open_storage", "url_join",
           "write_dataset"]
