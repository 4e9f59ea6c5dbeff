"""Frozen evaluation of V-JEPA: an attentive probe on the frozen target encoder (paper section 4).

    python probe.py --size tiny --random-init                       # the floor, built-in synthetic data
    python probe.py --checkpoint runs/tiny/ckpt.pt --label motion   # a model trained by train.py
    python probe.py --checkpoint vitl16 --data videos --segments 8 --views 3 \\
        --train-list k400_train.txt --val-list k400_val.txt         # Meta's ViT-L/16, K400 16x8x3
    python probe.py --checkpoint vitl16 --data videos --segments 8 --views 3 \\
        --val-list k400_val.txt --probe-checkpoint k400 --epochs 0  # Meta's K400 probe, evaluated

Released names (vitl16, vith16, vith16_384; probes k400, ssv2, in1k) are downloaded once into torch's hub
cache and reused after.

The encoder never trains: its token maps go to a small attentive probe (one learned query cross-attends to all
tokens, then a linear layer; official src/models/attentive_pooler.py). Writes results.json, probe.pth.tar
(official format) and, for <= 20 classes, confusion.png to --out.

Shapes: B videos, V spatial views, S temporal segments, N tokens per clip, D width, C classes.
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import bench
import cli
import data
import vjepa
from cli import COUNT, FOLDER, NON_NEGATIVE, POSITIVE, check_config, one_of
from vjepa import PRESETS

# ----------------------------------------------------------------------------------------------------
# 1. The attentive probe. Attribute names are the official ones, so a released probe loads with a prefix
#    strip ("module.") and a strict load. LayerNorm eps is nn.LayerNorm's default 1e-5, as the official
#    probe (src/models/attentive_pooler.py; tests/test_probe.py checks its logits on reference/).


class CrossAttention(nn.Module):
    record: list | None = None  # set by vjepa.record_attention(): where the query looks (notebook 2)

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        # Official quirk: `proj` exists (so official checkpoints load strictly) but the official forward never
        # applies it; released probes were trained without it and only reach their accuracy without it.
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(q), "b m (nh hd) -> b nh m hd", nh=self.heads)  # (B, nh, 1, hd)
        k, v = rearrange(self.kv(x), "b n (two nh hd) -> two b nh n hd", two=2, nh=self.heads)  # (B,nh,N,hd)
        out = vjepa.attend(q, k, v, self.record)  # (B, nh, 1, hd)
        return rearrange(out, "b nh m hd -> b m (nh hd)")  # (B, 1, D), no self.proj (see above)


class CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # normalises the keys/values (the encoder's tokens), not the query
        self.xattn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = vjepa.MLP(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = q + self.xattn(q, self.norm1(x))  # (B, 1, D)
        return q + self.mlp(self.norm2(q))


class AttentivePooler(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int = 1):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.cross_attention_block = CrossAttentionBlock(dim, heads)
        # depth > 1: V-JEPA's pooler adds self-attention blocks on the pooled query, after the cross-attention
        # (facebookresearch/jepa; V-JEPA 2 moved them before it, onto the encoder's tokens).
        self.blocks = nn.ModuleList(vjepa.Block(dim, heads, eps=1e-5) for _ in range(depth - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.cross_attention_block(self.query_tokens.expand(len(x), -1, -1), x)  # (B, 1, D)
        for blk in self.blocks:
            q = blk(q)
        return q


class AttentiveClassifier(nn.Module):
    def __init__(self, dim: int, heads: int, num_classes: int, depth: int = 1):
        super().__init__()
        self.pooler = AttentivePooler(dim, heads, depth)
        self.linear = nn.Linear(dim, num_classes)
        # Official init: the pooler's Linears and query ~ N(0, 0.02), each residual branch's last layer
        # divided by sqrt(2 * layer); `linear` keeps PyTorch's default init (the official code leaves it).
        vjepa.init_weights(self.pooler)
        with torch.no_grad():
            nn.init.trunc_normal_(self.pooler.query_tokens, std=0.02)
            # layer 1: the cross-attention block (its xattn.proj is never applied, so not rescaled)
            self.pooler.cross_attention_block.mlp.fc2.weight.div_(math.sqrt(2.0))
            for layer, blk in enumerate(self.pooler.blocks, start=2):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pooler(x).squeeze(1))  # (B, N, D) -> (B, C)


# Meta's released attentive probes (facebookresearch/jepa README) sit beside each RELEASED backbone:
# .../jepa/vitl16/k400-probe.pth.tar. --probe-checkpoint k400 (ssv2, in1k) names the one of the backbone.
RELEASED_PROBES = ("k400", "ssv2", "in1k")


def load_probe(path: str | Path, enc_cfg: vjepa.ModelConfig, depth: int = 1) -> AttentiveClassifier:
    """An official-format probe checkpoint {"classifier": {"module.pooler.*", "module.linear.*"}}, or the
    name of a released probe for enc_cfg's preset (downloaded once into torch's hub cache)."""
    if str(path) in RELEASED_PROBES and not Path(path).exists():
        preset = vjepa.preset_name(enc_cfg)
        if preset not in vjepa.RELEASED:
            raise ValueError(f"Meta released {path} probes for {', '.join(vjepa.RELEASED)}, not for a "
                             f"'{preset}' encoder")
        path = vjepa.cached_download(vjepa.RELEASED[preset].rsplit("/", 1)[0] + f"/{path}-probe.pth.tar")
    ckpt = vjepa.read_checkpoint(path)
    if not (isinstance(ckpt, dict) and "module.linear.weight" in ckpt.get("classifier", {})):
        found = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an attentive-probe checkpoint: expected {{'classifier': "
                         f"{{'module.pooler.*', 'module.linear.*'}}}}, found keys {found}")
    state = vjepa.strip_prefix(ckpt["classifier"], "module.")
    clf = AttentiveClassifier(enc_cfg.dim, enc_cfg.heads, state["linear.weight"].shape[0], depth)
    vjepa.load_strict(clf, state, f"probe {path}", enc_cfg)  # names the first mismatching key and shapes
    return clf


def save_probe(path: Path, clf: AttentiveClassifier, epoch: int, cfg: "ProbeConfig"):
    """The official layout (keys prefixed "module."), so the official code reads it too, plus our config."""
    state = {"module." + k: v for k, v in clf.state_dict().items()}
    torch.save({"classifier": state, "epoch": epoch, "probe_config": asdict(cfg)}, path)


# ----------------------------------------------------------------------------------------------------
# 2. Multi-view evaluation (official): the segments of one view go through the encoder separately and
#    their token maps are concatenated along tokens (nothing added between them) into one probe input;
#    class probabilities are averaged over views after the softmax.


@torch.no_grad()
def encode(encoder: nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """(B, V, S, 3, T, H, W) clips -> (B, V, S*N, D) probe inputs."""
    B, V, S = clips.shape[:3]
    x = encoder(rearrange(clips, "b v s c t h w -> (b v s) c t h w"))  # (B*V*S, N, D)
    return rearrange(x, "(b v s) n d -> b v (s n) d", b=B, v=V, s=S)  # (B, V, S*N, D)


def predict(classifier: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """(B, V, N', D) -> (B, C): the mean over views of each view's softmax."""
    logits = classifier(rearrange(feats, "b v n d -> (b v) n d"))  # (B*V, C)
    return rearrange(logits.float().softmax(-1), "(b v) c -> b v c", b=len(feats)).mean(1)  # (B, C)


# ----------------------------------------------------------------------------------------------------
# 3. Config and command line


@dataclass
class ProbeConfig:
    # Backbone: the target encoder of a checkpoint, frozen
    checkpoint: str = ""  # train.py's ckpt.pt, an official file (then also --size), or a release: vitl16, ...
    size: str = ""  # preset of an official checkpoint, or of the encoder of --random-init
    random_init: bool = False  # random weights of the same preset: the floor a pretrained encoder must beat
    # Data
    data: str = "synthetic"  # synthetic (built in), videos (--train-list, --val-list), images (--*-dir)
    label: str = "appearance"  # synthetic data: the label to predict
    synthetic_train: int = 1024  # synthetic clips (train and val use different seeds: no clip is shared)
    synthetic_val: int = 512  # synthetic validation clips
    scene: str = ""  # synthetic scene (data.SCENES); "": the one the checkpoint was trained on (else clean)
    train_list: str = ""  # official format: one "path label" per line
    val_list: str = ""  # the validation videos, in the same format
    train_dir: str = ""  # root/<class>/<image>; images are repeated along time
    val_dir: str = ""  # the validation images, in the same layout
    frame_step: int = 4  # real video: stride between the sampled frames
    segments: int = 1  # temporal segments per validation video (K400: 8, SSv2: 2)
    views: int = 1  # spatial views per segment (3 in the paper)
    train_fraction: float = 1.0  # keep this fraction of each class's training items (label efficiency)
    # Probe
    probe_checkpoint: str = ""  # a probe file, or k400 / ssv2 / in1k: Meta's for the backbone (--epochs 0)
    depth: int = 1  # probe blocks: 1 cross-attention block, then depth - 1 self-attention blocks
    epochs: int = 20  # training epochs of the probe; 0: evaluate --probe-checkpoint as it is
    batch_size: int | None = None  # None: 256 for real data (official), 64 for synthetic (320 updates)
    lr: float | None = None  # AdamW, cosine to 0 over the run; None: 1e-3 (official), 2e-3 for synthetic
    val_every: int = 1  # validate every N epochs (cached synthetic features); the last epoch always
    weight_decay: float | None = None  # None: 0.01 for video, 0.001 for images (official configs)
    # Run
    out: str = ""  # results folder; default <checkpoint's run folder>/probe-<task> (see default_out)
    seed: int = 0  # seeds the probe's weights, the data order and the label subset
    workers: int = 0  # DataLoader processes (real video wants several)
    device: str = "auto"  # auto: cuda, else Apple's mps, else cpu; or cpu, cuda, cuda:N, mps


CHOICES = {"size": ["", *PRESETS], "data": ["synthetic", "videos", "images"],
           "label": list(data.SyntheticVideos.LABELS), "scene": ["", *data.SCENES]}
# The allowed values of each field, checked before anything is read or built (as train.RULES); the file and
# folder options are checked where they are read, which names the file.
RULES = {
    **{name: one_of(*choices) for name, choices in CHOICES.items()},
    "synthetic_train": COUNT, "synthetic_val": COUNT, "frame_step": COUNT, "segments": COUNT, "views": COUNT,
    "train_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"), "depth": COUNT, "epochs": NON_NEGATIVE,
    "batch_size": COUNT, "lr": POSITIVE, "val_every": COUNT,
    "weight_decay": (lambda v: v is None or NON_NEGATIVE[0](v), ">= 0"), "out": FOLDER, "seed": NON_NEGATIVE,
    "workers": NON_NEGATIVE,
}


def parse_args(argv: list[str] | None = None) -> ProbeConfig:
    return cli.parse(ProbeConfig, argv, __doc__, choices=CHOICES)


# ----------------------------------------------------------------------------------------------------
# 4. The frozen backbone and the data it is probed on (data.py: ProbeItems, labels_of, stratified_subset)


def load_backbone(cfg: ProbeConfig) -> vjepa.Encoder:
    if cfg.checkpoint:  # vjepa raises clear errors: not a V-JEPA checkpoint, wrong preset, missing file
        enc = vjepa.load_target_encoder(cfg.checkpoint, cfg.size or None)
    elif cfg.random_init and cfg.size:
        enc = vjepa.Encoder(PRESETS[cfg.size])
    else:
        raise ValueError("give --checkpoint (plus --size for an official one), or --random-init --size NAME")
    if cfg.random_init:  # same preset, fresh weights, initialised as the trainer does
        torch.manual_seed(cfg.seed)
        vjepa.init_weights(enc)
    return enc.eval().requires_grad_(False)


def training_scene(checkpoint: str) -> str:
    """The synthetic scene a train.py checkpoint was trained on ("cluttered" before scenes existed);
    "clean" for anything else (a random encoder, Meta's checkpoints)."""
    if not checkpoint:
        return "clean"
    ckpt = vjepa.read_checkpoint(checkpoint)
    train_config = ckpt.get("train_config") if isinstance(ckpt, dict) else None
    return train_config.get("scene", "cluttered") if isinstance(train_config, dict) else "clean"


def make_datasets(cfg: ProbeConfig, ec: vjepa.ModelConfig, training: bool):
    """(train dataset or None, val dataset), at the encoder's frames and image size."""
    if cfg.data != "videos" and (cfg.segments, cfg.views) != (1, 1):
        raise ValueError("--segments and --views apply to video lists (--data videos) only")
    if cfg.data == "synthetic":
        kw = {"label": cfg.label, "scene": cfg.scene or training_scene(cfg.checkpoint)}
        return (data.SyntheticVideos(cfg.synthetic_train, ec.frames, ec.img_size, seed=cfg.seed, **kw),
                data.SyntheticVideos(cfg.synthetic_val, ec.frames, ec.img_size, seed=cfg.seed + 1, **kw))
    kind = "list" if cfg.data == "videos" else "dir"
    train_src, val_src = getattr(cfg, f"train_{kind}"), getattr(cfg, f"val_{kind}")
    if not val_src or (training and not train_src):
        raise ValueError(f"--data {cfg.data} needs --val-{kind}, and --train-{kind} unless --epochs 0")
    return data.probe_splits(cfg.data, train_src if training else None, val_src, ec.frames, ec.img_size,
                             cfg.frame_step)


# ----------------------------------------------------------------------------------------------------
# 5. Features, training, evaluation


def stream(encoder, items: data.ProbeItems, cfg: ProbeConfig, device, amp, epoch=0, shuffle=None):
    """Yields (feats (B, V, S*N, D) or None, labels (B,), errors) straight from the frozen encoder."""
    loader = items.loader(cfg.batch_size, items.train if shuffle is None else shuffle, epoch, cfg.workers)
    bar = tqdm(loader, desc="train" if items.train else "val", leave=False, disable=None)  # none in notebooks
    for clips, labels, errors in bar:
        feats = None
        if clips is not None:
            with amp:  # not around the yield: autocast is global state and would leak into the caller
                feats = encode(encoder, clips.to(device))
        yield feats, labels.to(device), errors


def feature_source(encoder, items: data.ProbeItems, cfg: ProbeConfig, device, amp, cached: bool):
    """A function epoch -> iterator of (feats, labels, errors) batches. Cached: the encoder runs once here and
    later epochs reshuffle the stored features; else every epoch decodes and encodes (new augmentations)."""
    if not cached:
        return lambda epoch=0: stream(encoder, items, cfg, device, amp, epoch)
    out = list(stream(encoder, items, cfg, device, amp, shuffle=False))  # cached_batches shuffles later
    errors = [e for _, _, es in out for e in es]
    if all(f is None for f, _, _ in out):
        raise ValueError(f"no item could be read (first error: {errors[0]})")
    feats, labels = torch.cat([f for f, _, _ in out if f is not None]), torch.cat([y for _, y, _ in out])
    print(f"{'train' if items.train else 'val'} features {tuple(feats.shape)} cached "
          f"({feats.numel() * feats.element_size() / 2**30:.2f} GiB)")
    return cached_batches(feats, labels, errors, cfg, shuffle=items.train)


def cached_batches(feats: torch.Tensor, labels: torch.Tensor, errors: list, cfg: ProbeConfig, shuffle: bool):
    """epoch -> iterator of (feats, labels, errors) batches of stored features, in a seeded order per epoch;
    the messages of the unreadable items come once per pass, with the first batch."""
    def batches(epoch=0):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(labels), generator=g) if shuffle else torch.arange(len(labels))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size].to(feats.device)
            yield feats[idx], labels[idx], (errors if i == 0 else [])
    return batches


