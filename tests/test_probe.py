"""Claims about probe.py: it is the official attentive probe (same logits, same names, the unapplied `proj`),
it evaluates views and segments as the official code, it learns, and it reports bad input clearly."""
import json
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import data
import probe
import vjepa
from probe import AttentiveClassifier, ProbeConfig
from vjepa import ModelConfig

# The official reference model (reference/README.md) and a laptop encoder for end-to-end runs:
# 2 frames (one tubelet) of 64 px in 8 px patches = 64 tokens, so an encoder pass costs almost nothing.
SMALL = ModelConfig(frames=6, img_size=64, patch=16, dim=128, depth=2, heads=4, pred_dim=64, pred_depth=2)
MINI = ModelConfig(frames=2, img_size=64, patch=8, dim=128, depth=1, heads=4, pred_dim=32, pred_depth=1)


@pytest.fixture(scope="module")
def official(reference):
    io = torch.load(reference / "official_small_io.pt", weights_only=True)
    clf = probe.load_probe(reference / "official_small_probe.pth.tar", SMALL).eval()
    return clf, io


@pytest.fixture
def one_thread():
    """Tiny ops gain nothing from threads, and on a shared CPU two threads can run 5x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ours(tmp_path):
    """A checkpoint in this project's format (as train.py writes it) holding a random MINI model."""
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model_config": asdict(MINI), "model": vjepa.VJEPA(MINI).state_dict()}, path)
    return path


def test_probe_reproduces_official_logits(official):
    clf, io = official
    with torch.no_grad():
        logits = clf(io["target_encoder_out"])  # (3, 5)
    # measured 3.0e-8 on logits up to 0.07 (a few float32 rounding steps; not bit for bit: other kernels)
    assert (logits - io["probe_logits"]).abs().max().item() < 2e-7


def test_applying_proj_would_change_the_logits(official):
    """The official forward never applies xattn.proj; doing so moves the logits by ~0.1 (measured 0.096)."""
    clf, io = official
    xattn = clf.pooler.cross_attention_block.xattn
    plain = type(xattn).forward
    with torch.no_grad():
        reference = clf(io["target_encoder_out"])
        xattn.forward = lambda q, x: xattn.proj(plain(xattn, q, x))
        with_proj = clf(io["target_encoder_out"])
        del xattn.forward
    assert (with_proj - reference).abs().max().item() > 0.05
    assert (with_proj - io["probe_logits"]).abs().max().item() > 0.05


def test_recorded_attention_gives_the_query_weights_and_the_same_logits():
    """Inside vjepa.record_attention(), CrossAttention (notebook 2 draws where the probe looks) takes an
    explicit softmax path: one distribution over the tokens per head, and the same logits as the fast path."""
    torch.manual_seed(0)
    clf = AttentiveClassifier(dim=64, heads=4, num_classes=5).eval()
    block = clf.pooler.cross_attention_block
    with torch.no_grad():
        clf.pooler.query_tokens.normal_()  # a large query, so that the weights are far from uniform
        block.xattn.q.weight.normal_(std=0.5)
        x = torch.randn(3, 48, 64)  # (B, N, D) frozen features
        q = clf.pooler.query_tokens.expand(3, -1, -1)  # (B, 1, D)
        with vjepa.record_attention(clf) as attns:
            out = block.xattn(q, block.norm1(x))  # (B, 1, D)
            logits = clf(x)  # (B, 5)
        attn = attns[0]  # (B, heads, 1, N)
        assert attn.shape == (3, 4, 1, 48) and attn.max() > 3 / 48
        torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, 1))
        assert len(attns) == 2 and torch.equal(attns[1], attn)  # the same layer ran twice
        torch.testing.assert_close(out, block.xattn(q, block.norm1(x)), rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, clf(x), rtol=0, atol=1e-6)


