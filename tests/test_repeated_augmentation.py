"""#25 repeated augmentation (``data.augment.repeats``, DeiT's RASampler): the epoch plan repeats
every sample R times with the copies on different ranks, and the loader keeps its exactly-once
accounting of the copies, equal batches per rank and exact resume (docs/distillation.md).
"""

from __future__ import annotations

import pytest
import torch

SIZES = [37, 3, 90, 1, 55, 20, 64, 11]  # deliberately uneven shards, 281 samples


@pytest.mark.parametrize("world,workers,batch", [(3, 1, 5), (4, 2, 4), (2, 2, 8), (1, 3, 7)])
def test_plan_repeats_every_sample_on_different_ranks(world: int, workers: int, batch: int) -> None:
    """repeats=3: every sample 3 times per epoch (but the dropped remainder, < S*B copies, all of the
    last copy), equal slots, and with world >= 3 a sample's copies on 3 different ranks."""
    import numpy as np

    from pipeline.plan import EpochPlan, epoch_order

    start = np.concatenate([[0], np.cumsum(SIZES)])
    T = int(start[-1])
    for epoch in range(2):
        p = EpochPlan(epoch_order(start, seed=7, epoch=epoch, train=True, repeats=3), world, workers, batch, True,
                      7, epoch, 0, 16)
        em = [p.slot_emission(s) for s in range(p.num_slots)]
        assert {len(e) for e in em} == {p.slot_len} and p.slot_len % batch == 0
        v = np.concatenate(em)
        assert len(v) == len(set(v.tolist())) and len(v) + p.dropped == 3 * T  # every copy at most once
        assert p.dropped < world * workers * batch
        counts = np.bincount(v % T, minlength=T)
        dropped = np.setdiff1d(np.arange(3 * T), v)
        assert (dropped // T == 2).all()  # only last copies are dropped
        assert (counts == 3 - np.bincount(dropped % T, minlength=T)).all()
        if world >= 3:
            rank_of = {int(i): s // workers for s, e in enumerate(em) for i in e}
            for i in range(T):
                ranks = [rank_of[c * T + i] for c in range(3) if c * T + i in rank_of]
                assert len(set(ranks)) == len(ranks), (i, ranks)


def test_plan_repeats_survive_a_world_size_change() -> None:
    """A mid-epoch resume on another layout (new segment): copies already emitted are not emitted
    again, none planned is lost but the layouts' remainders."""
    import numpy as np

    from pipeline.plan import EpochPlan, consumed_ids, epoch_order, remaining_order

    start = np.concatenate([[0], np.cumsum(SIZES)])
    T = int(start[-1])
    a = EpochPlan(epoch_order(start, seed=3, epoch=0, train=True, repeats=3), 2, 2, 6, True, 3, 0, 0, 16)
    head = consumed_ids(a, 7)
    b = EpochPlan(remaining_order(a, 7), 3, 1, 5, True, 3, 0, 1, 16)
    tail = np.concatenate([b.slot_emission(s) for s in range(b.num_slots)])
    got = np.concatenate([head, tail])
    assert len(got) == len(set(got.tolist()))
    assert len(head) + len(b.order) == 3 * T  # the new segment plans every copy not yet emitted
    assert 3 * T - len(got) == b.dropped < 3 * 1 * 5
    assert np.bincount(got % T, minlength=T).max() == 3


@pytest.fixture(scope="module")
def id_ds(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a Path
    """500 index-coded images in uneven shards (13 x 37 + 19)."""
    from pipeline import write_dataset
    from pipeline.demo_data import make_index_folder

    root = tmp_path_factory.mktemp("ids_ra")
    make_index_folder(root / "src", n=500, num_classes=10)
    write_dataset(root / "src", str(root / "ds"), samples_per_shard=37, progress=False)
    return root / "ds"


def _ra_cfg(ds, **kw: object):  # noqa: ANN001, ANN202 - a DataConfig
    from pipeline import DataConfig, IOConfig, SourceConfig

    base = DataConfig(source=SourceConfig(url=str(ds)), image_size=16, batch_size=15,
                      io=IOConfig(num_workers=2, shuffle_buffer=32))
    return base.replace(**{"augment.repeats": 3, **kw})


def _ids(batch: tuple):  # noqa: ANN202 - an int array
    from pipeline.demo_data import decode_index

    return decode_index(batch[0].numpy())


@pytest.mark.integration
def test_loader_repeats_each_sample_three_times_resumes_exactly_and_keeps_the_count(id_ds) -> None:  # noqa: ANN001
    """2 ranks x 2 workers, repeats=3, 1500 copies = 4 slots x 375: every image exactly 3 times in the
    epoch, equal batches per rank; a mid-epoch resume (same layout) yields the rest batch for batch;
    a resume on 3 ranks x 1 worker still sees every copy at most once, none lost but the new
    layout's remainder; a state of another repeats is refused."""
    import json
    from collections import Counter

    import numpy as np

    from pipeline import build_loader

    full = {}
    for rank in range(2):
        ld = build_loader(_ra_cfg(id_ds), rank=rank, world_size=2)
        full[rank] = [b for b in ld]
        assert len(full[rank]) == len(ld) == 50
    counts = Counter(np.concatenate([_ids(b) for r in full for b in full[r]]).tolist())
    assert set(counts) == set(range(500)) and set(counts.values()) == {3}
    # same layout, 11 batches then a new loader from the saved state: the very same batches
    head = build_loader(_ra_cfg(id_ds), rank=1, world_size=2)
    for k, _ in enumerate(head, 1):
        if k == 11:
            break
    state = json.loads(json.dumps(head.state_dict()))
    assert state["repeats"] == 3 and state["batches"] == 11
    again = build_loader(_ra_cfg(id_ds), rank=1, world_size=2)
    again.load_state_dict(state)
    tail = list(again)
    assert len(tail) == 39
    for (x1, y1), (x2, y2) in zip(full[1][11:], tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # another layout: 3 ranks x 1 worker continue the epoch after 11 batches of each of the 2 ranks
    seen = Counter(np.concatenate([_ids(b) for r in full for b in full[r][:11]]).tolist())
    lens = set()
    for rank in range(3):
        ld = build_loader(_ra_cfg(id_ds, **{"io.num_workers": 1}), rank=rank, world_size=3)
        ld.load_state_dict(state)
        rest = list(ld)
        lens.add(len(rest))
        seen.update(np.concatenate([_ids(b) for b in rest]).tolist())
    assert len(lens) == 1 and max(seen.values()) == 3
    assert 1500 - sum(seen.values()) < 3 * 1 * 15  # only the new layout's remainder
    with pytest.raises(ValueError, match=r"repeats=3, this loader has 1; resume with repeats=3"):
        build_loader(_ra_cfg(id_ds, **{"augment.repeats": 1}), rank=0, world_size=2).load_state_dict(state)


@pytest.mark.integration
def test_each_copy_is_augmented_on_its_own(tmp_path) -> None:  # noqa: ANN001
    """One slot without a shuffle buffer emits copy 0 of every sample, then copy 1: the same labels
    in the same order, each copy its own random crop."""
    from pipeline import DataConfig, IOConfig, SourceConfig, build_loader, write_dataset
    from pipeline.demo_data import make_digits_folder

    make_digits_folder(tmp_path / "src", image_size=24, limit=96)
    write_dataset(tmp_path / "src", str(tmp_path / "ds"), samples_per_shard=96, progress=False)
    cfg = DataConfig(source=SourceConfig(url=str(tmp_path / "ds")), image_size=16, batch_size=8,
                     io=IOConfig(num_workers=0, shuffle_buffer=0)).replace(
        **{"augment.repeats": 2, "augment.crop_scale": (0.3, 1.0)})
    batches = list(build_loader(cfg, rank=0, world_size=1))
    assert len(batches) == 24
    for (x0, y0), (x1, y1) in zip(batches[:12], batches[12:], strict=True):
        assert torch.equal(y0, y1) and not torch.equal(x0, x1)
