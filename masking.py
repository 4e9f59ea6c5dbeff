"""Masks for V-JEPA: which tokens the context encoder sees and which ones the predictor must fill in.

Multi-block 3D masking (paper section 3.2, official src/masks/multiblock3d.py). Each mask generator samples a
few spatial blocks on the h x w token grid; a block spans every time step (a "tube"), so the model cannot copy
a target from a neighbouring frame. Targets = the union of the blocks, context = its complement.
Two generators per clip:
    short-range: 8 blocks x 15% of the frame     long-range: 2 blocks x 70% of the frame
Random-tube masking (the paper's ablation) keeps a random set of spatial positions for all t.

All masks are (B, K) int64 token indices in the model's time-major order (index = t*h*w + row*w + col),
sorted ascending. Randomness is a pure function of (seed, step, rank): a resumed or re-run training draws
the same masks whatever the number of DataLoader workers (the official code mixes a shared counter with
the global RNG, so its masks cannot be replayed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

Mask = tuple[torch.Tensor, torch.Tensor]  # (context (B, N_ctx), target (B, N_tgt)) indices


@dataclass(frozen=True)
class BlockSpec:
    num_blocks: int
    scale: float  # fraction of the h x w grid one block covers
    aspect_ratio: tuple[float, float] = (0.75, 1.5)


SHORT_RANGE = BlockSpec(num_blocks=8, scale=0.15)
LONG_RANGE = BlockSpec(num_blocks=2, scale=0.7)
OFFICIAL_GENERATORS = (SHORT_RANGE, LONG_RANGE)


def rng_for(seed: int, step: int, rank: int = 0, stream: int = 0) -> np.random.Generator:
    """A generator that depends only on its arguments (no global state): the whole seeding scheme."""
    return np.random.default_rng([seed, step, rank, stream])


def block_size(spec: BlockSpec, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
    """One (bh, bw) per batch per generator, as the official sampler: keep = int(h*w*scale) tokens
    shaped by an aspect ratio drawn uniformly in the spec's range."""
    keep = int(h * w * spec.scale)
    ar = rng.uniform(*spec.aspect_ratio)
    return min(round(math.sqrt(keep * ar)), h), min(round(math.sqrt(keep / ar)), w)