def test_names_and_shapes_equal_the_official_k400_probe(reference):
    official = json.loads((reference / "official_state_dict_shapes.json").read_text())["vitl16"]["probe_k400"]
    ours = {"module." + k: list(v.shape) for k, v in AttentiveClassifier(1024, 16, 400).state_dict().items()}
    assert ours == official


def test_probe_checkpoint_round_trip_and_depth(tmp_path):
    """save_probe writes the official layout; a depth-2 probe keeps vjepa.Block's (official) names; loading
    a checkpoint into the wrong depth or width fails and names the key."""
    torch.manual_seed(0)
    clf = AttentiveClassifier(MINI.dim, MINI.heads, 7, depth=2)
    probe.save_probe(tmp_path / "p.pth.tar", clf, 3, ProbeConfig())
    keys = torch.load(tmp_path / "p.pth.tar", weights_only=True)["classifier"]
    assert "module.pooler.blocks.0.attn.qkv.weight" in keys and "module.linear.bias" in keys
    loaded = probe.load_probe(tmp_path / "p.pth.tar", MINI, depth=2)
    x = torch.randn(2, 10, MINI.dim)
    assert torch.equal(loaded.eval()(x), clf.eval()(x))
    with pytest.raises(ValueError, match=r"unexpected keys \['pooler.blocks.0"):
        probe.load_probe(tmp_path / "p.pth.tar", MINI, depth=1)
    with pytest.raises(ValueError, match=r"'pooler.query_tokens' has shape \(1, 1, 128\) in the checkpoint"):
        probe.load_probe(tmp_path / "p.pth.tar", ModelConfig(frames=2, img_size=64, patch=8, dim=64, heads=4),
                         depth=2)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not an attentive-probe checkpoint"):
        probe.load_probe(tmp_path / "other.pt", MINI)


def test_released_backbone_and_probe_by_name(reference, tmp_path, monkeypatch):
    """--checkpoint vitl16 --probe-checkpoint k400 fetch Meta's backbone and its K400 probe from the
    published folder (here file:// URLs to the official-format reference files, standing in for ViT-L/16)
    into the hub cache; the probe read that way gives the official logits."""
    server = tmp_path / "server" / "vitl16"
    server.mkdir(parents=True)
    shutil.copy(reference / "official_small_checkpoint.pth.tar", server / "vitl16.pth.tar")
    shutil.copy(reference / "official_small_probe.pth.tar", server / "k400-probe.pth.tar")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(vjepa.RELEASED, "vitl16", (server / "vitl16.pth.tar").as_uri())
    monkeypatch.setitem(vjepa.PRESETS, "vitl16", replace(SMALL, norm_eps=1e-5))
    encoder = probe.load_backbone(ProbeConfig(checkpoint="vitl16"))
    clf = probe.load_probe("k400", encoder.cfg).eval()
    assert (tmp_path / "torch/hub/checkpoints/vitl16/k400-probe.pth.tar").is_file()
    io = torch.load(reference / "official_small_io.pt", weights_only=True)
    with torch.no_grad():
        assert (clf(encoder(io["clip"])) - io["probe_logits"]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="k400 probes for vitl16, vith16, vith16_384, not for a 'tiny'"):
        probe.load_probe("k400", vjepa.PRESETS["tiny"])


def test_default_output_folder_is_per_backbone_and_task():
    """Without --out, probing another label, list or label fraction never overwrites earlier results."""
    def out(**kw):
        return probe.default_out(ProbeConfig(**kw))
    assert out(checkpoint="runs/tiny/ckpt.pt", label="motion") == Path("runs/tiny/probe-motion")
    assert out(checkpoint="runs/tiny/ckpt.pt") == Path("runs/tiny/probe-appearance")
    assert out(checkpoint="runs/tiny/ckpt.pt", train_fraction=0.05) == Path("runs/tiny/probe-appearance-5pct")
    assert out(size="tiny", random_init=True, label="motion") == Path("runs/random-tiny/probe-motion")
    k400 = out(checkpoint="vitl16", data="videos", val_list="lists/k400_val.txt")
    assert k400 == Path("runs/vitl16/probe-k400_val")
    assert out(checkpoint="vitl16", data="videos", val_list="ssv2_val.txt", probe_checkpoint="ssv2",
               epochs=0) == Path("runs/vitl16/probe-ssv2_val-eval")


