"""V-JEPA: the model and its latent objective, in the order of the paper.

Bardes et al., "Revisiting Feature Prediction for Learning Visual Representations from Video",
arXiv 2404.08471 (2024). The official implementation is facebookresearch/jepa; this file is written
from the paper and from facts read off that code (file names cited where they matter), never copied from it.

Symbol map (paper -> code)
    x, y            a clip split into context tokens x and target tokens y by a mask (masking.py)
    E_theta         `VJEPA.encoder`          context encoder, trained by gradient descent
    E_bar_theta     `VJEPA.target_encoder`   exponential moving average of E_theta, never gets gradients
    P_phi           `VJEPA.predictor`        narrow transformer predicting target features
    Delta_y         `Predictor.mask_tokens`  learned mask token, one per mask generator
    sg(.)           `torch.no_grad()`        stop-gradient on the targets
    L1 objective    `VJEPA.forward`          mean |P_phi(E_theta(x), Delta_y) - sg(E_bar_theta(x, y))|

Shape legend
    B  batch        T, H, W   frames, height, width of the clip (B, 3, T, H, W)
    t, h, w         token grid = (T / tubelet, H / patch, W / patch)
    N = t*h*w       tokens per clip, time-major: index = t_i*h*w + row*w + col (masks use this order)
    N_ctx, N_tgt    context / target tokens kept by one mask generator
    D, D_p          encoder width, predictor width;  nh, hd = heads, head dim
"""
from __future__ import annotations

import math
import re
import sys
import urllib.parse
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------
# 1. Positions: a fixed 3D sin-cos table (official src/models/utils/pos_embs.py). No CLS token, nothing
#    learned.


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): all sines first, then all cosines, as in the official code."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = pos.double()[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, dim)


def sincos_3d(dim: int, t: int, h: int, w: int) -> torch.Tensor:
    """(1, t*h*w, dim) table in time-major token order.

    "Uniform power": each axis gets ceil(dim/6)*2 dims, concatenated as [time, height, width] and
    truncated to dim (ViT-L: 3*342 = 1026 -> last 2 dropped). Computed in float64 like the official numpy.
    """
    d_axis = math.ceil(dim / 6) * 2
    gt, gh, gw = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    parts = [sincos_1d(d_axis, g.flatten()) for g in (gt, gh, gw)]  # 3 x (N, d_axis)
    return torch.cat(parts, dim=1)[:, :dim].float().unsqueeze(0)  # (1, N, dim)


# ----------------------------------------------------------------------------------------------------
# 2. Tubelets: a 2x16x16 space-time patch becomes one token (one Conv3d with stride = kernel).


class PatchEmbed3D(nn.Module):
    def __init__(self, dim: int, patch: int, tubelet: int, in_chans: int = 3):
        super().__init__()
        kernel = (tubelet, patch, patch)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, t, h, w)
        return rearrange(x, "b d t h w -> b (t h w) d")  # (B, N, D), time-major


