"""Train V-JEPA, from a laptop CPU to many GPUs.

    python train.py --size tiny                                  # laptop: built-in synthetic videos, ~6 min
    python train.py --size vitl16 --data lists/k400_train.txt    # the paper's recipe on one GPU
    torchrun --nproc_per_node=8 train.py --size vith16 --data lists/videomix2m.txt
    python train.py --size vitl16 --benchmark                    # step time, clips/s, TFLOP/s, peak memory

One step (paper section 3, official app/vjepa/train.py): masks for the batch (masking.py, drawn in the
DataLoader workers) -> `VJEPA.forward` = targets from the EMA encoder on the full clip, context encoder +
predictor per mask generator, L1 loss (vjepa.py) -> AdamW step with the scheduled lr / weight decay -> EMA
update of the target encoder with the scheduled momentum. Schedules are pure functions of the step, masks and
data are pure functions of (seed, step, rank): resuming sets the step and replays nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import bench
import cli
import data
import masking
import runs
from cli import COUNT, FOLDER, NON_NEGATIVE, POSITIVE, UNIT, check_config, one_of
from vjepa import PRESETS, VJEPA, ModelConfig


@dataclass
class TrainConfig:
    # What to train. --size also sets the other defaults: its recipe in RECIPES
    size: str = "tiny"  # model preset (vjepa.PRESETS)
    data: str = "synthetic"  # "synthetic" (built in) or a video list file in the official format
    out: str = "runs/tiny"  # run folder: ckpt.pt, log.jsonl, loss.png
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # clips per process (GPU); global batch = batch_size x world size
    # Schedules (official configs/pretrain/vitl16.yaml). The official recipe stretches every schedule over
    # horizon_scale x steps (1.25: 112,500 for 90,000 steps), so training stops before the cosine reaches its
    # final values.
    lr: float = 1e-3  # peak learning rate, reached at the end of the warmup, then a cosine to --final-lr
    start_lr: float = 2e-4  # learning rate of the first step (linear warmup to --lr)
    final_lr: float = 1e-6  # learning rate at the horizon
    warmup: int = 40  # warmup steps
    weight_decay: float = 0.04  # AdamW weight decay of the first step (a cosine to --final-weight-decay)
    final_weight_decay: float = 0.4  # weight decay at the horizon
    ema_start: float = 0.996  # EMA momentum of the target encoder at the first step (linear to --ema-end)
    ema_end: float = 0.996  # EMA momentum at the horizon (laptop: constant, see RECIPES)
    horizon_scale: float = 1.25  # the schedules span horizon_scale x steps
    clip_grad: float = 10.0  # max grad norm, encoder and predictor separately, after the warmup only; 0: off
    # Objective and masks. The paper's method and its ablations (sections 4.1 and 4.3)
    target: str = "features"  # "features" (V-JEPA) or "pixels" (the pixel-reconstruction baseline, MSE)
    masking: str = "multiblock"  # "multiblock" (the paper's) or "tube" (random-tube ablation)
    tube_ratio: float = 0.9  # fraction of the spatial positions the random tubes hide
    truncation: str = "official"  # "official" (drop the latest tokens) or "random" (masking.equalise)
    # Data
    synthetic_size: int = 100_000  # distinct synthetic videos per epoch
    scene: str = "clean"  # synthetic scene (data.SCENES): "clean", "cluttered" or "fast" (2.5x the motion)
    frame_step: int = 4  # real video: 16 frames at stride 4 cover 64 frames
    workers: int = 0  # DataLoader worker processes per GPU (real video wants several: see README)
    max_bad_fraction: float = 0.05  # stop when more than this fraction of videos fail to decode
    # Run
    seed: int = 0  # seeds the weights, the masks and the data
    log_every: int = 10  # steps between log lines
    save_every: int = 100  # steps between checkpoints
    resume: bool = False  # continue from <out>/ckpt.pt
    allow_config_change: bool = False  # --resume with settings other than the checkpoint's (runs.py)
    device: str = "auto"  # auto: cuda, else Apple's mps, else cpu; or cpu, cuda, cuda:N, mps
    # Speed and memory
    compile: bool = False  # torch.compile the model
    checkpoint_act: bool = False  # activation checkpointing: less memory, ~30% more compute
    benchmark: bool = False  # time the training step on the device instead of training (bench.py)
    benchmark_steps: int = 20  # steps timed by --benchmark


# The allowed values of each field, checked before anything is built or read. data and device are checked
# where they are used (data.VideoList names the list file; setup_distributed the device).
RULES = {
    "size": one_of(*PRESETS), "out": FOLDER,
    "steps": COUNT, "batch_size": COUNT, "lr": POSITIVE, "start_lr": NON_NEGATIVE, "final_lr": NON_NEGATIVE,
    "warmup": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "final_weight_decay": NON_NEGATIVE,
    "ema_start": UNIT, "ema_end": UNIT,
    # below 1 the schedules would end before the training does, and the EMA momentum pass --ema-end
    "horizon_scale": (lambda v: 1 <= v < math.inf, ">= 1"), "clip_grad": NON_NEGATIVE,
    "target": one_of("features", "pixels"), "masking": one_of("multiblock", "tube"),
    "tube_ratio": (lambda v: 0 < v < 1, "in (0, 1)"), "truncation": one_of("official", "random"),
    "synthetic_size": COUNT, "scene": one_of(*data.SCENES), "frame_step": COUNT, "workers": NON_NEGATIVE,
    "max_bad_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"), "seed": NON_NEGATIVE, "log_every": COUNT,
    "save_every": COUNT, "benchmark_steps": COUNT,
}


PAPER = {"steps": 90_000, "batch_size": 24, "lr": 6.25e-4, "start_lr": 2e-4, "warmup": 12_000, "workers": 8,
         "ema_start": 0.998, "ema_end": 1.0}
# The laptop recipe is TrainConfig's defaults. Where it leaves the paper, and why (README, "Laptop run"): the
# clean synthetic scene; 1,000 steps; a constant EMA momentum 0.996, whose time constant (250 steps) is a
# quarter of the run: the paper's 0.998 -> 1.0 over 1.25 x 1,000 steps would leave the target encoder, which
# the probe reads, mostly at its random initialisation.
RECIPES = {  # per-size defaults; every field can still be overridden on the command line
    "tiny": {},
    "vitb16": PAPER,
    "vitl16": PAPER,
    "vith16": PAPER,
    "vith16_384": {**PAPER, "batch_size": 2400 // 128},  # paper: global batch 2400 on 128 GPUs (18.75/GPU)
}


def recipe(size: str, **overrides) -> TrainConfig:
    """The default config of a model size, e.g. recipe("vitl16", steps=1000)."""
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(PRESETS)}")
    return TrainConfig(**{"size": size, "out": f"runs/{size}", **RECIPES[size], **overrides})


# ----------------------------------------------------------------------------------------------------
# Schedules: pure functions of the optimizer step s (counted from 0). They reproduce the official values
# (reference/official_schedules_vitl16.json): the official schedulers are stepped once before
# each optimizer step, so step s uses their value at count s + 1.


def horizon(cfg: TrainConfig) -> int:
    return int(cfg.horizon_scale * cfg.steps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    s = step + 1
    if s < cfg.warmup:  # linear warmup start_lr -> lr
        return cfg.start_lr + s / cfg.warmup * (cfg.lr - cfg.start_lr)
    progress = (s - cfg.warmup) / max(1, horizon(cfg) - cfg.warmup)  # cosine lr -> final_lr
    cosine = cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return max(cfg.final_lr, cosine)


def wd_at(step: int, cfg: TrainConfig) -> float:
    progress = (step + 1) / horizon(cfg)  # cosine weight_decay -> final_weight_decay (it rises)
    start, end = cfg.weight_decay, cfg.final_weight_decay
    wd = end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
    return min(wd, end) if end >= start else max(wd, end)


def ema_at(step: int, cfg: TrainConfig) -> float:
    return cfg.ema_start + step * (cfg.ema_end - cfg.ema_start) / horizon(cfg)  # linear, used after step s


# ----------------------------------------------------------------------------------------------------
# Model, optimizer, data


def model_config(cfg: TrainConfig) -> ModelConfig:
    mc = dataclasses.replace(PRESETS[cfg.size], target=cfg.target)
    if cfg.masking == "tube":  # one mask generator, hence one mask token
        mc = dataclasses.replace(mc, num_mask_tokens=1)
    return mc


def make_masker(cfg: TrainConfig, mc: ModelConfig):
    if cfg.masking == "multiblock":
        return masking.MultiBlockMasker(mc.grid, truncation=cfg.truncation, seed=cfg.seed)
    if cfg.masking == "tube":
        return masking.RandomTubeMasker(mc.grid, ratio=cfg.tube_ratio, seed=cfg.seed)
    raise ValueError(f"masking must be 'multiblock' or 'tube', got {cfg.masking!r}")


def make_optimizer(model: VJEPA, device: torch.device) -> torch.optim.AdamW:
    """AdamW over encoder + predictor. Biases and 1-D parameters (norms) get no weight decay; everything
    else does, the mask tokens included (official behaviour). wd_at() sets the decayed group each step."""
    params = [p for p in [*model.encoder.parameters(), *model.predictor.parameters()] if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "decay": True}, {"params": no_decay, "weight_decay": 0.0, "decay": False}]
    fused = device.type == "cuda"  # one kernel for all parameters; foreach (multi-tensor) on CPU
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=fused, foreach=not fused)


def make_dataset(cfg: TrainConfig, mc: ModelConfig):
    if cfg.data == "synthetic":
        return data.SyntheticVideos(cfg.synthetic_size, frames=mc.frames, img_size=mc.img_size, seed=cfg.seed,
                                    scene=cfg.scene)
    return data.VideoList(cfg.data, frames=mc.frames, frame_step=cfg.frame_step, img_size=mc.img_size)


# ----------------------------------------------------------------------------------------------------
# One training step: the whole method, with vjepa.py (the model and the loss) and masking.py (the masks)


@dataclass
class Setup:
    """What every step uses, built once by build()."""
    model: VJEPA  # the model itself: its encoders, predictor and EMA update
    forward: torch.nn.Module  # what computes the loss: the model, or its DDP / torch.compile wrapper
    opt: torch.optim.AdamW
    amp: contextlib.AbstractContextManager  # autocast to bf16 / fp16, or a disabled one (fp32)
    scaler: torch.amp.GradScaler  # fp16 loss scaling; a pass-through otherwise
    device: torch.device


def train_step(s: Setup, batch: dict, step: int, cfg: TrainConfig) -> dict:
    """One V-JEPA step (paper section 3; official app/vjepa/train.py). Returns the forward's tensors (loss,
    pred_std) and this step's lr, wd and EMA momentum; nothing here waits for the device."""
    # 1. The batch: clips, and the masks drawn for this step in the DataLoader workers (masking.py)
    clips = batch["clips"].to(s.device, non_blocking=True)  # (B, 3, T, H, W)
    masks = [(ctx.to(s.device, non_blocking=True), tgt.to(s.device, non_blocking=True))
             for ctx, tgt in batch["masks"]]  # [((B, N_ctx), (B, N_tgt))] per mask generator
    # 2-4. Targets from the EMA encoder on the full clip, context encoder + predictor for each mask
    #      generator, L1 loss (vjepa.VJEPA.forward)
    with s.amp:
        out = s.forward(clips, masks)
    # 5. Backward; clip the gradient norm of the encoder and of the predictor, after the warmup
    s.opt.zero_grad(set_to_none=True)
    s.scaler.scale(out["loss"]).backward()  # fp16 only: the loss is scaled so small gradients survive
    if step >= cfg.warmup and cfg.clip_grad > 0:
        s.scaler.unscale_(s.opt)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(s.model.encoder.parameters(), cfg.clip_grad)
        torch.nn.utils.clip_grad_norm_(s.model.predictor.parameters(), cfg.clip_grad)
    # 6. AdamW with this step's learning rate and weight decay (none on biases and norms: make_optimizer)
    lr, wd = lr_at(step, cfg), wd_at(step, cfg)
    for g in s.opt.param_groups:
        g["lr"] = lr
        g["weight_decay"] = wd if g["decay"] else 0.0
    s.scaler.step(s.opt)  # fp16: skips the step when a gradient overflowed
    s.scaler.update()
    # 7. EMA update of the target encoder: theta_bar <- m * theta_bar + (1 - m) * theta
    momentum = ema_at(step, cfg)
    s.model.update_target(momentum)
    return out | {"lr": lr, "wd": wd, "ema": momentum}


