"""Compare-and-swap of one object (`Storage.put_if`/`read_versioned`/`delete_if`), local and S3.

The one mechanism under dataset publishing (pipeline.format.publish) and run leases
(orchestration.launch.lease): a create succeeds once, a replace only over the content it saw, racing
writers have exactly one winner.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pipeline.storage import Storage, open_storage


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/cas")


@pytest.mark.integration
def test_put_if_creates_once_and_replaces_only_what_it_saw(store: Storage) -> None:
    assert store.read_versioned("k.json") is None
    t1 = store.put_if("k.json", b"one", token=None)
    assert t1 is not None and store.put_if("k.json", b"again", token=None) is None  # exists: no create
    assert store.read_versioned("k.json") == (b"one", t1)
    t2 = store.put_if("k.json", b"two", token=t1)
    assert t2 is not None and t2 != t1
    assert store.put_if("k.json", b"stale", token=t1) is None  # t1 is no longer what is stored
    assert store.read_bytes("k.json") == b"two"
    assert not store.delete_if("k.json", token=t1) and store.exists("k.json")
    assert store.delete_if("k.json", token=t2) and store.read_versioned("k.json") is None
    assert store.put_if("k.json", b"x", token=t2) is None  # gone: a replace is no create


@pytest.mark.integration
def test_racing_creates_have_exactly_one_winner(store: Storage) -> None:
    start, results = threading.Barrier(8), []

    def race(i: int) -> None:
        start.wait()
        results.append((i, store.put_if("race.json", f"writer {i}".encode(), token=None)))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [i for i, token in results if token is not None]
    assert len(results) == 8 and len(winners) == 1
    assert store.read_bytes("race.json") == f"writer {winners[0]}".encode()