@torch.no_grad()
def evaluate(classifier, batches, num_classes: int, amp) -> dict:
    """Top-1 (and top-5) in percent over the readable videos; unreadable ones are counted and listed."""
    classifier.eval()
    probs, labels, errors = [torch.zeros(0, num_classes)], [torch.zeros(0, dtype=torch.long)], []
    for feats, y, errs in batches:
        errors += errs
        if feats is not None:
            with amp:
                probs.append(predict(classifier, feats).cpu())
            labels.append(y.cpu())
    probs, labels = torch.cat(probs), torch.cat(labels)
    if not len(labels):  # an accuracy over no video would look like a result
        raise ValueError(f"none of the {len(errors)} validation videos could be read (the first: "
                         f"{errors[0]}): no accuracy to report")
    top = probs.topk(min(5, num_classes), dim=1).indices  # (M, 5)
    n, hits = len(labels), (top[:, 0] == labels).sum().item()
    res = {"top1": 100 * hits / n, "readable": n, "unreadable": len(errors),
           "top1_unreadable_as_wrong": 100 * hits / (n + len(errors)),
           "denominator": "top1/top5: readable videos only; top1_unreadable_as_wrong: all videos",
           "unreadable_errors": errors}
    if num_classes > 5:
        res["top5"] = 100 * (top == labels[:, None]).any(1).sum().item() / n
    return res | {"pred": top[:, 0].tolist(), "label": labels.tolist()}


