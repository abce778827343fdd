"""A predict.py driver whose shards take at least SECONDS each (for tests).

Used by tests/test_predict.py as ``python tests/predict_slow_driver.py SECONDS <predict.py args>``
so that the job can be killed while some shards are done and others are not. Only our own
per-shard method is wrapped (a subclass defined here, shipped to the Ray actors by value); Ray,
the dataset readers and the model are real. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orchestration.serving.batch as batch  # noqa: E402
from orchestration import predict  # noqa: E402

DELAY = float(sys.argv[1])


class SlowShardPredictor(batch.ShardPredictor):
    def predict_shard(self, s: int) -> tuple[str, int, list[dict[str, str]]]:
        time.sleep(DELAY)
        return super().predict_shard(s)


batch.ShardPredictor = SlowShardPredictor  # type: ignore[misc]
sys.exit(predict.main(sys.argv[2:]))
