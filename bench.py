"""The hardware side of training: which device and precision a run uses, what one step costs in FLOPs, how
much of the card it uses (model-FLOPs utilisation, MFU), and the benchmark that times the training step.

    python train.py --size vitl16 --benchmark --batch-size 24             # eager
    python train.py --size vitl16 --benchmark --batch-size 24 --compile   # torch.compile

train.py and probe.py choose the device and precision here; the benchmark runs train.train_step, the step
that training runs (schedules, clipping, AdamW, EMA update), on synthetic clips already on the device.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace

import torch

from vjepa import ModelConfig

# ----------------------------------------------------------------------------------------------------
# Device and precision. Mixed precision follows the card: bf16 autocast where the card has bf16 tensor cores
# (CUDA compute capability >= 8.0: Ampere and later), with no GradScaler since bf16 has fp32's range; fp16
# autocast plus a GradScaler on older cards (Colab's T4 is 7.5: bf16 would be emulated there, fp16 runs on
# its tensor cores but needs loss scaling); fp32 on CPU and on Apple's MPS (the code paths checked there so
# far are fp32 ones).


def pick_device(name: str) -> torch.device:
    """'auto': CUDA, else MPS, else CPU. An explicit device that this machine lacks raises ValueError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device string at all
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available to this PyTorch ({torch.__version__}); "
                         "use --device auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS is not available on this machine; "
                         "use --device auto or cpu")
    return device


def precision_for(device_type: str, capability: tuple[int, int] | None = None) -> str:
    """'bf16', 'fp16' or 'fp32' for a device type and, on CUDA, its compute capability (major, minor)."""
    if device_type != "cuda":
        return "fp32"
    return "bf16" if capability >= (8, 0) else "fp16"


def precision_of(device: torch.device) -> str:
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return precision_for(device.type, cap)


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision; fp32 gives a disabled one, so every path reads the same."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast("cuda" if device.type == "cuda" else "cpu", dtype=dtype, enabled=dtype is not None)


def device_line(device: torch.device, requested: str, precision: str) -> str:
    """The start-of-run line's device part, e.g. 'device cuda (auto), precision bf16 autocast'."""
    name = f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    how = "auto" if requested == "auto" else "as asked"
    if requested == "auto" and device.type == "cpu":
        how = "auto: no CUDA GPU or Apple MPS found"
    mode = {"bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler (no native bf16 on this card)",
            "fp32": "fp32"}[precision]
    return f"device {device}{name} ({how}), precision {mode}"


# ----------------------------------------------------------------------------------------------------
# FLOPs and utilisation


def model_flops(mc: ModelConfig, n_ctx: list[int], n_tgt: list[int], batch: int,
                attention: bool = True) -> int:
    """Matmul FLOPs of one training step (forward + backward), counted analytically: a block on n tokens of
    width d costs 24*n*d^2 (qkv, proj, mlp) + 4*n^2*d (attention) forward; backward costs 2x forward.
    The target encoder runs forward only; the patch embedding needs no input gradient (1x backward).
    Equal to torch's FlopCounterMode count (tests/test_train.py)."""
    def blocks(n, d, depth):
        return depth * (24 * n * d * d + 4 * n * n * d * attention)

    embed = 2 * mc.num_tokens * (3 * mc.tubelet * mc.patch**2) * mc.dim  # Conv3d as a matmul
    D, Dp = mc.dim, mc.pred_dim
    out = D if mc.target == "features" else mc.pixels_per_token
    total = 2 * embed  # context tokens are embedded once: forward + weight gradient
    if mc.target == "features":
        total += blocks(mc.num_tokens, D, mc.depth) + embed  # target encoder, forward only
    for c, t in zip(n_ctx, n_tgt):
        # context encoder, then predictor (embed, blocks, projection): forward + backward = 3x forward
        predictor = 2 * c * D * Dp + blocks(c + t, Dp, mc.pred_depth) + 2 * t * Dp * out
        total += 3 * (blocks(c, D, mc.depth) + predictor)
    return batch * total


CPU_FLOPS = 67e9  # the tiny model's step on the 2-core development CPU: 0.043 TFLOP in 0.64 s (README)


def cpu_warning(cfg, mc: ModelConfig, masker, steps: int) -> str | None:
    """What `steps` steps of this model mean on a CPU, when that is more than a day."""
    masks = masker(cfg.batch_size, 0)
    flops = model_flops(mc, [c.shape[1] for c, _ in masks], [t.shape[1] for _, t in masks], cfg.batch_size)
    days = steps * flops / CPU_FLOPS / 86400
    if days > 1:
        return (f"warning: {steps:,} steps of --size {cfg.size} on a CPU, {flops / 1e12:.1f} TFLOP each: "
                f"about {days:,.0f} days at the {CPU_FLOPS / 1e9:.0f} GFLOP/s of a 2-core laptop (a large "
                "server CPU may be ~10x faster). Train it on a GPU, or use --size tiny on a CPU")
    return None


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the card (datasheet), for model-FLOPs utilisation; None when unknown or on CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)



# ----------------------------------------------------------------------------------------------------
# The benchmark: the training step on synthetic clips already on the device; no data loading, no saving.


def benchmark(cfg, mc: ModelConfig, masker, device: torch.device, world: int, say) -> dict:
    """Time cfg.benchmark_steps calls of train.train_step after a few warm-up calls. The steps are numbered
    from the end of the warmup, so the gradient clipping runs as in most of training."""
    from torch.utils.flop_counter import FlopCounterMode

    import train  # here, not at the top: train.py imports this file for the device and FLOP helpers

    setup = train.build(cfg, mc, device, world)
    train.describe(cfg, mc, setup.model, world, device, say)
    clips = torch.randn(cfg.batch_size, 3, mc.frames, mc.img_size, mc.img_size, device=device)
    batches = [{"clips": clips, "masks": [(c.to(device), t.to(device)) for c, t in masker(cfg.batch_size, s)]}
               for s in range(8)]  # 8 mask draws: the token counts vary as in training

    def steps(first: int, n: int, parts=setup):
        for s in range(first, first + n):
            train.train_step(parts, batches[s % len(batches)], cfg.warmup + s, cfg)

    with FlopCounterMode(display=False) as counter:  # one eager step (torch.compile hides the ops)
        steps(0, 1, replace(setup, forward=setup.model))
    flops = counter.get_total_flops()
    warm = 3 if not cfg.compile else 10
    steps(1, warm)  # warm up: kernels chosen, compiled graphs cached
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    steps(1 + warm, cfg.benchmark_steps)
    sync()
    dt = (time.perf_counter() - t0) / cfg.benchmark_steps
    res = {"size": cfg.size, "batch": cfg.batch_size, "compile": cfg.compile, "device": str(device),
           "ms_per_step": 1000 * dt, "clips_per_s": cfg.batch_size / dt, "tflop_per_step": flops / 1e12,
           "tflops": flops / dt / 1e12, "torch": torch.__version__}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if peak_flops(device):
            res["peak_fraction"] = flops / dt / peak_flops(device)
    say("benchmark: " + json.dumps(res))
    return res