# ----------------------------------------------------------------------------------------------------
# 3. The transformer block: pre-norm, fused qkv, exact GELU MLP; no dropout, drop-path or layer-scale.


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, record: list | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for each head: (B, nh, M, hd), (B, nh, N, hd) x 2 -> (B, nh, M, hd).

    The fast path is one fused (flash / memory-efficient) kernel that never forms the weights. Inside
    record_attention() the explicit path computes the same function and appends the weights to `record`."""
    if record is None:
        return F.scaled_dot_product_attention(q, k, v)  # (B, nh, M, hd)
    attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, nh, M, N)
    record.append(attn)
    return attn @ v  # (B, nh, M, hd)


@contextmanager
def record_attention(module: nn.Module):
    """`with record_attention(model) as attns: model(...)` fills attns with the weights (B, nh, M, N) of every
    attention layer in `model` (an encoder: one per block), in the order the layers ran (notebooks)."""
    layers = [m for m in module.modules() if hasattr(m, "record")]  # Attention, probe.CrossAttention
    attns = []
    for m in layers:
        m.record = attns
    try:
        yield attns
    finally:
        for m in layers:
            m.record = None


class Attention(nn.Module):
    record: list | None = None  # set by record_attention(): take the explicit path, keep the weights

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three nh hd) -> three b nh n hd", three=3, nh=self.heads)
        out = attend(q, k, v, self.record)  # (B, nh, N, hd)
        return self.proj(rearrange(out, "b nh n hd -> b n (nh hd)"))  # (B, N, D)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the official models
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens, (B, K) indices -> (B, K, C): the tokens each sample keeps."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------------------------------
# 4. Config and presets. Sizes follow the paper's Table; the predictor is 12 blocks of width 384 with the
#    encoder's head count (official src/models/predictor.py). Any preset can be rebuilt at another input
#    size with replace().


@dataclass(frozen=True)
class ModelConfig:
    frames: int = 16  # T
    img_size: int = 224  # H = W
    patch: int = 16
    tubelet: int = 2
    dim: int = 1024  # D
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    pred_dim: int = 384  # D_p
    pred_depth: int = 12
    num_mask_tokens: int = 2  # one learned mask token per mask generator
    # LayerNorm eps of the encoder: 1e-6 in the official ViT presets (vit_large, vit_huge: the released
    # weights); nn.LayerNorm's 1e-5 in the official VisionTransformer class built directly, as the small model
    # in reference/ (reference/README.md). The predictor always uses 1e-6.
    norm_eps: float = 1e-6
    # What the predictor regresses. "features": V-JEPA (L1 to the EMA encoder's layer-normed features).
    # "pixels": the paper's baseline (section 4.1), MSE to the per-tubelet normalised pixels of the targets,
    # with the same masks, encoder and predictor (only predictor_proj's output width changes).
    target: str = "features"

    def __post_init__(self):
        if self.target not in ("features", "pixels"):
            raise ValueError(f"target must be 'features' or 'pixels', got {self.target!r}")
        if self.frames % self.tubelet or self.img_size % self.patch:
            raise ValueError(f"frames {self.frames} must divide by tubelet {self.tubelet} and img_size "
                             f"{self.img_size} by patch {self.patch}")
        if self.dim % self.heads or self.pred_dim % self.heads:
            raise ValueError(f"dim {self.dim} and pred_dim {self.pred_dim} must divide by heads {self.heads}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames // self.tubelet, self.img_size // self.patch, self.img_size // self.patch)

    @property
    def pixels_per_token(self) -> int:
        return 3 * self.tubelet * self.patch * self.patch

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


PRESETS: dict[str, ModelConfig] = {
    #                        T   px  patch  D    depth heads   D_p  pred_depth
    # tiny: a laptop model, 4x8x8 = 256 tokens; one CPU training step at batch 16 takes ~0.6 s on 2 cores
    "tiny": ModelConfig(frames=8, img_size=64, patch=8, dim=192, depth=4, heads=4, pred_dim=96, pred_depth=2),
    "vitb16": ModelConfig(dim=768, depth=12, heads=12),
    "vitl16": ModelConfig(dim=1024, depth=24, heads=16),
    "vith16": ModelConfig(dim=1280, depth=32, heads=16),
    "vith16_384": ModelConfig(img_size=384, dim=1280, depth=32, heads=16),
}


def preset_name(cfg: ModelConfig) -> str:
    """The preset whose size a config has (for messages), or 'custom'."""
    return next((name for name, p in PRESETS.items() if same_size(cfg, p)), "custom")


def same_size(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal in every field but the training objective (target, number of mask tokens), which leaves the
    encoder unchanged: a pixel-target or random-tube tiny model is still 'tiny'."""
    return replace(a, target=b.target, num_mask_tokens=b.num_mask_tokens) == b


