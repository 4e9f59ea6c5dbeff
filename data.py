"""Data for V-JEPA: a built-in synthetic video dataset, real video and images, and the training stream.

    SyntheticVideos    procedural clips with an appearance and a motion label; no download
    VideoList          real video from a list file in the official format (`path label` per line)
    ImageFolder        root/<class>/<image>, each image repeated along time (the official image evaluation)
    StepSampler        the dataset indices of every step: a pure function of (seed, step, rank)
    TrainStream        the augmented training view of (step, index); skips unreadable videos
    make_train_loader  the DataLoader train.py iterates; each batch is masking.MaskCollator's dict
    ProbeItems         the items of a frozen evaluation (probe.py): views and segments, unreadable ones kept
    folder_list, ssv2_list   list files for real datasets (`python data.py --help`)

Frame sampling and augmentation follow the official src/datasets/video_dataset.py and configs/pretrain/. Every
clip is float32 (3, T, H, W), normalised with the ImageNet mean and std. Bad input raises DataError naming the
file.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import threading
from collections import defaultdict
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from masking import MaskCollator, rng_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIDEO_CROP = ((0.3, 1.0), (0.75, 1.35))  # (area scale, aspect ratio) of the pretraining crop, official
IMAGE_CROP = ((0.08, 1.0), (3 / 4, 4 / 3))  # the usual ImageNet random-resized-crop, for image probes
AUGMENT_STREAM, RETRY_STREAM, SAMPLER_STREAM = 7, 8, 9  # rng_for streams (the mask generators use 0, 1)
MAX_LABEL = 100_000  # a list label above this is a typo, not a class (ImageNet-21k has 21,841)
MAX_RETRIES = 50  # unreadable videos in a row for one training sample before the data is called broken


class DataError(ValueError):
    """Bad input data. The message names the file (and the line, for list files)."""

    def __init__(self, message: str):
        # Raised in a DataLoader worker, it is rebuilt in the main process from "Caught DataError in
        # DataLoader worker process 0.\nOriginal Traceback ...\ndata.DataError: <message>" (torch/_utils.py,
        # ExceptionWrapper.reraise): keep the one line the worker raised, as with workers=0.
        if message.startswith("Caught DataError"):
            message = message.rsplit("DataError: ", 1)[-1].strip()
        super().__init__(message)


def normalise(clip: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) in [0, 1] -> ImageNet-normalised float32."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return ((clip - mean) / std).float()


# Decoded frames stay uint8 (T, 3, H, W), channels-last in memory, until the last step: interpolate's
# antialiased uint8 path is about 8x faster than float on CPU, and the rounding costs at most 1/255.


def to_frames(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 array -> (T, 3, H, W) uint8 tensor, a view."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, 3, H, W)


def to_clip(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (3, T, H, W) normalised float32: a model input."""
    return normalise(frames.transpose(0, 1).float() / 255)  # (3, T, H, W)


def resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased (nearly every resize here shrinks): (T, 3, H, W) -> (T, 3, *size)."""
    return F.interpolate(frames, size=size, mode="bilinear", antialias=True)


def short_side_resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (T, 3, H, W) so that the shorter side is `size`, keeping the aspect ratio."""
    h, w = frames.shape[2:]
    return resize(frames, (size, round(w * size / h)) if h <= w else (round(h * size / w), size))


