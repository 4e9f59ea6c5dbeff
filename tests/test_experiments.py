"""experiments.py: the harness runs end to end, resumes, and its diagnostics measure what they claim."""
import json
import math

import numpy as np
import pytest
import torch

import data
import experiments
import probe
import vjepa


class Fixed(torch.nn.Module):
    """A stand-in encoder returning f(clips) for the diagnostics."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, clips):
        return self.fn(clips)


def test_position_share_is_one_when_every_clip_gives_the_same_map_and_small_when_position_is_ignored():
    clips = torch.zeros(64, 3, 2, 4, 4)
    g = torch.Generator().manual_seed(0)
    same = torch.randn(16, 8, generator=g)
    fixed = experiments.feature_diagnostics(Fixed(lambda c: same.expand(len(c), -1, -1)), clips)
    assert abs(fixed["position_share"] - 1) < 1e-9
    noise = torch.randn(64, 16, 8, generator=g)
    iid = experiments.feature_diagnostics(Fixed(lambda c: noise), clips)
    assert iid["position_share"] < 0.05  # only the sampling error of 64 clips per position
    assert 6 < iid["effective_rank"] <= 8  # i.i.d. features spread over all 8 directions


def test_every_label_fraction_gets_about_the_same_probe_steps():
    cfg = experiments.ExperimentConfig()
    for frac in (0.05, 0.1, 0.5, 1.0):
        per_epoch = math.ceil(frac * cfg.synthetic_train / experiments.BATCH)
        steps = experiments.probe_epochs(cfg, frac) * per_epoch
        assert abs(steps - cfg.probe_steps) <= 0.1 * cfg.probe_steps, (frac, steps)


def test_quick_run_writes_results_and_resumes(tmp_path):
    cfg = experiments.ExperimentConfig(out=str(tmp_path), quick=True)
    first = experiments.run(cfg)
    arms = [a for a in experiments.ARMS if experiments.ARMS[a]]
    assert set(first["runs"]) == {f"{a}_s0" for a in arms}
    assert len(first["probes"]) == 2 * len(experiments.ARMS)  # both labels, 100% only in quick mode
    assert (tmp_path / "label_efficiency.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["probes"] == first["probes"]
    assert set(saved["feature_stats"]) == {f"{a}_s0" for a in experiments.ARMS}
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pt*")}  # encoders and probes
    again = experiments.run(cfg)  # everything is recorded: nothing is retrained or re-probed
    assert again["probes"] == first["probes"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pt*")} == written


def test_shared_features_give_the_probe_result(tmp_path, capsys):
    """experiments.py encodes an encoder's probe clips once and probes them for both label sets at every
    label fraction: each top-1 equals what probe.probe() gives for the same config, from a fresh pass."""
    base = {"size": "tiny", "random_init": True, "synthetic_train": 48, "synthetic_val": 16, "epochs": 2,
            "batch_size": 16, "train_fraction": 0.5, "out": str(tmp_path)}
    features = experiments.frozen_features(probe.ProbeConfig(**base))
    assert features["train"][0].shape[0] == 48  # all items: every fraction selects from them
    for label in ("appearance", "motion"):
        cfg = probe.ProbeConfig(**base, label=label)
        assert experiments.probe_top1(features, cfg) == probe.probe(cfg)["top1"]
    assert capsys.readouterr().out.count("train features") == 2  # probe.probe encoded; the shared ones not


def test_object_mask_is_the_object_and_object_tokens_follow_the_encoder_token_order():
    ds = data.SyntheticVideos(8, seed=3)
    ec = vjepa.PRESETS["tiny"]
    for i in range(len(ds)):
        a, m = ds.labels(i)
        img, mask = ds.render(i, a, m, with_mask=True)
        assert np.array_equal(img, ds.render(i, a, m))  # asking for the mask changes nothing
        assert 0 < mask.mean() < 0.6
        if a % 2 == 0:  # a solid object: one colour exactly where the mask is
            colours = img[:, mask]  # (3, pixels)
            assert np.allclose(colours, colours[:, :1])
            assert not np.allclose(img[:, ~mask].std(1), 0)  # the background is not that flat colour
    masks = torch.stack([torch.from_numpy(ds.render(i, *ds.labels(i), with_mask=True)[1]) for i in range(8)])
    embed = vjepa.PatchEmbed3D(1, ec.patch, ec.tubelet, in_chans=1)  # the encoder's own token order
    with torch.no_grad():
        embed.proj.weight.fill_(1 / embed.proj.weight.numel())  # the mean over a tubelet's pixels
        embed.proj.bias.zero_()
        cover = embed(masks.float()[:, None])[..., 0]  # (8, N)
    assert torch.equal(experiments.object_tokens(ds, ec), cover > 0.5)


def test_frames_twice_shows_every_other_frame_twice():
    plain, twice = data.SyntheticVideos(4, seed=1), experiments.FramesTwice(4, seed=1)
    for i in range(4):
        (x, y), (x2, y2) = plain.sample(i), twice.sample(i)
        assert y == y2
        assert torch.equal(x2[:, 0::2], x[:, 0::2]) and torch.equal(x2[:, 1::2], x[:, 0::2])


def test_linear_readout_scores_a_separable_label_100_and_an_unrelated_one_near_chance():
    g = torch.Generator().manual_seed(0)
    x, x_val = torch.randn(4000, 8, generator=g), torch.randn(2000, 8, generator=g)
    separable = experiments.linear_readout(x, x[:, 2] > 0.5)(x_val, x_val[:, 2] > 0.5)
    unrelated = experiments.linear_readout(x, torch.rand(4000, generator=g) < 0.3)(
        x_val, torch.rand(2000, generator=g) < 0.3)
    assert separable > 98 and 40 < unrelated < 60


def test_motion_sources_measures_all_four_on_a_small_run(capsys):
    r = experiments.motion_sources("", scene="fast", train_clips=32, val_clips=16, epochs=1)
    assert set(r) == {"motion", "motion_frames_twice", "object_tokens", "object_tokens_changing"}
    assert all(0 <= v <= 100 for v in r.values())


def test_motion_sources_names_a_missing_checkpoint_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found"):
        experiments.main(["--motion-sources", str(tmp_path / "nope.pt")])