# ----------------------------------------------------------------------------------------------------
# 5. Encoder E: tubelets + positions -> keep the given tokens -> blocks -> LayerNorm.


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed3D(cfg.dim, cfg.patch, cfg.tubelet)
        self.register_buffer("pos_embed", sincos_3d(cfg.dim, *cfg.grid))  # (1, N, D), fixed
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.norm_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.grad_checkpointing = False  # recompute block activations in backward (train.py --checkpoint-act)

    def check_clip(self, clip: torch.Tensor):
        c = self.cfg
        expected = (3, c.frames, c.img_size, c.img_size)
        if clip.ndim != 5 or tuple(clip.shape[1:]) != expected:
            raise ValueError(f"expected a clip of shape (B, {', '.join(map(str, expected))}) for this model "
                             f"(frames={c.frames}, img_size={c.img_size}), got {tuple(clip.shape)}")

    def tokens(self, clip: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, N, D): tubelet tokens with their positions, before any masking."""
        self.check_clip(clip)
        return self.patch_embed(clip) + self.pos_embed  # (B, N, D)

    def forward(self, clip: torch.Tensor, keep: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the tokens listed in `keep` (B, N_ctx), or all N tokens when keep is None.

        `tokens` lets a caller pass precomputed `self.tokens(clip)` (the context encoder embeds once for
        both mask generators).
        """
        x = self.tokens(clip) if tokens is None else tokens  # (B, N, D)
        if keep is not None:
            check_indices(keep, x.shape[0], x.shape[1], "keep")
            x = gather_tokens(x, keep)  # (B, N_ctx, D)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)  # trade ~1/3 more compute for activation memory
            else:
                x = blk(x)
        return self.norm(x)  # (B, N', D)


