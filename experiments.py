"""The paper's findings at laptop scale: features vs pixels, multi-block vs random tube, label efficiency.

    python experiments.py            # all of it on a 2-core CPU, resumable: runs/findings/results.json
    python experiments.py --quick    # a smoke run of the whole pipeline in a minute
    python experiments.py --motion-sources runs/tiny/ckpt.pt   # where a probe finds motion, ~2.5 min

Same encoder (tiny), same data (the built-in synthetic videos), same steps, same probe, several seeds. Arms:
    features     V-JEPA: predict the EMA encoder's features, multi-block masks   (paper section 3)
    pixels       the pixel-reconstruction baseline: same masks, MSE to normalised tubelet pixels (section 4.1)
    tube         V-JEPA with random-tube masking at the same masking ratio as multi-block  (section 4.3)
    random       a randomly initialised encoder: the floor every probe must beat
Every arm is probed on both label sets (appearance: readable from one frame, like K400; motion: needs
time, like SSv2); features, pixels and random also with 10% of the probe's training labels (--fractions).
Each finished run and probe is recorded in results.json at once, so an interrupted run continues where it
stopped (a half-trained encoder resumes from its checkpoint).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

import bench
import cli
import data
import masking
import probe
import train
import vjepa


@dataclass
class ExperimentConfig:
    # The experiments. Every run and probe is recorded in <out>/results.json as it finishes
    out: str = "runs/findings"  # results folder: results.json, label_efficiency.png, one folder per run
    seeds: int = 3  # seeds per arm (mean and std over them)
    # Pretraining: the laptop recipe, train.py's defaults (README "Laptop run")
    steps: int = train.TrainConfig.steps  # pretraining steps per encoder (batch 16, ~6 min on 2 cores)
    scene: str = train.TrainConfig.scene  # synthetic scene of pretraining, probes, diagnostics (data.SCENES)
    ema_start: float = train.TrainConfig.ema_start  # EMA momentum at the first step, linear to --ema-end
    ema_end: float = train.TrainConfig.ema_end  # EMA momentum at the horizon (1.25 x steps)
    fractions: str = "0.1,1.0"  # label-efficiency points (each adds 18 probes: 3 arms x 2 labels x 3 seeds)
    probe_steps: int = 300  # optimizer steps of every probe, whatever its label fraction (see probe_epochs)
    probe_lr: float = 2e-3  # official 1e-3 is tuned for ~20 epochs of K400; our probes are shorter
    synthetic_train: int = 1024  # probe training clips (8 classes: 128 per class at 100%, 6 at 5%)
    synthetic_val: int = 512  # probe validation clips
    quick: bool = False  # a smoke run: 2 steps, 1 seed, tiny probes
    # Instead of the findings (motion_sources; README "Motion: not learned at this scale, and why")
    motion_sources: str = ""  # a train.py checkpoint: where a probe finds motion in it and in a random one


ARMS = {"features": {"target": "features", "masking": "multiblock"},
        "pixels": {"target": "pixels", "masking": "multiblock"},
        "tube": {"target": "features", "masking": "tube"},
        "random": None}
LABEL_EFFICIENCY_ARMS = ("features", "pixels", "random")
BATCH = 64  # probe batch


def matched_tube_ratio(grid, samples: int = 200) -> float:
    """The mean fraction of tokens multi-block masking hides (over both generators), so that the random-tube
    arm hides as much: a comparison of mask shape, not of mask ratio."""
    masker = masking.MultiBlockMasker(grid)
    n = grid[0] * grid[1] * grid[2]
    hidden = [t.shape[1] / n for s in range(samples) for _, t in masker(16, s)]
    return float(np.mean(hidden))


def run(cfg: ExperimentConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"probes": {}, "runs": {}}
    seeds = range(1 if cfg.quick else cfg.seeds)
    fractions = [1.0] if cfg.quick else [float(f) for f in cfg.fractions.split(",")]
    steps = 2 if cfg.quick else cfg.steps
    ratio = matched_tube_ratio(vjepa.PRESETS["tiny"].grid)
    results["tube_ratio"] = ratio
    results["config"] = asdict(cfg)
    started = time.time()
    diagnostic_clips = None  # made when first needed (a resumed run may have every diagnostic already)

    def save():
        results_path.write_text(json.dumps(results, indent=1))

    for seed in seeds:
        for arm, spec in ARMS.items():
            ckpt = out / f"{arm}_s{seed}" / "ckpt.pt"
            if spec is not None and f"{arm}_s{seed}" not in results["runs"]:
                tcfg = train.recipe("tiny", **spec, tube_ratio=ratio, steps=steps, seed=seed, scene=cfg.scene,
                                    ema_start=cfg.ema_start, ema_end=cfg.ema_end, out=str(ckpt.parent),
                                    log_every=50, save_every=50, resume=ckpt.exists())
                res = train.train(tcfg)
                last = res["losses"][-1] if res["losses"] else None
                results["runs"][f"{arm}_s{seed}"] = {"final_loss": last}
                save()
            # the frozen backbone, as probe.py reads it: this arm's target encoder, or a random tiny encoder
            backbone = {"checkpoint": str(ckpt)} if spec else {"size": "tiny", "random_init": True}
            if f"{arm}_s{seed}" not in results.setdefault("feature_stats", {}):
                if diagnostic_clips is None:
                    n = 32 if cfg.quick else 256  # clips never probed on
                    shown = data.SyntheticVideos(n, seed=99, scene=cfg.scene)
                    diagnostic_clips = torch.stack([shown[i][0] for i in range(len(shown))])
                encoder = probe.load_backbone(probe.ProbeConfig(**backbone, seed=seed))
                results["feature_stats"][f"{arm}_s{seed}"] = feature_diagnostics(encoder, diagnostic_clips)
                save()
            features = None  # this encoder's frozen features, shared by its probes (frozen_features)
            for label in ("appearance", "motion"):
                for frac in fractions if arm in LABEL_EFFICIENCY_ARMS else [1.0]:
                    key = f"{arm}|{label}|{frac}|s{seed}"
                    if key in results["probes"]:
                        continue
                    pcfg = probe.ProbeConfig(
                        **backbone, label=label, scene=cfg.scene, train_fraction=frac, seed=seed,
                        epochs=probe_epochs(cfg, frac), lr=cfg.probe_lr, batch_size=BATCH,
                        synthetic_train=64 if cfg.quick else cfg.synthetic_train,
                        synthetic_val=32 if cfg.quick else cfg.synthetic_val)
                    features = features or frozen_features(pcfg)
                    results["probes"][key] = probe_top1(features, pcfg)
                    save()
    results["seconds_this_session"] = time.time() - started
    results["summary"] = summarise(results["probes"])
    save()
    plot_label_efficiency(results["summary"], out / "label_efficiency.png")
    print(table(results["summary"], results["feature_stats"]))
    return results


def frozen_features(pcfg: probe.ProbeConfig, datasets=None) -> dict:
    """The frozen encoder's features of all the probe's synthetic clips, computed once per encoder and shared
    by its probes (both label sets, every label fraction), where probe.probe() would encode them for each.
    {"train" / "val": (features (M, 1, N, D), dataset), "encoder": its ModelConfig}. `datasets`: (train, val)
    to use instead of the probe's own."""
    cfg = probe.with_defaults(pcfg)
    device = bench.pick_device(cfg.device)
    amp = bench.autocast(device, bench.precision_of(device))
    encoder = probe.load_backbone(cfg).to(device)
    out = {"encoder": encoder.cfg}
    for split, ds in zip(("train", "val"), datasets or probe.make_datasets(cfg, encoder.cfg, True)):
        items = data.ProbeItems(ds, range(len(ds)), split == "train", cfg.seed)
        batches = probe.stream(encoder, items, cfg, device, amp, shuffle=False)
        out[split] = torch.cat([f for f, _, _ in batches]), ds  # synthetic clips are all readable
    return out


