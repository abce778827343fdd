"""``build_loader``: deterministic, resumable, rank-balanced batches from a sharded dataset.

The stages are composed in exactly one place, :meth:`ShardStream.__iter__`, in order:
shard plan -> split by rank -> split by worker -> read -> decode -> transform -> batch.

* Each (rank, DataLoader worker) pair is a *slot* of the :class:`~pipeline.plan.EpochPlan`.
* Batching happens inside the worker (``DataLoader(batch_size=None)``), and the DataLoader
  returns worker results round robin, so the batch sequence of a rank is a pure function of
  ``(seed, epoch, world_size, num_workers, batch_size)``. The resume cursor is therefore just
  ``(epoch, batches yielded)``: on restore each worker recomputes its emission order and skips
  the samples it already produced *without reading or decoding them*.
* A bad sample in a train batch is replaced by a good one of the same batch (counted as
  ``filled``) rather than shortening the batch: batch counts, and hence collectives, never
  depend on data quality. In eval batches it is masked (``valid=False``) instead.
* Each batch carries the worker's stats delta back to the main process, so
  ``loader.stats()`` aggregates over workers. The loader raises :class:`BadDataError`, naming
  the worst shards, as soon as the bad samples of the pass exceed ``max_bad_fraction`` of the
  samples the pass will read (see :class:`BadSampleLimit`), whatever the split's size or the
  order the bad samples come in. That holds for eval too: a truncated val shard is an error
  naming the shard, not metrics quietly computed on what was left.

One module per concern:

* :mod:`.config`: :class:`DataConfig` and its validation;
* :mod:`.meta`: :class:`Meta`, the split's per-sample index, read by :func:`load_meta`;
* :mod:`.bad_samples`: :class:`BadSampleLimit`, :class:`BadDataError`;
* :mod:`.dataset`: :class:`ShardStream`, the per-worker stages;
* :mod:`.worker_signals`: the workers' SIGTERM handling (``leave_sigterm_to_the_parent``);
* :mod:`.loader`: :class:`Loader` (cursor, state, stats) and :func:`build_loader`.
"""

from .bad_samples import WARN_Z, BadDataError, BadSampleLimit, wilson_lower
from .config import AugmentConfig, DataConfig, IOConfig, PreprocessConfig, SourceConfig
from .dataset import LOG_FIRST_BAD, ShardStream
from .loader import STATE_VERSION, Loader, Segment, build_loader
from .meta import Meta, load_meta
from .worker_signals import PARENT_CHECK_S, leave_sigterm_to_the_parent

__all__ = ["LOG_FIRST_BAD", "PARENT_CHECK_S", "STATE_VERSION", "WARN_Z", "BadDataError", "BadSampleLimit",
           "AugmentConfig", "DataConfig", "IOConfig", "Loader", "PreprocessConfig", "SourceConfig", "Meta", "Segment", "ShardStream", "build_loader", "leave_sigterm_to_the_parent",
           "load_meta", "wilson_lower"]