def check_indices(idx: torch.Tensor, batch: int, n: int, what: str):
    if idx.dtype != torch.int64 or idx.ndim != 2 or idx.shape[0] != batch:
        raise ValueError(f"{what} indices must be an int64 tensor of shape (B={batch}, K), "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    # Values are checked on CPU tensors only: on a GPU the check would cost a host sync per call (train.py
    # moves masks to the GPU; masking.py makes them in range by construction).
    if idx.numel() and idx.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = idx.min().item(), idx.max().item()
        if lo < 0 or hi >= n:
            raise ValueError(f"{what} indices must lie in [0, {n}) for this model's {n} tokens, "
                             f"got values in [{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------------
# 6. Predictor P: narrow transformer. Context tokens (projected to D_p) and one mask token per target
#    position, each with the predictor's own sin-cos position, go through the blocks together; the outputs
#    at the target slots are projected back to D. No sorting is needed: attention is unmasked and the
#    positions enter additively, so token order does not change the function.


class Predictor(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.predictor_embed = nn.Linear(cfg.dim, cfg.pred_dim)
        self.register_buffer("predictor_pos_embed", sincos_3d(cfg.pred_dim, *cfg.grid))  # (1, N, D_p)
        self.mask_tokens = nn.ParameterList(
            nn.Parameter(torch.zeros(1, 1, cfg.pred_dim)) for _ in range(cfg.num_mask_tokens))
        self.predictor_blocks = nn.ModuleList(
            Block(cfg.pred_dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.pred_depth))
        self.predictor_norm = nn.LayerNorm(cfg.pred_dim, eps=1e-6)
        out = cfg.dim if cfg.target == "features" else cfg.pixels_per_token
        self.predictor_proj = nn.Linear(cfg.pred_dim, out)

    def forward(self, z: torch.Tensor, ctx: torch.Tensor, tgt: torch.Tensor,
                mask_index: int = 0) -> torch.Tensor:
        """z (B, N_ctx, D) context features at indices ctx (B, N_ctx) -> predictions (B, N_tgt, D) at tgt."""
        B, n_ctx = ctx.shape
        check_indices(tgt, B, self.cfg.num_tokens, "target")
        pos = self.predictor_pos_embed.expand(B, -1, -1)  # (B, N, D_p)
        x = self.predictor_embed(z) + gather_tokens(pos, ctx)  # (B, N_ctx, D_p)
        m = self.mask_tokens[mask_index] + gather_tokens(pos, tgt)  # (B, N_tgt, D_p)
        x = torch.cat([x, m.to(x.dtype)], dim=1)  # (B, N_ctx + N_tgt, D_p)
        for blk in self.predictor_blocks:
            x = blk(x)  # (B, N_ctx + N_tgt, D_p)
        return self.predictor_proj(self.predictor_norm(x[:, n_ctx:]))  # (B, N_tgt, D)


# ----------------------------------------------------------------------------------------------------
# 7. Initialisation. Choice (official app/vjepa/utils.py vs the model files): we follow what the official
#    *trainer* effectively runs, since that produced the published numbers and released weights: every Linear
#    ~ N(0, 0.02) truncated at +-2 (absolute, so practically untruncated), biases 0, LayerNorm 1/0, Conv3d
#    trunc-normal 0.02, mask tokens 0. The official model code's extra 1/sqrt(2*layer_id) rescaling of
#    attn.proj and mlp.fc2 is undone by that trainer's re-initialisation, so we do not apply it (V-JEPA 2 kept
#    it).


@torch.no_grad()
def init_weights(module: nn.Module):
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for p in getattr(module, "mask_tokens", []):
        nn.init.zeros_(p)


# ----------------------------------------------------------------------------------------------------
# 8. V-JEPA: targets from the EMA encoder on the full clip, context per mask generator, prediction, L1.


def tubelets(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, C*tubelet*patch^2): each token's pixels, in PatchEmbed3D's token order."""
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)",
                     pt=cfg.tubelet, ph=cfg.patch, pw=cfg.patch)


class VJEPA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.predictor = Predictor(cfg)
        init_weights(self.encoder)
        init_weights(self.predictor)
        self.target_encoder = Encoder(cfg)
        self.target_encoder.load_state_dict(self.encoder.state_dict())  # E_bar starts equal to E
        self.target_encoder.requires_grad_(False)  # no gradient ever reaches the target encoder

    def forward(self, clip: torch.Tensor, masks: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """clip (B, 3, T, H, W); masks: one (context (B, N_ctx), target (B, N_tgt)) index pair per generator.

        Returns {"loss": scalar, "pred_std": scalar} as tensors (no host sync); train.py logs pred_std.
        """
        # 1. Targets for every token: E_bar on the FULL clip under sg(.), layer-normed over features
        #    (no affine); or, for the pixel baseline, each tubelet's pixels normalised by their own mean/std.
        with torch.no_grad():
            if self.cfg.target == "features":
                h = self.target_encoder(clip)  # (B, N, D)
                h = F.layer_norm(h, (h.shape[-1],))  # (B, N, D)
            else:
                h = self.tubelet_pixels(clip)  # (B, N, 3*tubelet*patch^2)
        tokens = self.encoder.tokens(clip)  # (B, N, D), embedded once, shared by the generators
        losses, preds = [], []
        for i, (ctx, tgt) in enumerate(masks):  # one pass per mask generator (short-, long-range)
            # 2. Context: E_theta sees only the context tokens of this generator.
            z = self.encoder(clip, keep=ctx, tokens=tokens)  # (B, N_ctx, D)
            # 3. Prediction: P_phi fills mask token i at the target positions.
            p = self.predictor(z, ctx, tgt, mask_index=i)  # (B, N_tgt, D)
            # 4. Regression at the target tokens: L1 for features (paper eq. 1), MSE for pixels.
            err = p.float() - gather_tokens(h, tgt).float()  # (B, N_tgt, D)
            losses.append(err.abs().mean() if self.cfg.target == "features" else err.pow(2).mean())
            preds.append(p.detach())
        losses = torch.stack(losses)  # (G,)
        return {
            "loss": losses.mean(),
            # collapse monitor: spread of predictions across tokens (targets have unit spread per token)
            "pred_std": torch.stack([p.float().std(dim=1).mean() for p in preds]).mean(),
        }

    def tubelet_pixels(self, clip: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, N, 3*tubelet*patch^2): each token's pixels, normalised per token (as MAE's
        norm_pix_loss), in the token order of PatchEmbed3D."""
        x = tubelets(clip, self.cfg)  # (B, N, P)
        return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()  # (B, N, P)

    @torch.no_grad()
    def update_target(self, momentum: float):
        """EMA of the context encoder: theta_bar <- m * theta_bar + (1 - m) * theta (paper section 3.1).

        One fused multi-tensor op per line instead of a Python loop over ~300 parameters.
        """
        tgt = list(self.target_encoder.parameters())
        src = list(self.encoder.parameters())
        torch._foreach_mul_(tgt, momentum)
        torch._foreach_add_(tgt, src, alpha=1.0 - momentum)

    def num_params(self) -> dict[str, int]:
        """Trainable parameters, as the paper counts them (the fixed position tables are buffers)."""
        return {"encoder": sum(p.numel() for p in self.encoder.parameters()),
                "predictor": sum(p.numel() for p in self.predictor.parameters())}


# ----------------------------------------------------------------------------------------------------
# 9. Official checkpoints. Our attribute names are the official ones, so loading is a prefix strip and a
#    strict load. weights_only=True: a checkpoint from the internet cannot run code when it is loaded.

OFFICIAL_PREFIX = "module.backbone."


def strip_prefix(state: dict, prefix: str = OFFICIAL_PREFIX) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_strict(module: nn.Module, state: dict, what: str, cfg: ModelConfig):
    """load_state_dict(strict=True), but a mismatch names the preset, the key and both shapes."""
    own = module.state_dict()
    name = preset_name(cfg)
    for k, v in own.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{what} does not fit preset '{name}': first mismatching key '{k}' has shape "
                             f"{tuple(state[k].shape)} in the checkpoint but {tuple(v.shape)} in the model")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{what} does not fit preset '{name}' (a different depth?): missing keys "
                         f"{missing[:3]}, unexpected keys {unexpected[:3]}")
    bad = next((k for k, v in state.items()
                if v.is_floating_point() and not v.is_meta and not torch.isfinite(v).all()), None)
    if bad is not None:  # a diverged run's weights give features, and accuracies, that mean nothing
        raise ValueError(f"{what}: weight '{bad}' holds NaN or inf (the run that wrote it diverged)")
    module.load_state_dict(state, strict=True)


# Meta's released pretraining checkpoints (facebookresearch/jepa README), by preset. Wherever a checkpoint
# path is expected, one of these names works too: the file (several GB) is downloaded once, with a progress
# bar, into torch's hub cache (<torch.hub.get_dir()>/checkpoints, i.e. $TORCH_HOME/hub) and reused after.
RELEASED = {"vitl16": "https://dl.fbaipublicfiles.com/jepa/vitl16/vitl16.pth.tar",
            "vith16": "https://dl.fbaipublicfiles.com/jepa/vith16/vith16.pth.tar",
            "vith16_384": "https://dl.fbaipublicfiles.com/jepa/vith16-384/vith16-384.pth.tar"}


def cached_download(url: str) -> Path:
    """The file at `url`, fetched on first use into <hub>/checkpoints/<its folder>/<its name>."""
    folder, name = urllib.parse.urlparse(url).path.split("/")[-2:]
    path = Path(torch.hub.get_dir()) / "checkpoints" / folder / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {url} to {path} (once; later runs reuse it)", file=sys.stderr)
        try:  # torch writes to a temporary file and renames it when complete: no half file stays behind
            torch.hub.download_url_to_file(url, str(path), progress=True)
        except OSError as e:  # no network, 404, disk full
            raise ValueError(f"could not download {url}: {e}") from e
    return path


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file, or a RELEASED name (downloaded on first use; a file of that name wins)."""
    if str(path) in RELEASED and not Path(path).exists():
        path = cached_download(RELEASED[str(path)])
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # our words, not torch's advice to retry with weights_only=False (unsafe)
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:  # a pickle that names Python objects: loading it could run code
            raise ValueError(f"could not read checkpoint {path}: it holds a Python object ({found[1]}), not "
                             "only tensors; refused, since loading it could run code") from None
        raise ValueError(f"could not read checkpoint {path}: not a PyTorch checkpoint, or a truncated or "
                         f"damaged one ({type(e).__name__}: {str(e).split('. ')[0][:200]})") from None


def model_config_of(ckpt: dict, path: str | Path) -> ModelConfig:
    """The ModelConfig stored in one of this project's checkpoints, checked field by field: a file written by
    another version of this code (a field unknown here, or of another type) is named as such."""
    stored, defaults = ckpt["model_config"], asdict(ModelConfig())
    for k, v in (stored.items() if isinstance(stored, dict) else [("model_config", stored)]):
        want = type(defaults[k]) if k in defaults else None
        if want is None or isinstance(v, bool) or not isinstance(v, (int, float) if want is float else want):
            what = "unknown here" if want is None else f"not a {want.__name__}"
            raise ValueError(f"{path} was written by another version of this code: its model_config field "
                             f"{k}={v!r} is {what}")
    return ModelConfig(**stored)


def load_official(path: str | Path, cfg: ModelConfig | str | None = None) -> VJEPA:
    """Build a VJEPA for `cfg` (a ModelConfig or a preset name) and fill it from an official pretraining
    checkpoint {"encoder", "predictor", "target_encoder", ...} with keys prefixed 'module.backbone.'.
    `path` may be a RELEASED name: load_official("vitl16") downloads Meta's ViT-L/16 once and loads it."""
    cfg = official_config(path, cfg)
    ckpt = read_checkpoint(path)
    parts = ("encoder", "predictor", "target_encoder")
    if not isinstance(ckpt, dict) or not all(p in ckpt for p in parts):
        found = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a V-JEPA pretraining checkpoint: expected keys {parts}, "
                         f"found {found}")
    model = VJEPA(cfg)
    for part in parts:
        load_strict(getattr(model, part), strip_prefix(ckpt[part]), f"{path} [{part}]", cfg)
    return model