def train_epochs(classifier, batches, steps_per_epoch: int, cfg: ProbeConfig, amp, scaler):
    """AdamW; lr and weight decay follow the official cosines (lr -> 0, wd -> 1e-6), stepped before each
    update; no decay on biases and 1-D parameters; gradients clipped at norm 1 (all as the official code).
    Yields (epoch, mean loss, train top-1, messages of the unreadable training videos) after each epoch."""
    params = list(classifier.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "decay": True},
                             {"params": [p for p in params if p.ndim <= 1], "decay": False}], foreach=True)
    total, step, wd = cfg.epochs * steps_per_epoch, 0, cfg.weight_decay
    for epoch in range(cfg.epochs):
        classifier.train()
        losses, correct, seen, errors = [], 0, 0, []
        for feats, y, errs in batches(epoch):
            errors += errs
            if feats is None:
                continue
            step += 1
            cosine = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            for g in opt.param_groups:
                g["lr"] = cfg.lr * cosine
                g["weight_decay"] = 1e-6 + (wd - 1e-6) * cosine if g["decay"] else 0.0
            with amp:
                logits = classifier(feats[:, 0])  # training items hold one view: (B, N, D) -> (B, C)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # fp16 (older GPUs) only: scaled, then unscaled before clipping
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
            correct, seen = correct + (logits.argmax(1) == y).sum().item(), seen + len(y)
        if not seen:
            raise ValueError(f"none of the {len(errors)} training videos could be read (the first: "
                             f"{errors[0]}): nothing to train the probe on")
        yield epoch, float(np.mean(losses)), 100 * correct / seen, errors


