"""pipeline.stream reads a shard run in blocks of samples (one read each, samples sliced out of it):
every sample's bytes are exactly its byte range, whatever the gaps, block limits and run subsets;
a shard cut inside a block serves the samples before the cut and Truncated from the cut on; the
whole-shard sha256 still covers every byte (gaps, blocks and tail)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from pipeline import stream
from pipeline.format import IntegrityError
from pipeline.storage import open_storage
from pipeline.stream import Run, Truncated, iter_runs


def _shard(path: Path, n: int, seed: int) -> tuple[list[int], list[int]]:
    """A file of ``n`` random members with random gaps (a few larger than a block's gap limit)."""
    rng = random.Random(seed)
    out, offs, sizes = bytearray(), [], []
    for i in range(n):
        gap = rng.choice([0, 512, 1024, 1536]) if i % 9 else rng.choice([0, stream.BLOCK_GAP + 1, 3 << 20])
        out += rng.randbytes(gap)
        size = rng.randint(1, 70_000)
        offs.append(len(out))
        sizes.append(size)
        out += rng.randbytes(size)
    out += rng.randbytes(1000)  # a tail after the last member (tar padding)
    path.write_bytes(bytes(out))
    return offs, sizes


def _read(root: Path, runs: list[Run]) -> dict[int, bytes | Truncated]:
    return {i: data for i, data, _, _ in iter_runs(open_storage(str(root)), runs)}


def _run(name: str, ids: list[int], offs: list[int], sizes: list[int], **kw: object) -> Run:
    return Run(name, np.array(ids), offsets=np.array([offs[i] for i in ids]), sizes=np.array([sizes[i] for i in ids]),
               **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [0, 1])
def test_blocks_serve_exact_bytes_for_any_subset(tmp_path: Path, seed: int) -> None:
    offs, sizes = _shard(tmp_path / "a.tar", 60, seed)
    blob = (tmp_path / "a.tar").read_bytes()
    rng = random.Random(seed)
    subsets = [list(range(60)), sorted(rng.sample(range(60), 17)), [59], list(range(0, 60, 3))]
    for ids in subsets:
        got = _read(tmp_path, [_run("a.tar", ids, offs, sizes)])
        assert list(got) == ids
        for i in ids:
            assert got[i] == blob[offs[i]: offs[i] + sizes[i]], (ids, i)


def test_whole_shard_sha256_covers_gaps_blocks_and_tail(tmp_path: Path) -> None:
    offs, sizes = _shard(tmp_path / "a.tar", 40, 2)
    blob = (tmp_path / "a.tar").read_bytes()
    ids = list(range(40))
    good = hashlib.sha256(blob).hexdigest()
    got = _read(tmp_path, [_run("a.tar", ids, offs, sizes, expect_bytes=len(blob), expect_sha256=good)])
    assert all(got[i] == blob[offs[i]: offs[i] + sizes[i]] for i in ids)
    # A changed byte that is never served is still seen: in a small gap (read as part of a block), in
    # a large gap (skipped between blocks) and in the tail after the last member.
    small = next(j for j in range(1, 40) if 0 < offs[j] - offs[j - 1] - sizes[j - 1] <= stream.BLOCK_GAP)
    large = next(j for j in range(1, 40) if offs[j] - offs[j - 1] - sizes[j - 1] > stream.BLOCK_GAP)
    for where in (offs[small] - 1, offs[large] - 1, len(blob) - 1):
        damaged = bytearray(blob)
        damaged[where] ^= 1
        (tmp_path / "a.tar").write_bytes(bytes(damaged))
        with pytest.raises(IntegrityError, match=r"a\.tar has sha256 .* modified after publishing"):
            _read(tmp_path, [_run("a.tar", ids, offs, sizes, expect_bytes=len(blob), expect_sha256=good)])

def test_a_cut_inside_a_block_serves_what_came_before(tmp_path: Path) -> None:
    offs, sizes = _shard(tmp_path / "a.tar", 30, 3)
    blob = (tmp_path / "a.tar").read_bytes()
    cut = offs[7] + sizes[7] // 2  # member 7 is cut in half: 0-6 whole, 7-29 truncated
    (tmp_path / "a.tar").write_bytes(blob[:cut])
    got = _read(tmp_path, [_run("a.tar", list(range(30)), offs, sizes)])
    assert [i for i, d in got.items() if isinstance(d, Truncated)] == list(range(7, 30))
    assert all(got[i] == blob[offs[i]: offs[i] + sizes[i]] for i in range(7))


def test_a_block_ends_at_a_large_gap_at_16_samples_and_at_4_mb() -> None:
    from pipeline.stream import CHUNK_BYTES, CHUNK_ITEMS, _block

    offs = [i * 1000 for i in range(40)]
    assert _block(offs, [900] * 40, 0) == (CHUNK_ITEMS, offs[CHUNK_ITEMS - 1] + 900)  # 16 samples
    offs2 = [0, 1000, 1000 + stream.BLOCK_GAP + 2000, 1000 + stream.BLOCK_GAP + 3000]
    assert _block(offs2, [900] * 4, 0) == (2, 1900)  # the gap after sample 1 is too large to read through
    assert _block(offs2, [900] * 4, 2) == (4, offs2[3] + 900)
    big = CHUNK_BYTES // 3
    offs3 = [0, big, 2 * big, 3 * big]
    assert _block(offs3, [big] * 4, 0) == (3, 3 * big)  # a fourth would pass 4 MB
    assert _block([0], [CHUNK_BYTES * 2], 0) == (1, CHUNK_BYTES * 2)  # one sample larger than a block