# ----------------------------------------------------------------------------------------------------
# Multi-view evaluation


def test_segments_are_concatenated_along_tokens_per_view():
    """(B, V, S, 3, T, H, W) -> (B, V, S*N, D): each view's probe input is its segments' token maps, one
    after the other, with nothing added (official ClipAggregation without positions)."""
    def encoder(x):  # a stand-in encoder whose tokens are the pixels: (B', 3, T, H, W) -> (B', T*H*W, 3)
        return x.flatten(2).transpose(1, 2)
    clips = torch.randn(2, 3, 4, 3, 2, 4, 4)  # 2 videos, 3 views, 4 segments
    feats = probe.encode(encoder, clips)
    assert feats.shape == (2, 3, 4 * 32, 3)
    for v in range(3):
        assert torch.equal(feats[:, v], torch.cat([encoder(clips[:, v, s]) for s in range(4)], dim=1))


def test_views_are_averaged_after_the_softmax():
    def classifier(x):  # (B*V, N, C) -> (B*V, C)
        return x.mean(1)
    feats = torch.tensor([[[[4.0, 0.0, 0.0]], [[-6.0, 1.0, 0.0]]]])  # 1 video, 2 views, 1 token, 3 classes
    probs = probe.predict(classifier, feats)
    expected = (feats[0, 0, 0].softmax(-1) + feats[0, 1, 0].softmax(-1)) / 2
    assert torch.allclose(probs[0], expected)
    # averaging logits instead would pick another class: the order of mean and softmax matters here
    assert probs.argmax().item() == 0 and feats[0, :, 0].mean(0).argmax().item() == 1


# ----------------------------------------------------------------------------------------------------
# End to end


def test_probe_learns_appearance_from_a_random_encoder(ours, tmp_path, one_thread):
    """A random-init encoder (not a briefly trained one: honest, and fast) still carries appearance, which is
    readable from pixels, so an attentive probe on its cached features must beat chance (12.5%) clearly:
    at chance, 20% of 256 clips would be 3.6 standard deviations off. Measured 28.9% (probe seed 0; 25.4%
    with seeds 1 and 2). Then the saved probe, reloaded with --epochs 0, gives the same accuracy."""
    cfg = ProbeConfig(checkpoint=str(ours), synthetic_train=1024, synthetic_val=256, epochs=10, batch_size=64,
                      lr=2e-3, out=str(tmp_path / "run"))
    res = probe.probe(cfg)
    assert res["top1"] > 20 and res["readable"] == 256 and res["unreadable"] == 0
    assert "top5" in res and len(res["history"]) == 10
    assert res["history"][-1]["loss"] < res["history"][0]["loss"]
    for name in ("results.json", "probe.pth.tar", "confusion.png"):
        assert (tmp_path / "run" / name).is_file()
    again = probe.probe(replace(cfg, epochs=0, probe_checkpoint=str(tmp_path / "run" / "probe.pth.tar"),
                                out=str(tmp_path / "eval")))
    assert again["top1"] == res["top1"]


def write_video(path, frames=12, size=48):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(frames):
            pixels = np.full((size, size, 3), 10 * i, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())


