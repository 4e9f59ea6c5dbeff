"""Claims about masking.py: the official multi-block statistics, its invariants, and replayable seeding."""
import time

import numpy as np
import pytest
import torch

from masking import SHORT_RANGE, MaskCollator, MultiBlockMasker, RandomTubeMasker, block_size, rng_for

GRID = (8, 14, 14)  # 16 x 224 x 224 with 2 x 16 x 16 tubelets
N = 8 * 14 * 14


@pytest.mark.parametrize("truncation", ["official", "random"])
def test_invariants(truncation):
    masker = MultiBlockMasker(GRID, truncation=truncation, seed=1)
    for step in range(20):
        masks = masker(24, step)
        assert len(masks) == 2
        for ctx, tgt in masks:
            assert ctx.dtype == tgt.dtype == torch.int64
            assert ctx.shape[0] == tgt.shape[0] == 24 and ctx.shape[1] > 0 and tgt.shape[1] > 0
            assert ctx.min() >= 0 and tgt.min() >= 0 and ctx.max() < N and tgt.max() < N
            for c, g in zip(ctx.tolist(), tgt.tolist()):
                assert not set(c) & set(g), "context and targets overlap"
                assert c == sorted(c) and g == sorted(g) and len(set(c)) == len(c)


def test_untruncated_targets_are_whole_time_columns():
    t, h, w = GRID
    masker = MultiBlockMasker(GRID, seed=2)
    for step in range(5):
        for ctx, tgt in masker(1, step):  # batch 1: nothing is truncated
            spatial = tgt[0] % (h * w)
            counts = torch.bincount(spatial, minlength=h * w)
            assert set(counts.tolist()) <= {0, t}, "a target block must span every time step"
            assert len(ctx[0]) + len(tgt[0]) == N


def test_block_union_covers_the_official_fraction():
    """Short-range blocks are 15% of the frame each (int(196*0.15)=29 tokens, shaped by the aspect ratio)."""
    sizes = [block_size(SHORT_RANGE, 14, 14, rng_for(0, s)) for s in range(200)]
    areas = np.array([a * b for a, b in sizes])
    assert areas.min() >= 24 and areas.max() <= 36
    assert all(0.75 * 0.8 <= a / b <= 1.5 * 1.25 for a, b in sizes)


def test_mean_counts_match_official():
    """Official collator (src/masks/multiblock3d.py) at 224 px, batch 24: short-range context 367 /
    targets 750, long-range context 102 / targets 1100."""
    masker = MultiBlockMasker(GRID, seed=0)
    counts = np.array([[[c.shape[1], g.shape[1]] for c, g in masker(24, s)] for s in range(200)]).mean(0)
    (short_ctx, short_tgt), (long_ctx, long_tgt) = counts
    assert abs(short_ctx - 367) < 15 and abs(short_tgt - 750) < 25
    assert abs(long_ctx - 102) < 8 and abs(long_tgt - 1100) < 25


def test_official_truncation_drops_latest_tokens_random_does_not():
    t, h, w = GRID
    late = {}
    for mode in ("official", "random"):
        masker = MultiBlockMasker(GRID, truncation=mode, seed=3)
        ctx = torch.cat([masker(24, s)[0][0].flatten() for s in range(30)])
        late[mode] = (ctx // (h * w) == t - 1).float().mean().item()  # share of context in the last step
    assert late["official"] < 0.8 / t  # biased toward early frames
    assert abs(late["random"] - 1 / t) < 0.02  # uniform over time


def same(a, b):
    return all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_same_seed_step_rank_same_masks():
    a, b = MultiBlockMasker(GRID, seed=7), MultiBlockMasker(GRID, seed=7)
    assert same(a(8, 5, rank=1), b(8, 5, rank=1))
    assert not same(a(8, 5, rank=1), a(8, 6, rank=1))
    assert not same(a(8, 5, rank=1), a(8, 5, rank=2))
    assert not same(a(8, 5, rank=1), MultiBlockMasker(GRID, seed=8)(8, 5, rank=1))


def test_fast_enough():
    masker = MultiBlockMasker(GRID)
    masker(24, 0)
    start = time.perf_counter()
    for s in range(20):
        masker(24, s)
    assert (time.perf_counter() - start) / 20 < 0.02  # measured ~2 ms on a 2-core CPU


def test_random_tube():
    t, h, w = GRID
    ctx, tgt = RandomTubeMasker(GRID, ratio=0.9, seed=0)(4, 0)[0]
    assert ctx.shape == (4, t * int(h * w * 0.1)) and tgt.shape == (4, N - ctx.shape[1])
    for c, g in zip(ctx.tolist(), tgt.tolist()):
        assert not set(c) & set(g) and len(c) + len(g) == N
        spatial = torch.tensor(c) % (h * w)
        assert set(torch.bincount(spatial, minlength=h * w).tolist()) <= {0, t}
    with pytest.raises(ValueError, match="ratio"):
        RandomTubeMasker(GRID, ratio=1.0)


def test_collator_stacks_and_uses_the_step():
    masker = MultiBlockMasker((4, 8, 8), seed=0)
    samples = [(torch.randn(3, 8, 64, 64), i, 12, [f"v{i}.mp4: corrupt"] * (i % 2)) for i in range(3)]
    batch = MaskCollator(masker)(samples)
    assert batch["clips"].shape == (3, 3, 8, 64, 64) and batch["labels"].tolist() == [0, 1, 2]
    assert batch["step"] == 12 and batch["skipped"] == ["v1.mp4: corrupt"]
    assert torch.equal(batch["masks"][0][0], masker(3, 12)[0][0])
    with pytest.raises(ValueError, match="one step"):
        MaskCollator(masker)([(torch.zeros(1), 0, 1, []), (torch.zeros(1), 0, 2, [])])