def sample_block_union(spec: BlockSpec, batch: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(B, h, w) bool: True where a sample's spatial token lies in any of its blocks.

    Same block size for the whole batch, positions per sample; a sample whose blocks cover the whole
    frame (empty context) is re-drawn, as the official collator does.
    """
    bh, bw = block_size(spec, h, w, rng)
    covered = np.ones((batch, h, w), dtype=bool)
    todo = np.arange(batch)
    rows, cols = np.arange(h), np.arange(w)
    while len(todo):
        top = rng.integers(0, h - bh + 1, size=(len(todo), spec.num_blocks))  # (b, n)
        left = rng.integers(0, w - bw + 1, size=(len(todo), spec.num_blocks))  # (b, n)
        in_rows = (rows >= top[..., None]) & (rows < top[..., None] + bh)  # (b, n, h)
        in_cols = (cols >= left[..., None]) & (cols < left[..., None] + bw)  # (b, n, w)
        covered[todo] = (in_rows[..., :, None] & in_cols[..., None, :]).any(axis=1)  # (b, h, w)
        todo = todo[covered[todo].all(axis=(1, 2))]  # empty context: draw those samples again
    return covered


def equalise(keep: np.ndarray, k: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """(B, N) bool -> (B, k) sorted int64 indices of k True entries per row.

    mode "official": the first k (the lowest indices). Since indices are time-major, this drops the
        LATEST tokens of every sample with more than the batch minimum: the official collator's bias
        (official issue #50), kept by default because it shaped the published numbers.
    mode "random": a uniformly random subset of k, so no time step or region is preferred.
    """
    if mode == "official":
        order = np.argsort(~keep, axis=1, kind="stable")  # True entries first, in index order
    elif mode == "random":
        noise = rng.random(keep.shape)  # (B, N)
        order = np.argsort(np.where(keep, noise, 2.0), axis=1)  # True entries first, in random order
    else:
        raise ValueError(f"truncation must be 'official' or 'random', got {mode!r}")
    return np.sort(order[:, :k], axis=1)


class MultiBlockMasker:
    """Draws, for a batch, one (context, target) index pair per generator.

    grid: the model's token grid (t, h, w), e.g. ModelConfig.grid.
    truncation: how lists are made equal in length across the batch ("official" or "random").
    """

    def __init__(self, grid: tuple[int, int, int], generators=OFFICIAL_GENERATORS,
                 truncation: str = "official", seed: int = 0):
        if truncation not in ("official", "random"):
            raise ValueError(f"truncation must be 'official' or 'random', got {truncation!r}")
        self.grid, self.generators = tuple(grid), tuple(generators)
        self.truncation, self.seed = truncation, seed

    def __call__(self, batch: int, step: int, rank: int = 0) -> list[Mask]:
        t, h, w = self.grid
        masks = []
        for g, spec in enumerate(self.generators):
            rng = rng_for(self.seed, step, rank, stream=g)
            covered = sample_block_union(spec, batch, h, w, rng)  # (B, h, w)
            target = np.broadcast_to(covered[:, None], (batch, t, h, w)).reshape(batch, -1)  # (B, N) all t
            n_tgt, n_ctx = target.sum(1), (~target).sum(1)  # (B,)
            ctx = equalise(~target, int(n_ctx.min()), self.truncation, rng)  # (B, N_ctx)
            tgt = equalise(target, int(n_tgt.min()), self.truncation, rng)  # (B, N_tgt)
            masks.append((torch.from_numpy(ctx), torch.from_numpy(tgt)))
        return masks


class RandomTubeMasker:
    """Ablation: keep int(h*w*(1-ratio)) random spatial positions for every t; all other tokens are targets.
    Every sample has the same counts, so no truncation is needed. One generator (the predictor uses mask
    token 0)."""

    def __init__(self, grid: tuple[int, int, int], ratio: float = 0.9, seed: int = 0):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"random-tube ratio must lie in (0, 1), got {ratio}")
        self.grid, self.ratio, self.seed = tuple(grid), ratio, seed
        _, h, w = self.grid
        if int(h * w * (1 - ratio)) < 1:
            raise ValueError(f"ratio {ratio} leaves no context token on a {h}x{w} grid")

    def __call__(self, batch: int, step: int, rank: int = 0) -> list[Mask]:
        t, h, w = self.grid
        rng = rng_for(self.seed, step, rank)
        n_keep = int(h * w * (1 - self.ratio))
        keep2d = np.argsort(rng.random((batch, h * w)), axis=1)[:, :n_keep]  # (B, n_keep) spatial indices
        keep = np.zeros((batch, h * w), dtype=bool)
        np.put_along_axis(keep, keep2d, True, axis=1)
        keep = np.broadcast_to(keep[:, None], (batch, t, h * w)).reshape(batch, -1)  # (B, N)
        ctx = np.nonzero(keep)[1].reshape(batch, -1)  # (B, N_ctx), sorted per row
        tgt = np.nonzero(~keep)[1].reshape(batch, -1)  # (B, N_tgt)
        return [(torch.from_numpy(ctx), torch.from_numpy(tgt))]


class MaskCollator:
    """DataLoader collate_fn that stacks samples and draws the step's masks inside the worker.

    Samples are (clip, label, step, skipped) tuples: the sampler tells each sample which step it belongs to
    (see data.StepSampler), so masks depend on (seed, step, rank) only, never on worker scheduling;
    `skipped` lists the messages of the unreadable videos skipped to produce the sample.
    Returns {"clips": (B, 3, T, H, W), "labels": (B,), "masks": [(ctx, tgt), ...], "step": int,
    "skipped": [message, ...]}.
    """

    def __init__(self, masker, rank: int = 0):
        self.masker, self.rank = masker, rank

    def __call__(self, samples) -> dict:
        steps = {s[2] for s in samples}
        if len(steps) != 1:
            raise ValueError(f"a batch must come from one step, got steps {sorted(steps)}")
        step = steps.pop()
        return {"clips": torch.stack([s[0] for s in samples]),  # (B, 3, T, H, W)
                "labels": torch.as_tensor([s[1] for s in samples]),  # (B,)
                "masks": self.masker(len(samples), step, self.rank),
                "step": step,
                "skipped": [m for s in samples for m in s[3]]}