def test_unreadable_videos_are_counted_not_dropped(ours, tmp_path):
    """Train and evaluate (2 segments x 3 views) on a list with one corrupt video: top-1 is over the readable
    videos, the unreadable one is counted and named, and the all-videos accuracy is reported beside it."""
    for i in range(3):
        write_video(tmp_path / f"v{i}.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    (tmp_path / "list.txt").write_text("v0.mp4 0\nbad.mp4 1\nv1.mp4 1\nv2.mp4 0\n")
    lst = str(tmp_path / "list.txt")
    res = probe.probe(ProbeConfig(checkpoint=str(ours), data="videos", train_list=lst, val_list=lst,
                                  segments=2, views=3, epochs=1, batch_size=12, out=str(tmp_path / "run")))
    assert (res["readable"], res["unreadable"]) == (3, 1)
    assert "bad.mp4" in res["unreadable_errors"][0] and "list.txt:2" in res["unreadable_errors"][0]
    assert res["top1_unreadable_as_wrong"] == pytest.approx(res["top1"] * 3 / 4)
    assert len(res["train_unreadable"]) == 1 and "bad.mp4" in res["train_unreadable"][0]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["unreadable"] == 1 and "readable videos only" in saved["denominator"]


# ----------------------------------------------------------------------------------------------------
# Bad input: each gets a message that says what is wrong and where


def test_not_a_vjepa_checkpoint(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="is not a V-JEPA checkpoint"):
        probe.probe(ProbeConfig(checkpoint=str(tmp_path / "x.pt"), out=str(tmp_path)))


def test_checkpoint_that_does_not_match_the_preset(tmp_path):
    """An official-format checkpoint of the MINI model, read as the 'tiny' preset."""
    state = {"module.backbone." + k: v for k, v in vjepa.Encoder(MINI).state_dict().items()}
    torch.save({"encoder": state, "predictor": {}, "target_encoder": state}, tmp_path / "o.pth.tar")
    with pytest.raises(ValueError, match="does not fit preset 'tiny'"):
        probe.probe(ProbeConfig(checkpoint=str(tmp_path / "o.pth.tar"), size="tiny", out=str(tmp_path)))


def test_main_prints_the_message_and_exits(tmp_path, capsys):
    with pytest.raises(SystemExit, match="error: checkpoint not found"):
        probe.main(["--checkpoint", str(tmp_path / "missing.pt")])


def test_label_outside_the_probe_classes(ours, tmp_path):
    (tmp_path / "train.txt").write_text("a.mp4 0\nb.mp4 1\n")
    (tmp_path / "val.txt").write_text("a.mp4 0\n\nc.mp4 4\n")
    with pytest.raises(ValueError, match=r"c.mp4 \(.*val.txt:3\): label 4 is outside the probe's 2 classes"):
        probe.probe(ProbeConfig(checkpoint=str(ours), data="videos", train_list=str(tmp_path / "train.txt"),
                                val_list=str(tmp_path / "val.txt"), out=str(tmp_path)))
    probe.save_probe(tmp_path / "p3.pth.tar", AttentiveClassifier(MINI.dim, MINI.heads, 3), 1, ProbeConfig())
    with pytest.raises(ValueError, match=r"synthetic item \d+: label \d is outside the probe's 3 classes"):
        probe.probe(ProbeConfig(checkpoint=str(ours), probe_checkpoint=str(tmp_path / "p3.pth.tar"), epochs=0,
                                synthetic_val=64, out=str(tmp_path)))


def test_list_line_that_does_not_parse(ours, tmp_path):
    (tmp_path / "val.txt").write_text("a.mp4 0\nb.mp4\n")
    lst = str(tmp_path / "val.txt")
    with pytest.raises(data.DataError, match=r"val.txt:2: expected 'path label'"):
        probe.probe(ProbeConfig(checkpoint=str(ours), data="videos", train_list=lst, val_list=lst,
                                out=str(tmp_path)))


def test_empty_class_folder(ours, tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "dog").mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / split / "cat" / "1.png")
    with pytest.raises(data.DataError, match="dog: empty class folder"):
        probe.probe(ProbeConfig(checkpoint=str(ours), data="images", train_dir=str(tmp_path / "train"),
                                val_dir=str(tmp_path / "val"), out=str(tmp_path)))


