"""The run folder of train.py: checkpoints, the lock, the log, and stopping on a signal.

A run folder holds ckpt.pt (self-describing: both configs inside; written atomically), log.jsonl (one row per
log line) and loss.png. One training process at a time may use it (an OS lock), a resumed run continues its
checkpoint only with the settings it was trained with, and Ctrl-C or SIGTERM save before the run stops.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import vjepa

try:
    import fcntl  # POSIX file locks; elsewhere (Windows) run folders are not locked
except ImportError:
    fcntl = None

# ----------------------------------------------------------------------------------------------------
# Checkpoints: self-describing (both configs inside), written atomically, loaded with weights_only=True.


def save_checkpoint(path: Path, model: vjepa.VJEPA, opt, cfg, step: int, extra: dict,
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


def read_for_resume(path: Path, cfg, mc: vjepa.ModelConfig) -> dict:
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
# Stop signals


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



# ----------------------------------------------------------------------------------------------------
# The log: a non-finite loss stops the run, one line per log row, the curves in loss.png


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