def probe_top1(features: dict, pcfg: probe.ProbeConfig) -> float:
    """probe.probe(pcfg)["top1"] (the same probe, training and evaluation: tests/test_experiments.py), from
    frozen_features() instead of a fresh encoder pass, and without writing a results folder."""
    cfg = probe.with_defaults(pcfg)
    device = bench.pick_device(cfg.device)
    precision = bench.precision_of(device)
    amp = bench.autocast(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    (train_f, train_ds), (val_f, val_ds) = features["train"], features["val"]
    which = data.SyntheticVideos.LABELS.index(cfg.label)
    train_y, val_y = (torch.tensor([ds.labels(i)[which] for i in range(len(ds))], device=train_f.device)
                      for ds in (train_ds, val_ds))
    keep = data.stratified_subset(train_y.tolist(), cfg.train_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)  # the probe's initial weights, as in probe.probe()
    ec, num_classes = features["encoder"], train_ds.num_classes[cfg.label]
    classifier = probe.AttentiveClassifier(ec.dim, ec.heads, num_classes, cfg.depth).to(device)
    train_batches = probe.cached_batches(train_f[keep], train_y[keep], [], cfg, shuffle=True)
    steps = math.ceil(len(keep) / cfg.batch_size)
    for _ in probe.train_epochs(classifier, train_batches, steps, cfg, amp, scaler):
        pass  # each iteration trains one epoch
    val_batches = probe.cached_batches(val_f, val_y, [], cfg, shuffle=False)
    return probe.evaluate(classifier, val_batches(), num_classes, amp)["top1"]


def probe_epochs(cfg: ExperimentConfig, fraction: float) -> int:
    """Epochs that give a probe on `fraction` of the labels about cfg.probe_steps optimizer steps. A fixed
    number of epochs would give the 5% probe 1/20 of the updates of the 100% one, and measure its
    shorter optimisation rather than the fewer labels."""
    if cfg.quick:
        return 1
    per_epoch = math.ceil(fraction * cfg.synthetic_train / BATCH)
    return max(1, round(cfg.probe_steps / per_epoch))


@torch.no_grad()
def feature_diagnostics(encoder: vjepa.Encoder, clips: torch.Tensor) -> dict:
    """What a frozen encoder's token features (the probe's input) vary with, on a batch of clips:
    position_share  fraction of the features' variance explained by the token position alone (the mean
                    feature map over clips): 1 would mean every clip gives the same map
    effective_rank  exp(entropy) of the normalised singular values of the rest (the clip-dependent part):
                    how many directions the content spreads over (at most D)"""
    f = encoder.eval()(clips).double()  # (B, N, D)
    content = f - f.mean(0)  # what changes from clip to clip at a fixed position
    total = (f - f.mean((0, 1))).pow(2).sum()
    return {"position_share": float(1 - content.pow(2).sum() / total),
            "effective_rank": train.effective_rank(content.flatten(0, 1))}  # rows already centred


# ----------------------------------------------------------------------------------------------------
# Where can a probe find motion? (README "Motion: not learned at this scale, and why")


class FramesTwice(data.SyntheticVideos):
    """The same clips with every other frame shown twice (0, 0, 2, 2, ...): nothing moves inside a tubelet
    (2 frames), while the object still moves from one tubelet to the next."""

    def sample(self, index: int):
        clip, labels = super().sample(index)  # (3, T, H, W)
        return clip[:, 0::2].repeat_interleave(2, dim=1), labels


def object_tokens(ds: data.SyntheticVideos, ec: vjepa.ModelConfig) -> torch.Tensor:
    """(M, N) bool, in the encoder's token order: the object covers more than half of the token's pixels."""
    masks = np.stack([ds.render(i, *ds.labels(i), with_mask=True)[1] for i in range(len(ds))])  # (M, T, H, W)
    return vjepa.tubelets(torch.from_numpy(masks).float()[:, None], ec).mean(-1) > 0.5  # (M, N)


def linear_readout(x: torch.Tensor, y: torch.Tensor):
    """A logistic regression from features (M, D) to a bool (M,), fitted with both classes weighted equally;
    returns score(x_val, y_val) -> its balanced accuracy (%, chance 50) there."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)
    z, target = (x - mean) / std, y.float()

    def loss():
        opt.zero_grad()
        out = F.binary_cross_entropy_with_logits(z @ w + b, target, pos_weight=(~y).sum() / y.sum())
        (out + 1e-4 * w.square().sum()).backward()
        return out

    opt.step(loss)

    @torch.no_grad()
    def score(x_val: torch.Tensor, y_val: torch.Tensor) -> float:
        hit = (((x_val - mean) / std) @ w + b > 0) == y_val
        return 50 * (hit[y_val].float().mean() + hit[~y_val].float().mean()).item()
    return score


def motion_sources(checkpoint: str = "", scene: str = "", seed: int = 0, train_clips: int = 1024,
                   val_clips: int = 512, epochs: int = 20) -> dict:
    """Where a probe can find motion in a frozen encoder (a train.py checkpoint, or "": a random tiny one),
    on the synthetic motion label of `scene` ("": the checkpoint's, as in probe.py), with probe.py's default
    probe:
    motion                  the motion probe's top-1 (as `python probe.py --label motion`)
    motion_frames_twice     the same probe, trained and tested on FramesTwice clips: what is left when
                            nothing moves inside a tubelet
    object_tokens           a linear readout, token by token, of "the object covers this token" (balanced
                            accuracy, chance 50)
    object_tokens_changing  the same readout scored on the tokens whose place the object covers at some
                            time steps and not at others: only a feature of where the object is *at that
                            time step* gets these right"""
    backbone = {"checkpoint": checkpoint} if checkpoint else {"size": "tiny", "random_init": True}
    pcfg = probe.ProbeConfig(**backbone, label="motion", scene=scene, seed=seed, epochs=epochs,
                             synthetic_train=train_clips, synthetic_val=val_clips)
    features = frozen_features(pcfg)  # the probe's own clips
    out = {"motion": probe_top1(features, pcfg)} | object_readouts(features)
    twice = [FramesTwice(len(ds), ds.frames, ds.img_size, seed=ds.seed, label=ds.label, scene=ds.scene)
             for _, ds in (features["train"], features["val"])]  # the same clips, frames shown twice
    out["motion_frames_twice"] = probe_top1(frozen_features(pcfg, twice), pcfg)
    return out


def object_readouts(features: dict) -> dict:
    """motion_sources' two object readouts, from frozen_features() of SyntheticVideos clips."""
    ec = features["encoder"]
    (f, ds), (f_val, ds_val) = features["train"], features["val"]
    on, on_val = object_tokens(ds, ec).flatten(), object_tokens(ds_val, ec)  # (M*N,), (M', N)
    per_place = rearrange(on_val, "m (t s) -> m t s", t=ec.grid[0])  # (M', T', H'*W')
    changing = (per_place.any(1, keepdim=True) & ~per_place.all(1, keepdim=True)).expand_as(per_place)
    changing, on_val = changing.flatten(), on_val.flatten()
    x, x_val = f[:, 0].flatten(0, 1).float(), f_val[:, 0].flatten(0, 1).float()  # (M*N, D), (M'*N, D)
    score = linear_readout(x, on)
    return {"object_tokens": score(x_val, on_val),
            "object_tokens_changing": score(x_val[changing], on_val[changing])}


def summarise(probes: dict) -> dict:
    """{"arm|label|fraction": {"mean", "std", "n"}} over seeds."""
    groups: dict[str, list[float]] = {}
    for key, top1 in probes.items():
        groups.setdefault(key.rsplit("|", 1)[0], []).append(top1)
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in sorted(groups.items())}


def table(summary: dict, stats: dict) -> str:
    rows = ["| arm | appearance top-1 | motion top-1 | position share | effective rank |", "|---" * 5 + "|"]
    for arm in ARMS:
        cells = []
        for label in ("appearance", "motion"):
            s = summary.get(f"{arm}|{label}|1.0")
            cells.append(f"{s['mean']:.1f} ± {s['std']:.1f} (n={s['n']})" if s else "-")
        for stat, d in (("position_share", 2), ("effective_rank", 0)):
            v = [s[stat] for k, s in stats.items() if k.rsplit("_s", 1)[0] == arm]
            cells.append(f"{np.mean(v):.{d}f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.{d}f}" if v else "-")
        rows.append("| " + " | ".join([arm, *cells]) + " |")
    return "\n".join(rows)


def plot_label_efficiency(summary: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, label in zip(axes, ("appearance", "motion")):
        for arm in LABEL_EFFICIENCY_ARMS:
            pts = sorted((float(k.split("|")[2]), v) for k, v in summary.items()
                         if k.startswith(f"{arm}|{label}|"))
            if pts:
                x = [100 * p for p, _ in pts]
                ax.errorbar(x, [v["mean"] for _, v in pts], yerr=[v["std"] for _, v in pts], marker="o",
                            capsize=3, label=arm)
        ax.axhline(100 / 8, color="grey", linestyle=":", label="chance (8 classes)")
        ax.set(xscale="log", xlabel="% of probe training labels (1,024 clips = 100%)", title=f"{label} label")
        shown = sorted({100 * float(k.split("|")[2]) for k in summary})
        ax.set_xticks(shown, [f"{x:g}" for x in shown])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("probe top-1 (%)")
    axes[1].legend()
    fig.suptitle("Label efficiency of frozen tiny encoders: attentive probe top-1, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> ExperimentConfig:
    return cli.parse(ExperimentConfig, argv, __doc__)


def print_motion_sources(checkpoint: str):
    scene = probe.training_scene(checkpoint)  # first: a wrong path fails before any work
    rows = {"random encoder": motion_sources("", scene), checkpoint: motion_sources(checkpoint, scene)}
    print("| frozen encoder | motion | motion, frames twice | object tokens | object tokens, changing |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['motion']:.1f} | {r['motion_frames_twice']:.1f} | {r['object_tokens']:.1f} | "
              f"{r['object_tokens_changing']:.1f} |")
    return rows


def main(argv=None):
    config = parse_args(argv)
    try:
        if config.motion_sources:
            print_motion_sources(config.motion_sources)
        else:
            run(config)
    except (ValueError, OSError) as e:  # a missing or wrong checkpoint, a full disk: the message only
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