def build(cfg: TrainConfig, mc: ModelConfig, device: torch.device, world: int) -> Setup:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = VJEPA(mc).to(device)
    model.encoder.grad_checkpointing = cfg.checkpoint_act  # the context encoder holds most activations
    precision = bench.precision_of(device)  # bf16, fp16 (with loss scaling) or fp32: see bench.py
    forward = model
    if world > 1:  # averages the gradients across processes during backward
        forward = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    if cfg.compile:
        forward = torch.compile(forward, dynamic=True)  # token counts vary from step to step: dynamic shapes
    return Setup(model, forward, make_optimizer(model, device), bench.autocast(device, precision),
                 torch.amp.GradScaler(device.type, enabled=precision == "fp16"), device)


# ----------------------------------------------------------------------------------------------------
# Training: the loop around train_step, with logging, checkpoints and stops


def train(cfg: TrainConfig, on_log=None) -> dict:
    """Train (or benchmark) as cfg says. Returns {"losses": [...], "step": steps done, "out": run folder}.

    on_log(row): called with each log row (a dict, as in log.jsonl), e.g. for a live plot in a notebook.
    """
    # Bad options, a bad data list, a checkpoint that cannot be continued, a folder that holds another run:
    # each fails here, before the model is built.
    check_config(cfg, RULES)
    rank, world, device = setup_distributed(cfg)
    say = print if rank == 0 else (lambda *a, **k: None)
    mc = model_config(cfg)
    masker = make_masker(cfg, mc)
    if cfg.benchmark:
        return bench.benchmark(cfg, mc, masker, device, world, say)
    dataset = make_dataset(cfg, mc)
    ckpt_path = Path(cfg.out) / "ckpt.pt"
    ckpt = runs.read_for_resume(ckpt_path, cfg, mc) if cfg.resume else None
    if rank == 0 and not cfg.resume and ckpt_path.exists():
        raise ValueError(f"{ckpt_path} exists: use --resume to continue that run, or choose another --out "
                         f"(or delete {cfg.out} to start it over)")
    remaining = cfg.steps - (ckpt["step"] if ckpt else 0)
    if device.type == "cpu" and (warning := bench.cpu_warning(cfg, mc, masker, remaining)):
        say(warning, file=sys.stderr)
    with runs.run_folder(Path(cfg.out)) if rank == 0 else contextlib.nullcontext():
        return fit(cfg, mc, masker, dataset, ckpt, rank, world, device, on_log)