def save_confusion(path: Path, pred: list[int], label: list[int], num_classes: int, names=None,
                   what: str = ""):
    """confusion.png: counts of (true, predicted) class, titled with `what` was probed, top-1 and chance."""
    from matplotlib.figure import Figure  # not pyplot: leaves a notebook's plotting backend alone

    cm = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(cm, (label, pred), 1)  # rows: true class, columns: predicted
    fig = Figure(figsize=(max(5.0, 2 + 0.4 * num_classes), 2 + 0.4 * num_classes))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    for (i, j), c in np.ndenumerate(cm):
        ax.text(j, i, c, ha="center", va="center", fontsize=7, color="white" if c > cm.max() / 2 else "black")
    top1 = 100 * np.trace(cm) / max(cm.sum(), 1)
    ax.set(xticks=range(num_classes), yticks=range(num_classes), xlabel="predicted", ylabel="true class")
    ax.set_title(f"{what}\ntop-1 {top1:.1f}% over {cm.sum()} items (chance {100 / num_classes:.1f}%)",
                 fontsize=9)
    if names is not None and len(names) == num_classes:
        ax.set_xticklabels(names, rotation=90)
        ax.set_yticklabels(names)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------------
# 6. The whole evaluation: notebooks call probe(ProbeConfig(...)); the command line calls main().