def test_unsupported_combinations(ours, tmp_path):
    with pytest.raises(ValueError, match="--epochs 0 evaluates a trained probe"):
        probe.probe(ProbeConfig(checkpoint=str(ours), epochs=0))
    with pytest.raises(ValueError, match="--segments and --views apply to video lists"):
        probe.probe(ProbeConfig(checkpoint=str(ours), segments=8))
    with pytest.raises(ValueError, match="--random-init --size"):
        probe.probe(ProbeConfig(random_init=True))


def test_command_line_is_generated_from_the_config():
    cfg = probe.parse_args(["--size", "tiny", "--random-init", "--epochs", "3", "--weight-decay", "0.1"])
    assert (cfg.size, cfg.random_init, cfg.epochs, cfg.weight_decay) == ("tiny", True, 3, 0.1)
    assert probe.parse_args([]) == ProbeConfig()
    for bad in (["--bogus", "1"], ["--epochs", "x"], ["--size", "vitz"], ["--label", "colour"]):
        with pytest.raises(SystemExit):
            probe.parse_args(bad)


# ----------------------------------------------------------------------------------------------------
# Results that would look valid but are not: refused, with a message and no results.json


@pytest.mark.parametrize("field, value, message", [
    ("segments", 0, "--segments must be >= 1"), ("views", 0, "--views must be >= 1"),
    ("batch_size", 0, "--batch-size must be >= 1"), ("lr", -1.0, "--lr must be > 0"),
    ("train_fraction", 0.0, r"--train-fraction must be in \(0, 1\]"), ("epochs", -1, "--epochs must be >= 0"),
    ("weight_decay", -0.1, "--weight-decay must be >= 0"), ("label", "colour", "--label must be one of")])
def test_bad_options_are_refused_before_the_encoder_is_loaded(ours, tmp_path, monkeypatch, field, value,
                                                              message):
    monkeypatch.setattr(probe, "load_backbone", lambda cfg: pytest.fail("the encoder was loaded"))
    with pytest.raises(ValueError, match=message):
        probe.probe(ProbeConfig(checkpoint=str(ours), out=str(tmp_path / "run"), **{field: value}))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--out must be a folder, not an existing file"):
        probe.probe(ProbeConfig(checkpoint=str(ours), out=str(tmp_path / "file")))