def random_crop_box(h: int, w: int, rng: np.random.Generator, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, height, width): area ~ U(scale) of the frame, aspect w/h log-uniform in `ratio`; after
    10 boxes that do not fit, the largest centred box with an aspect inside `ratio`."""
    for _ in range(10):
        area, aspect = h * w * rng.uniform(*scale), math.exp(rng.uniform(*np.log(ratio)))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    aspect = min(max(w / h, ratio[0]), ratio[1])
    ch, cw = min(h, round(w / aspect)), min(w, round(h * aspect))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def augment(frames: torch.Tensor, size: int, rng: np.random.Generator, crop=VIDEO_CROP,
            flip: bool = True) -> torch.Tensor:
    """Training view of uint8 (T, 3, H, W) frames: one random-resized-crop box for every frame, resized to
    size x size, a horizontal flip with p=0.5 (unless flip=False) -> (3, T, size, size) normalised."""
    top, left, ch, cw = random_crop_box(*frames.shape[2:], rng, *crop)
    frames = resize(frames[:, :, top:top + ch, left:left + cw], (size, size))  # (T, 3, size, size)
    flipped = rng.random() < 0.5  # drawn either way, so flip=False leaves the crops of a seed unchanged
    return to_clip(frames.flip(3) if flip and flipped else frames)


# ----------------------------------------------------------------------------------------------------
# Synthetic videos. Everything lives on a torus (positions wrap around the frame edges), so an object that
# starts uniformly anywhere is uniformly anywhere in every frame, whatever its motion.

SHAPES = ("square", "triangle", "cross", "half-disc")  # none is round, so a rotation is visible
TEXTURES = ("solid", "striped")
APPEARANCES = tuple(f"{t} {s}" for s in SHAPES for t in TEXTURES)  # class = 2 * shape + texture
MOTIONS = ("right", "left", "down", "up", "clockwise", "anticlockwise", "sway left-right", "sway up-down")
MIRRORED_MOTION = (1, 0, 2, 3, 5, 4, 6, 7)  # the motion class of a horizontally flipped clip
# Three scenes. "clean" (the laptop default) is a large object over a still background, so that predicting a
# hidden region means knowing where the object is and where it goes; "cluttered" adds what is
# unpredictable in pixels (a drifting background, distractor blobs, per-pixel noise) around a smaller object;
# "fast" is the clean scene with every motion 2.5x as fast (README "Motion: not learned at this scale").
CLEAN = {"radius": (0.19, 0.35), "drift": False, "blobs": False, "noise": False, "speed": 1.0}
SCENES = {"clean": CLEAN,
          "cluttered": {"radius": (0.12, 0.22), "drift": True, "blobs": True, "noise": True, "speed": 1.0},
          "fast": {**CLEAN, "speed": 2.5}}


class SyntheticVideos(torch.utils.data.Dataset):
    """Built-in procedural video dataset, no download; deterministic from (seed, index).

    One main object, a hard-edged flat shape with a random colour and size, moves over a background. Two
    labels per clip:
      appearance (8) = shape (square, triangle, cross, half-disc) x texture (solid, or dark stripes fixed
        to the object). Readable from any single frame.
      motion (8) = translate right / left / down / up, rotate clockwise / anticlockwise, or sway left-right /
        up-down (a sine of period 4-8 frames: it turns back within 8 frames); speeds are random. Not
        readable from one frame: the scene's random numbers are drawn the same way whatever the classes, so
        frame 0 does not depend on the motion at all; and as start position and angle are uniform on the
        torus and the circle, every other frame has the same distribution under every motion too.
    Scenes (SCENES). "clean", the default: a smooth random background texture that stays still, and an
      object of radius 19-35% of the frame. "cluttered": the same texture drifting in a random direction, 3-6
      soft blobs with their own colour, size and velocity, fresh per-pixel noise in every frame (all
      irrelevant to both labels and unpredictable in pixels), and an object of radius 12-22%. "fast": the
      clean scene with 2.5x the speed, spin and sway. All scenes make the same random draws, so a clip
      differs between them only in what the scene changes.
    Labels: every aligned block of 64 indices holds each (appearance, motion) pair once, in a seeded order,
    so both labels are balanced and independent of each other.
    """
    LABELS = ("appearance", "motion")

    def __init__(self, size: int, frames: int = 8, img_size: int = 64, seed: int = 0,
                 label: str = "appearance", scene: str = "clean"):
        if label not in self.LABELS:
            raise ValueError(f"label must be one of {self.LABELS}, got {label!r}")
        if scene not in SCENES:
            raise ValueError(f"scene must be one of {tuple(SCENES)}, got {scene!r}")
        self.size, self.frames, self.img_size, self.seed, self.label = size, frames, img_size, seed, label
        self.scene = scene
        self.num_classes = {"appearance": len(APPEARANCES), "motion": len(MOTIONS)}

    def __len__(self) -> int:
        return self.size

    def labels(self, index: int) -> tuple[int, int]:
        """(appearance, motion) of clip `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} clips")
        pairs = len(APPEARANCES) * len(MOTIONS)
        pair = np.random.default_rng([self.seed, index // pairs, 1]).permutation(pairs)[index % pairs]
        return divmod(int(pair), len(MOTIONS))

    def render(self, index: int, appearance: int, motion: int, with_mask: bool = False):
        """(3, T, H, W) float32 in [0, 1]: the scene of `index` (all its random draws) with these classes;
        with_mask: also the (T, H, W) boolean map of the object's pixels in each frame."""
        T, S, scene = self.frames, self.img_size, SCENES[self.scene]
        rng = np.random.default_rng([self.seed, index, 0])  # the same draws in every scene and class
        t, grid = np.arange(T, dtype=np.float32), np.arange(S, dtype=np.float32)

        def offsets(cy, cx):  # (..., T) centres -> (..., T, S, 1), (..., T, 1, S) signed offsets on the torus
            dy, dx = [(grid - np.float32(c)[..., None] + S / 2) % S - S / 2 for c in (cy, cx)]  # (..., T, S)
            return dy[..., :, None], dx[..., None, :]

        # background: periodic low-pass noise between two colours, drifting by whole pixels
        ky, kx = np.fft.fftfreq(S)[:, None], np.fft.rfftfreq(S)[None, :]  # (S, 1), (1, S//2+1)
        lowpass = (1 + (ky**2 + kx**2) * (S / rng.uniform(3, 8)) ** 2) ** -1.5
        g = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((S, S))) * lowpass, s=(S, S))  # (S, S)
        g = np.tile(((g - g.min()) / np.ptp(g)).astype(np.float32), (2, 2))  # (2S, 2S), periodic
        shifts = np.round(rng.uniform(-0.04, 0.04, size=(2, 1)) * S * t).astype(int) % S  # (2, T)
        shifts *= scene["drift"]  # a still background: the same shift (none) in every frame
        g = np.stack([g[dy:dy + S, dx:dx + S] for dy, dx in shifts.T])  # (T, S, S)
        c0, c1 = rng.uniform(0.15, 0.85, size=(2, 3, 1, 1, 1)).astype(np.float32)
        img = c0 + (c1 - c0) * g  # (3, T, S, S)
        # distractors: soft blobs behind the object (drawn in every scene, so the object's draws that follow
        # are the same; rendered in the cluttered one)
        k = rng.integers(3, 7)
        start, velocity = rng.uniform(0, S, size=(2, k, 1)), rng.uniform(-0.05, 0.05, size=(2, k, 1)) * S
        two_var = np.float32(2 * (rng.uniform(0.03, 0.08, size=(k, 1, 1, 1)) * S) ** 2)
        opacity = rng.uniform(0.5, 0.9, size=(k, 1, 1, 1)).astype(np.float32)
        colours = rng.uniform(0, 1, size=(k, 3, 1, 1, 1)).astype(np.float32)
        if scene["blobs"]:
            dy, dx = offsets(*(start + velocity * t))  # (k, T, S, 1), (k, T, 1, S)
            alpha = opacity * np.exp(-dy**2 / two_var) * np.exp(-dx**2 / two_var)  # (k, T, S, S), separable
            for a, colour in zip(alpha, colours):
                img += a * (colour - img)  # (3, T, S, S), "over" compositing
        # the object: its frame-0 state, then the parameters of every motion, whichever one it has
        y0, x0, angle0 = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(0, 2 * np.pi)
        radius = rng.uniform(*scene["radius"]) * S
        colour = np.float32(0.5 + 0.45 * np.cos(2 * np.pi * (rng.uniform() + np.arange(3) / 3)))  # any hue
        pace = scene["speed"]  # scales the translation speed, the spin and the sway's amplitude
        speed, spin = rng.uniform(0.02, 0.05) * S * pace, rng.uniform(0.15, 0.35) * pace  # px, rad / frame
        amplitude = rng.uniform(0.08, 0.15) * S * pace
        period, phase = rng.uniform(4, 8), rng.uniform(0, 2 * np.pi)
        sway = amplitude * (np.sin(2 * np.pi * t / period + phase) - np.sin(phase))  # 0 at t = 0
        y, x, angle = np.full(T, y0), np.full(T, x0), np.full(T, angle0)
        y, x, angle = [(y, x + speed * t, angle), (y, x - speed * t, angle), (y + speed * t, x, angle),
                       (y - speed * t, x, angle), (y, x, angle + spin * t), (y, x, angle - spin * t),
                       (y, x + sway, angle), (y + sway, x, angle)][motion]  # y is down: +angle is clockwise
        dy, dx = offsets(y, x)  # (T, S, 1), (T, 1, S)
        cos, sin = [np.float32(f(angle) / radius)[:, None, None] for f in (np.cos, np.sin)]  # (T, 1, 1)
        u, v = cos * dx + sin * dy, cos * dy - sin * dx  # (T, S, S) object coordinates, radius 1
        shape, texture = divmod(appearance, len(TEXTURES))
        inside = [np.maximum(abs(u), abs(v)) <= 0.8,
                  (v <= 0.5) & (v >= np.sqrt(3) * abs(u) - 1),  # equilateral, centroid at the centre
                  (np.minimum(abs(u), abs(v)) <= 0.3) & (np.maximum(abs(u), abs(v)) <= 0.95),
                  (u**2 + (v + 0.42) ** 2 <= 1) & (v >= -0.42)][shape]  # centroid 4/(3 pi) off the flat side
        np.copyto(img, colour[:, None, None, None], where=inside)
        if texture == 1:  # dark bands 0.4 radius wide, across the object's u axis
            dark = inside & ((u * 2.5 + 10).astype(int) % 2 == 1)
            np.copyto(img, 0.3 * colour[:, None, None, None], where=dark)
        # uniform noise shared by the channels: as unpredictable as Gaussian noise, and cheaper
        if scene["noise"]:
            img += np.float32(rng.uniform(0.05, 0.25)) * (rng.random((T, S, S), dtype=np.float32) - 0.5)
        np.clip(img, 0, 1, out=img)
        return (img, inside) if with_mask else img

    def sample(self, index: int) -> tuple[torch.Tensor, dict[str, int]]:
        """(3, T, H, W) normalised clip, {"appearance": a, "motion": m}."""
        appearance, motion = self.labels(index)
        clip = normalise(torch.from_numpy(self.render(index, appearance, motion)))
        return clip, {"appearance": appearance, "motion": motion}

    def load(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        """Training view: a horizontal flip with p=0.5. A flip turns right into left and clockwise into
        anticlockwise, so the motion label follows it; every appearance class is mirror-symmetric."""
        clip, labels = self.sample(index)
        if rng.random() < 0.5:
            clip, labels["motion"] = clip.flip(3), MIRRORED_MOTION[labels["motion"]]
        return clip, labels[self.label]

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        clip, labels = self.sample(index)
        return clip, labels[self.label]


# ----------------------------------------------------------------------------------------------------
# Real video: PyAV decoding of just the frames a clip needs.


def window_indices(n: int, start: int, frames: int, frame_step: int) -> np.ndarray:
    """(frames,) indices in a window of frames * frame_step frames from `start`, by linspace as the official
    loader (16 x 4: stride 64/15 = 4.27). Past the end of a short video, the last frame repeats."""
    end = start + frames * frame_step
    return np.linspace(start, end, frames).clip(max=end - 1).astype(np.int64).clip(max=n - 1)


def decode(path: Path, where: str, pick) -> np.ndarray:
    """uint8 (*shape, H, W, 3): the frames pick(n) -> int array of `shape` of a video with n frames.

    Seeks to the keyframe before the first frame needed and stops after the last, so a clip costs about
    its window (plus part of a GOP) of decoding. Frames are located by timestamp; an index the stream never
    reaches (a header that overstates the length) gets the last frame, like the padding of short videos.
    """
    if not path.is_file():
        raise DataError(f"{where}: video file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{where}: empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{where}: no video stream (streams: {[s.type for s in container.streams]})")
            stream = container.streams.video[0]
            if not (stream.average_rate or stream.guessed_rate):
                raise DataError(f"{where}: unknown frame rate, cannot locate frames")
            n = stream.frames or sum(p.size > 0 for p in container.demux(stream))  # else count packets
            idx = pick(n)
            got = seek_and_decode(container, stream, np.unique(idx), where)
            arrays = {id(f): f.to_ndarray(format="rgb24") for f in got.values()}  # each distinct frame once
    except av.FFmpegError as e:
        raise DataError(f"{where}: cannot decode ({e})") from e
    out = np.stack([arrays[id(got[i])] for i in idx.ravel()])  # (K, H, W, 3)
    return out.reshape(*idx.shape, *out.shape[1:])  # (*shape, H, W, 3)


def seek_and_decode(container, stream, wanted: np.ndarray, where: str) -> dict:
    """{i: frame} for sorted frame indices `wanted`; frame i has timestamp start + i / rate."""
    rate, base, origin = stream.average_rate or stream.guessed_rate, stream.time_base, stream.start_time or 0

    def scan(first: int) -> dict | None:  # decoding from the keyframe at or before frame `first`
        container.seek(origin + int(first / rate / base), stream=stream)
        got, prev, j = {}, None, 0
        for frame in container.decode(stream):
            if frame.pts is None:
                raise DataError(f"{where}: a frame without a timestamp, cannot locate frames")
            i = round((frame.pts - origin) * base * rate)
            if prev is None and i > first > 0:
                return None  # the seek overshot (an inaccurate index)
            while j < len(wanted) and wanted[j] <= i:  # (a gap in the timestamps gets what was on screen)
                got[int(wanted[j])], j = frame if wanted[j] == i or prev is None else prev, j + 1
            if j == len(wanted):
                return got
            prev = frame
        if prev is None:
            raise DataError(f"{where}: no frame could be decoded")
        return got | {int(w): prev for w in wanted[j:]}  # past the end: repeat the last frame

    got = scan(int(wanted[0]))
    return got if got is not None else scan(0)


class VideoList(torch.utils.data.Dataset):
    """Real video from a list file in the official format: one `path label` per line, space-separated, no
    header (also a CSV with a header line `path,label`). Relative paths resolve against the list file's
    folder. Videos are checked when loaded, not listed, so a 2M-line list opens at once.

    A clip is `frames` frames from a window of frames * frame_step. Training view (load): a random window,
    one random-resized-crop box, a flip with p=0.5. Evaluation (train=False, eval_views): centred windows,
    the short side resized to img_size, then centre (or left/centre/right) crops.
    """

    def __init__(self, list_path, frames: int = 16, frame_step: int = 4, img_size: int = 224,
                 train: bool = True, flip: bool = True):
        self.list_path, self.frames, self.frame_step = Path(list_path), frames, frame_step
        # flip=False for probes: the official probe training does not flip (SSv2 has left/right classes)
        self.img_size, self.train, self.flip = img_size, train, flip
        if not self.list_path.is_file():
            raise DataError(f"{self.list_path}: list file not found")
        raw = self.list_path.read_bytes()
        try:
            lines = raw.decode("utf-8-sig").splitlines()  # -sig: a spreadsheet CSV starts with a BOM
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise DataError(f"{self.list_path}:{line}: not UTF-8 text (byte {raw[e.start]:#x}); save the "
                            "list as UTF-8") from None
        header = bool(lines) and lines[0].strip().lower() == "path,label"
        rows = csv.reader(lines[1:]) if header else (line.rsplit(maxsplit=1) for line in lines)
        self.items, self.line_numbers = [], []
        for number, (line, fields) in enumerate(zip(lines[header:], rows), start=1 + header):
            if not line.strip():
                continue
            if len(fields) != 2:
                raise DataError(f"{self.list_path}:{number}: expected 'path label', got {line!r}")
            label = fields[1].strip()
            if not (label.isascii() and label.isdigit() and int(label) < MAX_LABEL):  # not "²", "-1", "1e12"
                raise DataError(f"{self.list_path}:{number}: the label must be an integer in "
                                f"[0, {MAX_LABEL:,}), got {line!r}")
            self.items.append((self.list_path.parent / fields[0].strip(), int(label)))
            self.line_numbers.append(number)
        if not self.items:
            raise DataError(f"{self.list_path}: the list names no videos")
        self.num_classes = max(label for _, label in self.items) + 1

    def __len__(self) -> int:
        return len(self.items)

    def where(self, index: int) -> str:
        return f"{self.items[index][0]} ({self.list_path}:{self.line_numbers[index]})"

    def load(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        """Training view (3, T, img_size, img_size), label; DataError on a bad video."""
        span = self.frames * self.frame_step
        frames = decode(self.items[index][0], self.where(index), lambda n: window_indices(
            n, int(rng.integers(0, max(n - span, 0) + 1)), self.frames, self.frame_step))  # (T, H, W, 3)
        return augment(to_frames(frames), self.img_size, rng, flip=self.flip), self.items[index][1]

    def eval_views(self, index: int, segments: int, views: int) -> torch.Tensor:
        """(views, segments, 3, T, S, S), S = img_size: windows centred in `segments` equal parts of the
        video (overlapping when the video is short); the short side resized to S, then `views` crops spread
        along the long side (3: left/top, centre, right/bottom; 1: centre)."""
        span, S = self.frames * self.frame_step, self.img_size

        def pick(n):  # (segments, T)
            centres = (2 * np.arange(segments) + 1) * n // (2 * segments)
            return np.stack([window_indices(n, s, self.frames, self.frame_step)
                             for s in (centres - span // 2).clip(0, max(n - span, 0))])

        frames = decode(self.items[index][0], self.where(index), pick)  # (segments, T, H, W, 3)
        frames = to_frames(frames.reshape(-1, *frames.shape[2:]))  # (segments*T, 3, H, W)
        clip = to_clip(short_side_resize(frames, S))  # (3, segments*T, h, w)
        long = max(clip.shape[2:])
        starts = np.linspace(0, long - S, views).round().astype(int) if views > 1 else [(long - S) // 2]
        out = torch.stack([clip[:, :, o:o + S] if clip.shape[2] > S else clip[..., o:o + S] for o in starts])
        return out.unflatten(2, (segments, self.frames)).transpose(1, 2)  # (views, segments, 3, T, S, S)

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        if self.train:
            return self.load(index, np.random.default_rng(index))
        return self.eval_views(index, 1, 1)[0, 0], self.items[index][1]


# ----------------------------------------------------------------------------------------------------
# Images, for the image probes (IN1K, Places205, iNat21).


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>; each image becomes a clip by repeating it `frames` times along time (official
    image eval). Training view: random-resized-crop (ImageNet's scale 0.08-1) + flip; evaluation: the short
    side resized to img_size * 256/224, then a centre crop. Hidden folders and non-image files are skipped."""
    SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

    def __init__(self, root, frames: int = 16, img_size: int = 224, train: bool = False):
        self.root, self.frames, self.img_size, self.train = Path(root), frames, img_size, train
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and d.name[0] != ".")
        if not self.classes:
            raise DataError(f"{self.root}: no class folders (expected root/<class>/<image>)")
        self.items = []
        for label, name in enumerate(self.classes):
            images = sorted(p for p in (self.root / name).iterdir() if p.suffix.lower() in self.SUFFIXES)
            if not images:
                raise DataError(f"{self.root / name}: empty class folder (no {' '.join(self.SUFFIXES)} file)")
            self.items += [(p, label) for p in images]
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def image(self, index: int) -> torch.Tensor:
        """(1, 3, H, W) uint8: the image as one frame."""
        try:
            with Image.open(self.items[index][0]) as im:
                return to_frames(np.array(im.convert("RGB"))[None])  # (1, 3, H, W)
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"{self.items[index][0]}: cannot read the image ({e})") from e

    def load(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        """Training view (3, T, img_size, img_size), label."""
        clip = augment(self.image(index), self.img_size, rng, crop=IMAGE_CROP)  # (3, 1, S, S)
        return clip.expand(-1, self.frames, -1, -1), self.items[index][1]  # (3, T, S, S), a view

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        if self.train:
            return self.load(index, np.random.default_rng(index))
        frames, S = short_side_resize(self.image(index), self.img_size * 256 // 224), self.img_size
        top, left = (frames.shape[2] - S) // 2, (frames.shape[3] - S) // 2
        clip = to_clip(frames[:, :, top:top + S, left:left + S])  # (3, 1, S, S)
        return clip.expand(-1, self.frames, -1, -1), self.items[index][1]  # (3, T, S, S), a view


# ----------------------------------------------------------------------------------------------------
# The training stream: what each step reads, and its augmentation, as pure functions of the step.


class StepSampler(torch.utils.data.Sampler):
    """For each step s in [start_step, total_steps) yields this rank's batch: [(s, i) for its B indices].

    Epoch e is a permutation of range(dataset_len) seeded by (seed, e); the epochs are concatenated, the
    global batch of step s is positions [s*B*W, (s+1)*B*W) (W = world_size), and rank r takes the r-th B
    of them. A function of the arguments only: a run resumed at step k yields exactly what the
    uninterrupted run yields from step k, with nothing replayed to get there.
    """

    def __init__(self, dataset_len: int, batch_size: int, start_step: int, total_steps: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        ok = dataset_len > 0 and batch_size > 0 and 0 <= rank < world_size and 0 <= start_step <= total_steps
        if not ok:
            raise ValueError(f"bad StepSampler: {dataset_len} samples, batch_size {batch_size}, "
                             f"steps [{start_step}, {total_steps}), rank {rank} of {world_size}")
        self.n, self.batch_size, self.steps = dataset_len, batch_size, range(start_step, total_steps)
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        return rng_for(self.seed, epoch, stream=SAMPLER_STREAM).permutation(self.n)

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        orders = {}  # the epochs the current batch touches
        for step in self.steps:
            first = (step * self.world_size + self.rank) * self.batch_size
            positions = np.arange(first, first + self.batch_size)
            epochs = np.unique(positions // self.n)
            orders = {e: orders[e] if e in orders else self.epoch_order(e) for e in epochs}
            yield [(step, int(orders[p // self.n][p % self.n])) for p in positions]


class TrainStream(torch.utils.data.Dataset):
    """Wraps a dataset with .load(index, rng): __getitem__((step, index)) -> (clip, label, step, skipped).

    The augmentation RNG depends only on (seed, step, index), so it replays on resume whatever the number
    of workers. A DataError (an unreadable video) replaces the sample by an index drawn from (seed, step,
    index, attempt); `skipped` holds the messages of the videos skipped for this sample, which train.py
    prints (above its progress bar), counts, and checks against --max-bad-fraction (check_bad_fraction).
    MAX_RETRIES failures in a row for one sample mean that (nearly) no video loads: the run stops.
    """

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> tuple[torch.Tensor, int, int, list[str]]:
        step, index = key
        replacements = rng_for(self.seed, step, index, stream=RETRY_STREAM)
        skipped = []
        while len(skipped) < MAX_RETRIES:
            try:
                clip, label = self.dataset.load(index, rng_for(self.seed, step, index, stream=AUGMENT_STREAM))
                return clip, label, step, skipped
            except DataError as e:
                skipped.append(str(e))
                index = int(replacements.integers(len(self.dataset)))
        raise DataError(f"{MAX_RETRIES} videos in a row could not be loaded (the last: {skipped[-1]}): "
                        "check the data list")


def check_bad_fraction(bad: int, loaded: int, max_bad_fraction: float):
    """Stop once more than max_bad_fraction of the run's load attempts (at least 20) have failed: that many
    bad files means a broken data list, not a few corrupt videos. train.py counts for the whole run (resumes
    included) in the main process, so the number of workers does not change when a run stops."""
    tried = bad + loaded
    if tried >= 20 and bad > max_bad_fraction * tried:
        raise DataError(f"{bad} of {tried} clips failed to load, more than --max-bad-fraction "
                        f"{max_bad_fraction}: check the data list (the messages above name the files) or "
                        "raise the limit")


def serve_through_stop_signals(worker_id: int):
    """DataLoader worker_init_fn. Ctrl-C and a scheduler's SIGTERM reach every process of a job, the workers
    included; the main process then finishes its step and saves, so the workers keep serving it. Only a
    SIGTERM from the main process itself (multiprocessing ending its workers) ends a worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: the workers stop with the signal, as by default
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # then read, with its sender, by `watch`
    parent = os.getppid()

    def watch():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def make_train_loader(dataset, masker, batch_size: int, start_step: int, total_steps: int, seed: int = 0,
                      rank: int = 0, world_size: int = 1, workers: int = 0) -> torch.utils.data.DataLoader:
    """The pretraining loader: batch s is MaskCollator's dict for step s, the same for a given (seed, rank)
    whatever `workers` is and wherever the run was resumed."""
    return torch.utils.data.DataLoader(
        TrainStream(dataset, seed),
        batch_sampler=StepSampler(len(dataset), batch_size, start_step, total_steps, seed, rank, world_size),
        collate_fn=MaskCollator(masker, rank), num_workers=workers, worker_init_fn=serve_through_stop_signals,
        pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------------
# The probe's data (probe.py). Every item becomes (clips (V, S, 3, T, H, W), label, error); an unreadable
# video gives clips=None and its DataError's message, so it is counted and reported, never silently dropped.


class ProbeItems(torch.utils.data.Dataset):
    """The items `indices` of a dataset, as the probe reads them: a video list's evaluation items are
    `views` spatial crops of `segments` temporal windows; every other item is one clip (V = S = 1)."""

    def __init__(self, ds, indices, train: bool, seed: int = 0, segments: int = 1, views: int = 1):
        self.ds, self.indices, self.train, self.seed = ds, indices, train, seed
        self.segments, self.views = segments, views
        # real data: random crops and flips (official); synthetic clips stay as they are (probe.py caches
        # their features)
        self.augment = train and not isinstance(ds, SyntheticVideos)
        self.epoch = 0  # seeds the augmentation; set by loader() before its workers start

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        try:
            if isinstance(self.ds, VideoList) and not self.train:
                return self.ds.eval_views(j, self.segments, self.views), self.ds.items[j][1], None
            if self.augment:  # one augmented view per video and epoch
                clip, y = self.ds.load(j, np.random.default_rng([self.seed, self.epoch, j]))
            else:
                clip, y = self.ds[j]
            return clip[None, None], y, None  # (1, 1, 3, T, H, W)
        except DataError as e:
            return None, -1, str(e)

    def loader(self, batch_size: int, shuffle: bool, epoch: int = 0, workers: int = 0):
        """Batches (clips (B, V, S, 3, T, H, W) or None, labels (B,), messages of the unreadable items) of
        about batch_size clips (B = batch_size // (V*S), at least 1), in an order seeded by (seed, epoch)."""
        self.epoch = epoch
        per_item = self.views * self.segments if isinstance(self.ds, VideoList) and not self.train else 1
        return torch.utils.data.DataLoader(self, max(1, batch_size // per_item), shuffle=shuffle,
                                           collate_fn=collate_probe_items, num_workers=workers,
                                           generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))


def collate_probe_items(samples):
    """The readable items' clips (None if there are none) and labels, and the unreadable items' messages."""
    ok = [s for s in samples if s[0] is not None]
    clips = torch.stack([s[0] for s in ok]) if ok else None  # (B, V, S, 3, T, H, W)
    return clips, torch.tensor([s[1] for s in ok], dtype=torch.long), [s[2] for s in samples if s[0] is None]


def labels_of(ds, num_classes: int) -> list[int]:
    """Every item's label (the dataset's label, for synthetic clips), checked against the probe's classes,
    without decoding anything."""
    if isinstance(ds, SyntheticVideos):
        labels = [ds.labels(i)[ds.LABELS.index(ds.label)] for i in range(len(ds))]
    else:
        labels = [y for _, y in ds.items]
    for i, y in enumerate(labels):
        if not 0 <= y < num_classes:
            where = f"synthetic item {i}" if isinstance(ds, SyntheticVideos) else \
                ds.where(i) if isinstance(ds, VideoList) else ds.items[i][0]
            raise ValueError(f"{where}: label {y} is outside the probe's {num_classes} classes "
                             f"[0, {num_classes})")
    return labels


def stratified_subset(labels: list[int], fraction: float, seed: int) -> list[int]:
    """A random `fraction` of each class's indices (at least one per class), sorted: label efficiency."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    by_class, g, keep = defaultdict(list), torch.Generator().manual_seed(seed), []
    for i, y in enumerate(labels):
        by_class[y].append(i)
    for y in sorted(by_class):
        idx = by_class[y]
        keep += [idx[j] for j in torch.randperm(len(idx), generator=g)[:max(1, round(fraction * len(idx)))]]
    return sorted(keep)


def probe_splits(kind: str, train_src, val_src, frames: int, img_size: int, frame_step: int = 4):
    """(train dataset, or None without train_src; val dataset) of real data for a probe: video lists (kind
    "videos") or image folders ("images")."""
    def make(src, train):
        if kind == "videos":
            return VideoList(src, frames, frame_step, img_size, train=train, flip=False)  # official: no flip
        return ImageFolder(src, frames, img_size, train=train)

    train, val = (make(train_src, True) if train_src else None), make(val_src, False)
    if kind == "images" and train is not None and train.classes != val.classes:
        raise ValueError(f"{train_src} and {val_src} hold different class folders")
    return train, val


# ----------------------------------------------------------------------------------------------------
# List files for real datasets: `path label` per line (absolute paths), the format VideoList reads.

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")


def folder_list(root, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """root/<class>/**/<video> (Kinetics-400 as usually unpacked) -> ([(path, label)], class names). Labels
    number the sorted class folders; pass the training split's `classes` when listing its validation split,
    so that both use the same numbers."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name[0] != ".")
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folders {unknown[:3]} are not among the {len(classes)} given classes")
    items = [(p.resolve(), label) for label, name in enumerate(classes) if (root / name).is_dir()
             for p in sorted((root / name).rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES]
    if not items:
        raise DataError(f"{root}: no {' '.join(VIDEO_SUFFIXES)} file under its class folders")
    return items, classes


def ssv2_list(videos, labels_json, split_json) -> list[tuple[Path, int]]:
    """Something-Something v2 as released: <videos>/<id>.webm, labels.json {"template": "index"} and a
    split file (train.json or validation.json) [{"id", "template", ...}]. The split's templates carry
    brackets ("Putting [something] on a surface"), the label file's do not."""
    labels = json.loads(Path(labels_json).read_text())
    items = []
    for entry in json.loads(Path(split_json).read_text()):
        template = entry["template"].replace("[", "").replace("]", "")
        if template not in labels:
            raise DataError(f"{split_json}: video {entry['id']} has template {template!r}, which "
                            f"{labels_json} does not list")
        items.append(((Path(videos) / f"{entry['id']}.webm").resolve(), int(labels[template])))
    return items


def write_list(path, items: list[tuple[Path, int]]):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(f"{p} {label}\n" for p, label in items))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Write a list file (`path label` per line) for train.py and "
                                                 "probe.py from a dataset as it is usually unpacked.")
    sub = parser.add_subparsers(dest="kind", required=True)
    folders = sub.add_parser("folders", help="root/<class>/<video>: labels number the sorted class folders")
    folders.add_argument("root", help="e.g. kinetics400/train")
    folders.add_argument("out", help="the list file to write; the class names go beside it (.classes.txt)")
    folders.add_argument("--classes", help="the training list's .classes.txt, when listing another split")
    ssv2 = sub.add_parser("ssv2", help="Something-Something v2: <id>.webm videos and the released JSON files")
    ssv2.add_argument("videos", help="the folder of <id>.webm files")
    ssv2.add_argument("labels", help="labels.json (template -> class index)")
    ssv2.add_argument("split", help="train.json or validation.json")
    ssv2.add_argument("out", help="the list file to write")
    args = parser.parse_args(argv)
    try:
        if args.kind == "folders":
            given = Path(args.classes).read_text().splitlines() if args.classes else None
            items, classes = folder_list(args.root, given)
            write_list(args.out, items)
            Path(args.out).with_suffix(".classes.txt").write_text("\n".join(classes) + "\n")
        else:
            items = ssv2_list(args.videos, args.labels, args.split)
            write_list(args.out, items)
    except (DataError, OSError, KeyError, json.JSONDecodeError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}: {len(items)} videos, {len({y for _, y in items})} classes")


if __name__ == "__main__":
    main()
