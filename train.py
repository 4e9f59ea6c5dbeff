"""Train V-JEPA, from a laptop CPU to many GPUs.

    python train.py --size tiny                                  # laptop: built-in synthetic videos, ~5 min
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
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

try:
    import fcntl  # POSIX file locks; elsewhere (Windows) run folders are not locked
except ImportError:
    fcntl = None

import data
import masking
import vjepa
from vjepa import PRESETS, VJEPA, ModelConfig


@dataclass
class TrainConfig:
    size: str = "tiny"  # model preset (vjepa.PRESETS)
    data: str = "synthetic"  # "synthetic" (built in) or a video list file in the official format
    out: str = "runs/tiny"  # run folder: ckpt.pt, log.jsonl, loss.png
    steps: int = 400
    batch_size: int = 16  # per process (GPU); global batch = batch_size x world size
    # Schedules (official configs/pretrain/vitl16.yaml). The official recipe stretches every schedule over
    # horizon_scale x steps (1.25: 112,500 for 90,000 steps), so training stops before the cosine reaches its
    # final values.
    lr: float = 1e-3
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup: int = 40
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema_start: float = 0.998
    ema_end: float = 1.0
    horizon_scale: float = 1.25
    clip_grad: float = 10.0  # max grad norm, encoder and predictor separately, after the warmup only
    # Objective: "features" (V-JEPA) or "pixels" (the paper's pixel-reconstruction baseline, MSE)
    target: str = "features"
    # Masks
    masking: str = "multiblock"  # "multiblock" (the paper's) or "tube" (random-tube ablation)
    tube_ratio: float = 0.9
    truncation: str = "official"  # "official" (drop the latest tokens) or "random" (masking.equalise)
    # Data
    synthetic_size: int = 100_000  # distinct synthetic videos per epoch
    scene: str = "clean"  # synthetic scene (data.SCENES): "clean" or "cluttered"
    frame_step: int = 4  # real video: 16 frames at stride 4 cover 64 frames
    workers: int = 0  # DataLoader worker processes per GPU (real video wants several: see README)
    max_bad_fraction: float = 0.05  # stop when more than this fraction of videos fail to decode
    # Run
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    resume: bool = False  # continue from <out>/ckpt.pt
    compile: bool = False  # torch.compile the model
    checkpoint_act: bool = False  # activation checkpointing: less memory, ~30% more compute
    device: str = "auto"  # auto: cuda, else Apple's mps, else cpu; or cpu, cuda, cuda:N, mps
    benchmark: bool = False  # time synthetic steps on the device instead of training (no data, no saving)
    benchmark_steps: int = 20
    allow_config_change: bool = False  # --resume with settings other than the checkpoint's (read_for_resume)


def one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(map(repr, choices))


COUNT = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: 0 <= v < math.inf, ">= 0")
POSITIVE = (lambda v: 0 < v < math.inf, "> 0")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
FOLDER = (lambda v: not Path(v).is_file(), "a folder, not an existing file")


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
    "synthetic_size": COUNT, "frame_step": COUNT, "workers": NON_NEGATIVE,
    "max_bad_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"), "seed": NON_NEGATIVE, "log_every": COUNT,
    "save_every": COUNT, "benchmark_steps": COUNT,
}


def check_config(cfg, rules: dict):
    """Raise ValueError naming the first flag whose value breaks its rule, and the allowed range."""
    for name, (test, allowed) in rules.items():
        value = getattr(cfg, name)
        try:
            ok = test(value)
        except TypeError:  # a string where a number belongs (from Python, not the command line)
            ok = False
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {allowed}, got {value!r}")


PAPER = {"steps": 90_000, "batch_size": 24, "lr": 6.25e-4, "start_lr": 2e-4, "warmup": 12_000, "workers": 8}
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
    return data.VideoList(cfg.data, frames=mc.frames, frame_step=cfg.frame_step, img_size=mc.img_size,
                          train=True)


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


def cpu_warning(cfg: TrainConfig, mc: ModelConfig, masker, steps: int) -> str | None:
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
# Checkpoints: self-describing (both configs inside), written atomically, loaded with weights_only=True.


def save_checkpoint(path: Path, model: VJEPA, opt, cfg: TrainConfig, step: int, extra: dict,
                    previous: int | None = None):
    """Atomically: a kill while writing leaves the previous checkpoint (from step `previous`) intact; a failed
    write (a full disk) also removes its partial file and says so in one line."""
    state = {"model_config": asdict(model.cfg), "train_config": asdict(cfg), "step": step,
             "model": model.state_dict(), "optimizer": opt.state_dict(), **extra}
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")  # one per process: two writers never share it
    try:
        with open(tmp, "wb") as f:  # a Python file, so that a failed write keeps its OSError (the errno)
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = e  # torch wraps the OSError of a failed write into a RuntimeError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        kept = f"the previous checkpoint (step {previous}) is intact" if previous is not None else \
            "no checkpoint of this run was saved before"
        raise OSError(f"could not write {path}: {cause.strerror or cause}; {kept}") from None


# Fields that cannot change what a run computes: they may differ between a checkpoint and its --resume.
HARMLESS = {"out", "resume", "workers", "log_every", "save_every", "device", "compile", "checkpoint_act",
            "benchmark", "benchmark_steps", "max_bad_fraction", "allow_config_change"}


def read_for_resume(path: Path, cfg: TrainConfig, mc: ModelConfig) -> dict:
    """The checkpoint to continue, checked before anything is built; raises (never restarts from scratch)
    when it cannot be continued as asked. Any other setting (seed, batch, data, schedule, --steps, which sets
    the schedules' horizon) would make the resumed run differ from the run the checkpoint belongs to."""
    ckpt = vjepa.read_checkpoint(path)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "optimizer" not in ckpt:
        raise ValueError(f"{path} is not a training checkpoint of this project (no model_config/optimizer)")
    if vjepa.model_config_of(ckpt, path) != mc:
        raise ValueError(f"{path} holds model {ckpt['model_config']}, but --size {cfg.size} builds "
                         f"{asdict(mc)}")
    stored = ckpt.get("train_config", {})
    changed = [f"--{k.replace('_', '-')} {stored[k]} -> {v}" for k, v in asdict(cfg).items()
               if k in stored and k not in HARMLESS and stored[k] != v]
    if changed and not cfg.allow_config_change:
        raise ValueError(f"{path} was trained with other settings ({', '.join(changed)}): resume with its "
                         "settings, or pass --allow-config-change to continue with the new ones")
    if changed:
        print(f"resuming with changed settings: {', '.join(changed)}")
    if ckpt["step"] > cfg.steps:
        raise ValueError(f"{path} is at step {ckpt['step']}, beyond --steps {cfg.steps}")
    return ckpt


@contextlib.contextmanager
def run_folder(out: Path):
    """One training process at a time per run folder: an OS lock on <out>/.lock, released when the run ends
    and by the kernel when the process is killed."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"another training process is using {out} (it holds {out / '.lock'}): wait "
                                 "for it to end, or choose another --out") from None
        for tmp in out.glob("ckpt.pt.tmp.*"):  # a killed run's partial write: no one else writes here now
            tmp.unlink()
        yield


def open_log(path: Path, resume_step: int | None):
    """log.jsonl holds one row per step: a fresh run starts it anew, a resumed one keeps the rows up to its
    checkpoint's step (a killed run logs past its last save; a kill can cut the last line)."""
    if resume_step is None:
        return path.open("w")

    def step_of(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf
    rows = path.read_text().splitlines() if path.exists() else []
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text("".join(r + "\n" for r in rows if step_of(r) <= resume_step))
    os.replace(tmp, path)
    return path.open("a")


# ----------------------------------------------------------------------------------------------------
# Device and precision (probe.py uses the same functions). Mixed precision follows the card: bf16 autocast
# where the card has bf16 tensor cores (CUDA compute capability >= 8.0: Ampere and later), with no
# GradScaler since bf16 has fp32's range; fp16 autocast plus a GradScaler on older cards (Colab's T4 is
# 7.5: bf16 would be emulated there, fp16 runs on its tensor cores but needs loss scaling); fp32 on CPU and
# on Apple's MPS (the code paths checked there so far are fp32 ones).


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
# Distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK. Without them nothing touches torch.distributed.


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    device = pick_device(cfg.device)
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
# The training loop


def train(cfg: TrainConfig, on_log=None) -> dict:
    """Train (or benchmark) as cfg says. Returns {"losses": [...], "step": steps done, "out": run folder}.

    on_log(row): called with each log row (a dict, as in log.jsonl), e.g. for a live plot in a notebook.
    """
    # Bad options, a bad data list, a checkpoint that cannot be continued, a folder that holds another run:
    # each fails here, before the model is built.
    check_config(cfg, RULES)
    rank, world, device = setup_distributed(cfg)
    main_proc = rank == 0
    say = print if main_proc else (lambda *a, **k: None)
    mc = model_config(cfg)
    masker = make_masker(cfg, mc)
    if cfg.benchmark:
        return benchmark(cfg, mc, masker, device, world, say)
    dataset = make_dataset(cfg, mc)
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"
    ckpt = read_for_resume(ckpt_path, cfg, mc) if cfg.resume else None
    if main_proc and not cfg.resume and ckpt_path.exists():
        raise ValueError(f"{ckpt_path} exists: use --resume to continue that run, or choose another --out "
                         f"(or delete {out} to start it over)")
    remaining = cfg.steps - (ckpt["step"] if ckpt else 0)
    if device.type == "cpu" and (warning := cpu_warning(cfg, mc, masker, remaining)):
        say(warning, file=sys.stderr)
    with run_folder(out) if main_proc else contextlib.nullcontext():
        return fit(cfg, mc, masker, dataset, ckpt, rank, world, device, on_log)


def build(cfg: TrainConfig, mc: ModelConfig, device: torch.device, world: int):
    """(model, what the step calls, optimizer, autocast context, loss scaler)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = VJEPA(mc).to(device)
    model.encoder.grad_checkpointing = cfg.checkpoint_act  # the context encoder holds most activations
    opt = make_optimizer(model, device)
    precision = precision_of(device)  # bf16, fp16 (with loss scaling) or fp32: see pick_device's section
    amp = autocast(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # a pass-through when disabled
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    step_fn = torch.compile(ddp, dynamic=True) if cfg.compile else ddp  # token counts vary: dynamic shapes
    return model, step_fn, opt, amp, scaler


def describe(cfg: TrainConfig, mc: ModelConfig, model: VJEPA, world: int, device: torch.device, say):
    n = model.num_params()
    say(f"config: {json.dumps(asdict(cfg))}")
    say(f"model {cfg.size}: {json.dumps(asdict(mc))}")
    say(f"parameters: encoder {n['encoder']:,}  predictor {n['predictor']:,} | tokens per clip "
        f"{mc.num_tokens} (grid {'x'.join(map(str, mc.grid))}) | global batch {cfg.batch_size * world} = "
        f"{cfg.batch_size} x {world} process(es) | {device_line(device, cfg.device, precision_of(device))}")


def fit(cfg, mc, masker, dataset, ckpt, rank, world, device, on_log) -> dict:
    main_proc = rank == 0
    say = print if main_proc else (lambda *a, **k: None)
    model, step_fn, opt, amp, scaler = build(cfg, mc, device, world)
    start, extra = 0, {"bad_clips": 0}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=True)
        opt.load_state_dict(ckpt["optimizer"])
        start, extra = ckpt["step"], {"bad_clips": ckpt.get("bad_clips", 0)}
        if ckpt.get("scaler") and scaler.is_enabled():  # fp16: continue with the same loss scale
            scaler.load_state_dict(ckpt["scaler"])
    describe(cfg, mc, model, world, device, say)
    loader = data.make_train_loader(dataset, masker, cfg.batch_size, start, cfg.steps, seed=cfg.seed,
                                    rank=rank, world_size=world, workers=cfg.workers)
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"
    saved = start if ckpt is not None else None  # the step of the checkpoint on disk
    log = open_log(out / "log.jsonl", saved) if main_proc else None
    losses, pending = [], []  # pending: (step, loss tensor) since the last log line, checked in one sync
    t_log, clips_since = time.perf_counter(), 0
    peak = peak_flops(device)
    done = start
    stop, handlers = on_stop_signals()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not main_proc, dynamic_ncols=True)
    try:
        for batch in loader:
            step = batch["step"]
            lr, wd, m = lr_at(step, cfg), wd_at(step, cfg), ema_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
                if g["decay"]:
                    g["weight_decay"] = wd
            clips = batch["clips"].to(device, non_blocking=True)
            masks = [(c.to(device, non_blocking=True), t.to(device, non_blocking=True))
                     for c, t in batch["masks"]]
            with amp:
                res = step_fn(clips, masks)
            opt.zero_grad(set_to_none=True)
            scaler.scale(res["loss"]).backward()  # fp16 only: the loss is scaled so small gradients survive
            if step >= cfg.warmup and cfg.clip_grad > 0:
                scaler.unscale_(opt)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_(model.encoder.parameters(), cfg.clip_grad)
                torch.nn.utils.clip_grad_norm_(model.predictor.parameters(), cfg.clip_grad)
            scaler.step(opt)  # fp16: skips the step when a gradient overflowed
            scaler.update()
            model.update_target(m)
            # unreadable videos: named above the bar, counted over the whole run against --max-bad-fraction
            for message in batch["skipped"]:
                tqdm.write(f"step {step}: skipped {message}", file=sys.stderr)
            extra["bad_clips"] += len(batch["skipped"])
            pending.append((step, res["loss"].detach()))
            clips_since += clips.shape[0] * world
            bar.update(1)
            done = step + 1
            data.check_bad_fraction(extra["bad_clips"], done * cfg.batch_size, cfg.max_bad_fraction)
            # timing and logging; a stop signal ends the run after this step, logged and saved
            at_line = done % cfg.log_every == 0 or done % cfg.save_every == 0 or done == cfg.steps
            stopping = agree_to_stop(stop, at_line, world, device)
            if at_line or stopping:
                vals = check_finite(pending, ckpt_path)  # one host sync per log line
                losses += vals
                pending = []
                dt = time.perf_counter() - t_log
                row = {"step": done, "loss": sum(vals) / len(vals), "lr": lr, "wd": wd, "ema": m,
                       "ctx": [c.shape[1] for c, _ in masks], "tgt": [t.shape[1] for _, t in masks],
                       "clips_per_s": clips_since / dt, "bad_clips": extra["bad_clips"],
                       "pred_std": res["pred_std"].item(), **collapse_monitor(model, clips, amp)}
                if device.type == "cuda":
                    row["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if peak:
                        flops = model_flops(mc, row["ctx"], row["tgt"], cfg.batch_size)
                        row["mfu"] = flops * (len(vals) / dt) / peak
                if main_proc:
                    bar.write(format_row(row))
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    if on_log:
                        on_log(row)
                t_log, clips_since = time.perf_counter(), 0
            if main_proc and (done % cfg.save_every == 0 or done == cfg.steps or stopping):
                state = extra | {"scaler": scaler.state_dict()}  # the fp16 loss scale (empty otherwise)
                save_checkpoint(ckpt_path, model, opt, cfg, done, state, saved)
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
        plot_losses(out, mc.dim)
        say(f"done: {ckpt_path} (step {done}), log {out / 'log.jsonl'}, curve {out / 'loss.png'}")
    if world > 1:
        dist.destroy_process_group()
    return {"losses": losses, "step": done, "out": str(out)}


def on_stop_signals() -> tuple[threading.Event, dict]:
    """The first Ctrl-C (SIGINT) or SIGTERM (how Slurm, Kubernetes and most schedulers preempt a job): finish
    the current step, save, exit. A second Ctrl-C acts at once; a repeated SIGTERM changes nothing (torchrun
    passes on the one Slurm also sends to every process). Returns the event and the handlers replaced."""
    stop, before = threading.Event(), {}
    stop.name = "a signal to another rank"

    def handler(signum, frame):
        stop.name = signal.Signals(signum).name
        stop.set()
        if signum == signal.SIGINT:
            signal.signal(signum, before[signum])
        tqdm.write(f"\n{stop.name}: finishing this step and saving a checkpoint"
                   + (" (press Ctrl-C again to abort)" if signum == signal.SIGINT else ""), file=sys.stderr)

    if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            before[signum] = signal.signal(signum, handler)
    return stop, before


def agree_to_stop(stop: threading.Event, at_line: bool, world: int, device: torch.device) -> bool:
    """One process stops after the step a signal arrived in. Several must stop at the same step (a rank that
    went on would wait for the others forever): they agree at log lines, where they synchronise anyway."""
    if world == 1 or not at_line:
        return world == 1 and stop.is_set()
    flag = torch.tensor([float(stop.is_set())], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


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
    return {"tgt_rank": effective_rank(h), "tgt_lag": lag.item()}


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of x (M, D) centred over its rows: D for white
    features, 1 when every row lies on one line or all rows are equal."""
    x = x[:: max(1, len(x) // 4096)].double()  # at most ~4,096 rows: cheap in float64 on any device
    x = x - x.mean(0)
    s = torch.linalg.eigvalsh(x.T @ x).clamp_min(0).sqrt()  # singular values of x, (D,)
    p = s / s.sum().clamp_min(1e-300)  # all rows equal: p = 0, rank 1
    return torch.exp(-(p * p.clamp_min(1e-30).log()).sum()).item()


def check_finite(pending: list, ckpt_path: Path) -> list[float]:
    vals = torch.stack([v for _, v in pending]).tolist()
    for (s, _), v in zip(pending, vals):
        if not math.isfinite(v):
            raise FloatingPointError(f"loss is {v} at step {s}: stopping; the last good checkpoint is kept "
                                     f"at {ckpt_path} (lower --lr, or check the data)")
    return vals


def format_row(r: dict) -> str:
    line = (f"step {r['step']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | wd {r['wd']:.3f} | "
            f"ema {r['ema']:.5f} | ctx {'/'.join(map(str, r['ctx']))} tgt {'/'.join(map(str, r['tgt']))} | "
            f"rank {r['tgt_rank']:5.1f} lag {r['tgt_lag']:.3f} pred_std {r['pred_std']:.2f} | "
            f"{r['clips_per_s']:6.1f} clips/s")
    if "mfu" in r:
        line += f" | mfu {100 * r['mfu']:.1f}%"
    if "mem_gib" in r:
        line += f" | mem {r['mem_gib']:.1f} GiB"
    return line


def plot_losses(out: Path, dim: int | None = None):
    """loss.png: the loss beside the collapse monitor (collapse_monitor), one point per log row."""
    from matplotlib.figure import Figure  # not pyplot: leaves a notebook's inline backend alone
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(12, 3.4))
    ax_loss, ax_rank, ax_lag = fig.subplots(1, 3)
    ax_loss.plot(steps, [r["loss"] for r in rows])
    ax_loss.set(xlabel="step", ylabel="loss (mean over mask generators)", title="training loss")
    if "tgt_rank" in rows[0]:
        ax_rank.plot(steps, [r["tgt_rank"] for r in rows], color="C1")
        ax_rank.set(xlabel="step", ylabel="effective rank", ylim=(0, None),
                    title="target features: effective rank" + (f" (of {dim})" if dim else ""))
        ax_lag.plot(steps, [r["tgt_lag"] for r in rows], color="C2", label="target lag ||θ̄-θ|| / ||θ||")
        ax_lag.plot(steps, [r["pred_std"] for r in rows], color="C3", label="spread of predictions")
        ax_lag.set(xlabel="step", ylim=(0, None), title="EMA target lag, prediction spread")
        ax_lag.legend(fontsize=8)
    for ax in (ax_loss, ax_rank, ax_lag):
        ax.grid(alpha=0.3)
    fig.suptitle(f"V-JEPA training: {out}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)


# ----------------------------------------------------------------------------------------------------
# Benchmark: synthetic clips already on the device, no data loading, no checkpoints.


def benchmark(cfg, mc, masker, device, world, say) -> dict:
    from torch.utils.flop_counter import FlopCounterMode
    model, step_fn, opt, amp, scaler = build(cfg, mc, device, world)
    describe(cfg, mc, model, world, device, say)
    clips = torch.randn(cfg.batch_size, 3, mc.frames, mc.img_size, mc.img_size, device=device)
    batches = [[(c.to(device), t.to(device)) for c, t in masker(cfg.batch_size, s)] for s in range(8)]

    def one_step(i):
        with amp:
            loss = step_fn(clips, batches[i % len(batches)])["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        model.update_target(0.999)

    with FlopCounterMode(display=False) as counter:  # one eager step, forward and backward
        with amp:
            loss = model(clips, batches[0])["loss"]
        loss.backward()
    flops = counter.get_total_flops()
    warm = 3 if not cfg.compile else 10
    for i in range(warm):
        one_step(i)
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(cfg.benchmark_steps):
        one_step(i)
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


# ----------------------------------------------------------------------------------------------------
# Command line: generated from TrainConfig's fields; --size picks the defaults of its recipe.


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--size", default="tiny", choices=list(PRESETS))
    size = pre.parse_known_args(argv)[0].size
    base = recipe(size)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(base, f.name)
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            choices = list(PRESETS) if f.name == "size" else None
            p.add_argument(flag, type=kind, default=default, choices=choices, help=f"(default: {default})")
    return TrainConfig(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    try:
        train(parse_args())
    except KeyboardInterrupt:  # a second Ctrl-C
        sys.exit(130)
    except (ValueError, OSError, FloatingPointError) as e:  # bad input, full disk, divergence: no traceback
        sys.exit(f"error: {e}")