def describe(cfg: TrainConfig, mc: ModelConfig, model: VJEPA, world: int, device: torch.device, say):
    n = model.num_params()
    say(f"config: {json.dumps(asdict(cfg))}")
    say(f"model {cfg.size}: {json.dumps(asdict(mc))}")
    say(f"parameters: encoder {n['encoder']:,}  predictor {n['predictor']:,} | tokens per clip "
        f"{mc.num_tokens} (grid {'x'.join(map(str, mc.grid))}) | global batch {cfg.batch_size * world} = "
        f"{cfg.batch_size} x {world} process(es) | "
        f"{bench.device_line(device, cfg.device, bench.precision_of(device))}")


def fit(cfg, mc, masker, dataset, ckpt, rank, world, device, on_log) -> dict:
    main_proc = rank == 0
    say = print if main_proc else (lambda *a, **k: None)
    s = build(cfg, mc, device, world)
    start, extra = 0, {"bad_clips": 0}
    if ckpt is not None:
        s.model.load_state_dict(ckpt["model"], strict=True)
        s.opt.load_state_dict(ckpt["optimizer"])
        start, extra = ckpt["step"], {"bad_clips": ckpt.get("bad_clips", 0)}
        if ckpt.get("scaler") and s.scaler.is_enabled():  # fp16: continue with the same loss scale
            s.scaler.load_state_dict(ckpt["scaler"])
    describe(cfg, mc, s.model, world, device, say)
    loader = data.make_train_loader(dataset, masker, cfg.batch_size, start, cfg.steps, seed=cfg.seed,
                                    rank=rank, world_size=world, workers=cfg.workers)
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"
    saved = start if ckpt is not None else None  # the step of the checkpoint on disk
    log = runs.open_log(out / "log.jsonl", saved) if main_proc else None
    losses, pending = [], []  # pending: (step, loss tensor) since the last log line, checked in one sync
    t_log, clips_since = time.perf_counter(), 0
    peak = bench.peak_flops(device)
    done = start
    stop, handlers = runs.on_stop_signals()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not main_proc, dynamic_ncols=True)
    try:
        for batch in loader:
            step = batch["step"]
            res = train_step(s, batch, step, cfg)
            # unreadable videos: named above the bar, counted over the whole run against --max-bad-fraction
            for message in batch["skipped"]:
                tqdm.write(f"step {step}: skipped {message}", file=sys.stderr)
            extra["bad_clips"] += len(batch["skipped"])
            pending.append((step, res["loss"].detach()))
            clips_since += len(batch["clips"]) * world
            bar.update(1)
            done = step + 1
            data.check_bad_fraction(extra["bad_clips"], done * cfg.batch_size, cfg.max_bad_fraction)
            # timing and logging; a stop signal ends the run after this step, logged and saved
            at_line = done % cfg.log_every == 0 or done % cfg.save_every == 0 or done == cfg.steps
            stopping = runs.agree_to_stop(stop, at_line, world, device)
            if at_line or stopping:
                vals = runs.check_finite(pending, ckpt_path)  # one host sync per log line
                losses += vals
                pending = []
                dt = time.perf_counter() - t_log
                masks = batch["masks"]
                row = {"step": done, "loss": sum(vals) / len(vals), "lr": res["lr"], "wd": res["wd"],
                       "ema": res["ema"], "ctx": [c.shape[1] for c, _ in masks],
                       "tgt": [t.shape[1] for _, t in masks], "clips_per_s": clips_since / dt,
                       "bad_clips": extra["bad_clips"], "pred_std": res["pred_std"].item(),
                       **collapse_monitor(s.model, batch["clips"].to(device), s.amp)}
                if device.type == "cuda":
                    row["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if peak:
                        flops = bench.model_flops(mc, row["ctx"], row["tgt"], cfg.batch_size)
                        row["mfu"] = flops * (len(vals) / dt) / peak
                if main_proc:
                    bar.write(runs.format_row(row))
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    if on_log:
                        on_log(row)
                t_log, clips_since = time.perf_counter(), 0
            if main_proc and (done % cfg.save_every == 0 or done == cfg.steps or stopping):
                state = extra | {"scaler": s.scaler.state_dict()}  # the fp16 loss scale (empty otherwise)
                runs.save_checkpoint(ckpt_path, s.model, s.opt, cfg, done, state, saved)
                saved = done
            if stopping:  # Ctrl-C or SIGTERM: the step in flight has finished; keep what it taught
                say(f"\nstopped by {stop.name}: saved {ckpt_path} at step {done} of {cfg.steps}; continue "
                    "with --resume")
                break
    finally:
        bar.close()
        if log:
            log.close()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if extra["bad_clips"]:
        say(f"skipped {extra['bad_clips']} unreadable video(s) during training (named above)")
    if main_proc:
        runs.plot_losses(out, mc.dim)
        say(f"done: {ckpt_path} (step {done}), log {out / 'log.jsonl'}, curve {out / 'loss.png'}")
    if world > 1:
        dist.destroy_process_group()
    return {"losses": losses, "step": done, "out": str(out)}


# ----------------------------------------------------------------------------------------------------
# Distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK. Without them nothing touches torch.distributed.


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    device = bench.pick_device(cfg.device)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "mps":
        raise ValueError("torchrun needs CUDA GPUs (nccl) or CPUs (gloo); use --device cpu on a Mac")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ----------------------------------------------------------------------------------------------------
# The collapse monitor, in every log row


@torch.no_grad()
def collapse_monitor(model: VJEPA, clips: torch.Tensor, amp) -> dict:
    """What a student watches to see collapse coming, on the current batch (one extra target forward):
    tgt_rank  effective rank of the targets (layer-normed target-encoder features, centred over all tokens):
              exp(entropy) of their normalised singular values; at most D, falls when features collapse
    tgt_lag   ||theta_bar - theta|| / ||theta|| over the encoder weights: how far the EMA target trails the
              context encoder (near 0: it follows; large and growing: the target is still mostly its init)"""
    with amp:
        h = model.target_encoder(clips)  # (B, N, D)
    h = F.layer_norm(h.float(), (h.shape[-1],)).flatten(0, 1)  # (B*N, D), as the loss sees them
    tgt, src = list(model.target_encoder.parameters()), list(model.encoder.parameters())
    lag = torch.stack(torch._foreach_norm(torch._foreach_sub(tgt, src))).norm()
    lag = lag / torch.stack(torch._foreach_norm(src)).norm()
    rows = h[:: max(1, len(h) // 4096)]  # at most ~4,096 tokens: a cheap float64 rank on any device
    return {"tgt_rank": effective_rank(rows), "tgt_lag": lag.item()}


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of x (M, D) centred over its rows: D for white
    features, 1 when every row lies on one line or all rows are equal."""
    x = x.double()
    x = x - x.mean(0)
    s = torch.linalg.eigvalsh(x.T @ x).clamp_min(0).sqrt()  # singular values of x, (D,)
    p = s / s.sum().clamp_min(1e-300)  # all rows equal: p = 0, rank 1
    return torch.exp(-(p * p.clamp_min(1e-30).log()).sum()).item()


# ----------------------------------------------------------------------------------------------------
# Command line: generated from TrainConfig's fields (cli.py); --size picks the defaults of its recipe.


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--size", default="tiny", choices=list(PRESETS))
    size = pre.parse_known_args(argv)[0].size
    return cli.parse(TrainConfig, argv, __doc__, defaults=asdict(recipe(size)),
                     choices={"size": list(PRESETS)})


if __name__ == "__main__":
    try:
        train(parse_args())
    except KeyboardInterrupt:  # a second Ctrl-C
        sys.exit(130)
    except (ValueError, OSError, FloatingPointError) as e:  # bad input, full disk, divergence: no traceback
        sys.exit(f"error: {e}")