def test_files_that_are_not_checkpoints_get_our_message(tmp_path):
    """Never torch's advice to retry with weights_only=False: that would let the file run code."""
    torch.save({"x": np.zeros(3)}, tmp_path / "pickled.pt")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(3000))
    for name, reason in (("pickled.pt", r"holds a Python object \(numpy.*could run code"),
                         ("random.pt", "not a PyTorch checkpoint, or a truncated or damaged one")):
        with pytest.raises(SystemExit) as e:
            probe.main(["--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "run")])
        assert re.search(reason, str(e.value.code)) and "weights_only" not in str(e.value.code)
        assert str(e.value.code).startswith(f"error: could not read checkpoint {tmp_path / name}: ")


def test_a_checkpoint_with_non_finite_weights_is_refused(ours, tmp_path):
    ckpt = torch.load(ours, weights_only=True)
    ckpt["model"]["target_encoder.blocks.0.mlp.fc1.weight"][3, 5] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"weight 'blocks.0.mlp.fc1.weight' holds NaN or inf"):
        probe.probe(ProbeConfig(checkpoint=str(tmp_path / "nan.pt"), out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [({"rope": True}, "field rope=True is unknown here"),
                                             ({"dim": "128"}, "field dim='128' is not a int")])
def test_a_checkpoint_from_another_version_is_named(ours, tmp_path, change, message):
    ckpt = torch.load(ours, weights_only=True)
    ckpt["model_config"].update(change)
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"other.pt was written by another version of this code.*{message}"):
        probe.probe(ProbeConfig(checkpoint=str(tmp_path / "other.pt"), out=str(tmp_path / "run")))


def test_no_result_from_unreadable_videos(ours, tmp_path):
    """Every validation (or training) video unreadable: an error and no results.json, not "0.00% over 0
    readable videos"."""
    for i in range(2):
        write_video(tmp_path / f"v{i}.mp4")
        (tmp_path / f"bad{i}.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    (tmp_path / "good.txt").write_text("v0.mp4 0\nv1.mp4 1\n")
    (tmp_path / "bad.txt").write_text("bad0.mp4 0\nbad1.mp4 1\n")
    good, bad, run = str(tmp_path / "good.txt"), str(tmp_path / "bad.txt"), tmp_path / "run"
    base = {"checkpoint": str(ours), "data": "videos", "epochs": 1, "batch_size": 2, "out": str(run)}
    with pytest.raises(ValueError, match=r"none of the 2 validation videos could be read \(the first: .*bad"):
        probe.probe(ProbeConfig(**base, train_list=good, val_list=bad))
    with pytest.raises(ValueError, match=r"none of the 2 training videos could be read"):
        probe.probe(ProbeConfig(**base, train_list=bad, val_list=good))
    assert not (run / "results.json").exists() and not (run / "probe.pth.tar").exists()


def test_an_absurd_label_is_refused_with_its_line(ours, tmp_path):
    """A label of 10^12 would make a probe of 10^12 outputs (terabytes): the list's line is named instead."""
    (tmp_path / "val.txt").write_text("a.mp4 0\nb.mp4 1000000000000\n")
    with pytest.raises(data.DataError, match=r"val.txt:2: the label must be an integer in \[0, 100,000\)"):
        probe.probe(ProbeConfig(checkpoint=str(ours), data="videos", train_list=str(tmp_path / "val.txt"),
                                val_list=str(tmp_path / "val.txt"), out=str(tmp_path / "run")))


def test_synthetic_probes_use_the_scene_the_checkpoint_was_trained_on(ours, tmp_path):
    """A model trained on one synthetic scene is probed on that scene unless --scene says otherwise; a
    checkpoint written before scenes existed was trained on the cluttered one; a random encoder gets clean."""
    ckpt = torch.load(ours, weights_only=True)
    for stored, expected in (({"scene": "clean"}, "clean"), ({"scene": "cluttered"}, "cluttered"),
                             ({"steps": 400}, "cluttered")):
        path = tmp_path / f"{expected}_{len(stored)}.pt"
        torch.save({**ckpt, "train_config": stored}, path)
        assert probe.training_scene(str(path)) == expected
        train_ds, val_ds = probe.make_datasets(ProbeConfig(checkpoint=str(path)), MINI, True)
        assert train_ds.scene == val_ds.scene == expected
        forced = probe.make_datasets(ProbeConfig(checkpoint=str(path), scene="clean"), MINI, True)[1]
        assert forced.scene == "clean"
    assert probe.training_scene("") == "clean"


def test_probe_defaults_follow_the_data():
    """Synthetic data: batch 64 and lr 2e-3 (320 updates on 1,024 clips); real data: the official recipe;
    a value given explicitly is kept, also a bad one (the config rules then refuse it)."""
    synthetic = probe.with_defaults(ProbeConfig())
    assert (synthetic.batch_size, synthetic.lr, synthetic.weight_decay) == (64, 2e-3, 1e-2)
    videos = probe.with_defaults(ProbeConfig(data="videos"))
    assert (videos.batch_size, videos.lr, videos.weight_decay) == (256, 1e-3, 1e-2)
    assert probe.with_defaults(ProbeConfig(data="images")).weight_decay == 1e-3
    assert probe.with_defaults(ProbeConfig(batch_size=0, lr=5e-4)).batch_size == 0
    assert probe.with_defaults(ProbeConfig(batch_size=0, lr=5e-4)).lr == 5e-4