def with_defaults(cfg: ProbeConfig) -> ProbeConfig:
    """Fill the fields left None. Real data: the official probe recipe (batch 256, lr 1e-3, wd 0.01 for
    video, 0.001 for images). The built-in synthetic data has 1,024 training clips: batch 64 and lr 2e-3
    give the tiny encoder's probe 320 updates in 20 epochs, where 256 would give it 80."""
    synthetic = cfg.data == "synthetic"
    defaults = {"batch_size": 64 if synthetic else 256, "lr": 2e-3 if synthetic else 1e-3,
                "weight_decay": 1e-3 if cfg.data == "images" else 1e-2}
    return replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def probe(cfg: ProbeConfig) -> dict:
    """Train (or load) a probe on the frozen encoder and evaluate it."""
    t_start = time.time()
    cfg = with_defaults(cfg)
    check_config(cfg, RULES)
    device = bench.pick_device(cfg.device)  # the same device and precision rules as train.py
    precision = bench.precision_of(device)
    amp = bench.autocast(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    print(bench.device_line(device, cfg.device, precision))
    if cfg.epochs == 0 and not cfg.probe_checkpoint:
        raise ValueError("--epochs 0 evaluates a trained probe: give --probe-checkpoint")
    encoder = load_backbone(cfg).to(device)
    ec, training = encoder.cfg, cfg.epochs > 0
    train_ds, val_ds = make_datasets(cfg, ec, training)
    torch.manual_seed(cfg.seed)
    if cfg.probe_checkpoint:
        classifier = load_probe(cfg.probe_checkpoint, ec, cfg.depth)
    else:
        n = train_ds.num_classes[cfg.label] if cfg.data == "synthetic" else train_ds.num_classes
        classifier = AttentiveClassifier(ec.dim, ec.heads, n, cfg.depth)
    num_classes = classifier.linear.out_features
    classifier.to(device)
    data.labels_of(val_ds, num_classes)  # fail now on a label out of range, not after the training
    # The encoder is frozen, so the unaugmented synthetic features are the same every epoch: computed once.
    cached = cfg.data == "synthetic"
    val_items = data.ProbeItems(val_ds, range(len(val_ds)), False, cfg.seed, cfg.segments, cfg.views)
    val_batches = feature_source(encoder, val_items, cfg, device, amp, cached)
    history, train_errors = [], []
    if training:
        train_labels = data.labels_of(train_ds, num_classes)
        keep = data.stratified_subset(train_labels, cfg.train_fraction, cfg.seed)
        train_items = data.ProbeItems(train_ds, keep, True, cfg.seed, cfg.segments, cfg.views)
        train_batches = feature_source(encoder, train_items, cfg, device, amp, cached)
        print(f"probe: {len(keep)} of {len(train_labels)} training items, {num_classes} classes (chance "
              f"{100 / num_classes:.1f}%), {cfg.epochs} epochs, lr {cfg.lr:g}, wd {cfg.weight_decay:g}, "
              f"{vjepa.preset_name(ec)} encoder")
        steps = math.ceil(len(keep) / cfg.batch_size)
        epochs = train_epochs(classifier, train_batches, steps, cfg, amp, scaler)
        for epoch, loss, train_top1, errors in epochs:
            row, train_errors = {"epoch": epoch + 1, "loss": loss, "train_top1": train_top1}, errors
            last = epoch + 1 == cfg.epochs  # a streamed validation costs an encoder pass: only at the end
            if last or (cached and (epoch + 1) % cfg.val_every == 0):
                row["val_top1"] = evaluate(classifier, val_batches(), num_classes, amp)["top1"]
            history.append(row)
            val = f" | val top1 {row['val_top1']:5.1f}" if "val_top1" in row else ""
            print(f"epoch {epoch + 1:3d}/{cfg.epochs} | loss {loss:.4f} | train top1 {train_top1:5.1f}{val}")
    res = evaluate(classifier, val_batches(), num_classes, amp)
    pred, label = res.pop("pred"), res.pop("label")
    res |= {"classes": num_classes, "chance_top1": 100 / num_classes, "encoder": vjepa.preset_name(ec),
            "history": history, "train_unreadable": train_errors, "seconds": time.time() - t_start,
            "config": asdict(cfg)}
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if training:
        save_probe(out / "probe.pth.tar", classifier, cfg.epochs, cfg)
    if num_classes <= 20:
        names = getattr(val_ds, "classes", None) if cfg.data != "synthetic" else \
            {"appearance": data.APPEARANCES, "motion": data.MOTIONS}[cfg.label]
        ckpt = Path(cfg.checkpoint)
        source = f"{ckpt.parent.name}/{ckpt.name}" if ckpt.name == "ckpt.pt" else ckpt.name  # run/ckpt.pt
        backbone = f"random-init {cfg.size} encoder" if cfg.random_init else \
            f"{vjepa.preset_name(ec)} encoder of {source}"
        task = f"the {cfg.label} label" if cfg.data == "synthetic" else Path(cfg.val_list or cfg.val_dir).name
        save_confusion(out / "confusion.png", pred, label, num_classes, names,
                       f"probe of {task}\non the frozen {backbone}")
    (out / "results.json").write_text(json.dumps(res, indent=2))
    top5 = f", top-5 {res['top5']:.2f}%" if "top5" in res else ""
    items = {"synthetic": "clips", "videos": "readable videos", "images": "images"}[cfg.data]
    print(f"val top-1 {res['top1']:.2f}% (chance {100 / num_classes:.1f}%){top5} over {res['readable']} "
          f"{items}; results in {out}/")
    if res["unreadable"] or train_errors:
        print(f"unreadable videos: {res['unreadable']} in validation, NOT in that denominator (top-1 "
              f"counting them as wrong: {res['top1_unreadable_as_wrong']:.2f}%); {len(train_errors)} skipped "
              f"in training; listed in results.json")
    return res


def default_out(cfg: ProbeConfig) -> Path:
    """Where a probe writes when --out is not given: one folder per backbone and task, so that probing
    another label, list or label fraction never overwrites earlier results. runs/tiny/ckpt.pt probed for
    motion -> runs/tiny/probe-motion; a released or official checkpoint -> runs/<its name>/probe-<task>."""
    if cfg.random_init:
        run = Path("runs") / f"random-{cfg.size}"
    elif Path(cfg.checkpoint).name == "ckpt.pt":  # a run folder of train.py
        run = Path(cfg.checkpoint).parent
    else:
        run = Path("runs") / Path(cfg.checkpoint).name.split(".")[0]
    task = {"synthetic": cfg.label, "videos": Path(cfg.val_list).stem,
            "images": "-".join(Path(cfg.val_dir).resolve().parts[-2:])}[cfg.data]
    if cfg.train_fraction < 1:
        task += f"-{100 * cfg.train_fraction:g}pct"
    if cfg.epochs == 0:  # evaluating a given probe: keep apart from a trained one's results
        task += "-eval"
    return run / f"probe-{task}"


def main(argv: list[str] | None = None):
    cfg = parse_args(argv)
    try:
        probe(cfg)
    except (ValueError, OSError) as e:  # bad input (data.DataError is a ValueError), full disk: no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