def official_config(path: str | Path, cfg: ModelConfig | str | None) -> ModelConfig:
    """The config to build for an official checkpoint: given, or the preset a RELEASED name stands for."""
    if cfg is None and str(path) in RELEASED:
        cfg = str(path)
    if cfg is None:
        raise ValueError(f"{path} is an official checkpoint: name its preset (e.g. 'vitl16', 'vith16')")
    return PRESETS[cfg] if isinstance(cfg, str) else cfg


def load_target_encoder(path: str | Path, cfg: ModelConfig | str | None = None) -> Encoder:
    """The frozen-evaluation backbone (paper section 4: downstream uses the target encoder's weights).

    Reads this project's training checkpoints (self-describing: the config is inside, `cfg` may be None)
    and official pretraining checkpoints (`cfg` names the preset they were trained with; for a RELEASED
    name such as "vitl16" it may be None).
    """
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and "model_config" in ckpt and "model" in ckpt:  # ours (train.py)
        own = model_config_of(ckpt, path)
        if cfg is not None:
            want = PRESETS[cfg] if isinstance(cfg, str) else cfg
            if not same_size(own, want):  # only the encoder is loaded: the objective may differ
                raise ValueError(f"{path} holds a '{preset_name(own)}' model ({own}), not the requested "
                                 f"'{preset_name(want)}'")
        enc = Encoder(own)
        state = {k.removeprefix("target_encoder."): v for k, v in ckpt["model"].items()
                 if k.startswith("target_encoder.")}
        load_strict(enc, state, f"{path} [target_encoder]", own)
        return enc.eval().requires_grad_(False)
    if isinstance(ckpt, dict) and "target_encoder" in ckpt:  # official
        cfg = official_config(path, cfg)
        enc = Encoder(cfg)
        load_strict(enc, strip_prefix(ckpt["target_encoder"]), f"{path} [target_encoder]", cfg)
        return enc.eval().requires_grad_(False)
    found = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"{path} is not a V-JEPA checkpoint (neither this project's nor an official pretraining "
                     f"one): found keys {found}")
