"""Claims about data.py: the synthetic dataset's labels and determinism, replayable sampling, frame sampling
of real video as the official loader, and a clear DataError for every kind of bad input."""
import json
import time
from collections import Counter

import av
import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIRRORED_MOTION,
    MOTIONS,
    VIDEO_CROP,
    DataError,
    ImageFolder,
    ProbeItems,
    StepSampler,
    SyntheticVideos,
    TrainStream,
    VideoList,
    check_bad_fraction,
    labels_of,
    make_train_loader,
    random_crop_box,
    stratified_subset,
)
from masking import MultiBlockMasker


def unnormalise(clip):
    """(3, ...) normalised -> values in [0, 1]."""
    shape = (3,) + (1,) * (clip.dim() - 1)
    return clip * torch.tensor(IMAGENET_STD).view(shape) + torch.tensor(IMAGENET_MEAN).view(shape)


# ----------------------------------------------------------------------------------------------------
# Synthetic videos


def test_synthetic_is_deterministic_per_seed_and_index():
    a, b = SyntheticVideos(64, seed=3), SyntheticVideos(64, seed=3)
    assert torch.equal(a[5][0], b[5][0]) and a.sample(5)[1] == b.sample(5)[1]
    assert not torch.equal(a[5][0], a[6][0])
    assert not torch.equal(a[5][0], SyntheticVideos(64, seed=4)[5][0])


def test_synthetic_shapes_dtype_and_normalisation():
    clip, labels = SyntheticVideos(8, frames=6, img_size=48).sample(0)
    assert clip.shape == (3, 6, 48, 48) and clip.dtype == torch.float32
    pixels = unnormalise(clip)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.1
    assert set(labels) == {"appearance", "motion"}


def test_labels_balanced_independent_and_in_range():
    ds = SyntheticVideos(128, seed=1, label="motion")
    pairs = np.array([ds.labels(i) for i in range(128)])
    for counts, expected in ((pairs[:, 0], 16), (pairs[:, 1], 16), (pairs[:, 0] * 8 + pairs[:, 1], 2)):
        assert (np.bincount(counts, minlength=len(counts) // expected) == expected).all()  # pairs: twice each
    assert ds.num_classes == {"appearance": 8, "motion": 8}
    assert [ds[i][1] for i in range(5)] == pairs[:5, 1].tolist()
    other_seed = SyntheticVideos(128, seed=2)
    assert [other_seed.labels(i) for i in range(64)] != list(map(tuple, pairs[:64].tolist()))


@pytest.mark.parametrize("scene", ["clean", "cluttered"])
def test_motion_is_invisible_in_frame_zero_and_appearance_is_visible(scene):
    """The scene's random draws do not depend on the classes, so frame 0 is the same for all 8 motions
    (and every frame's distribution is the same under every motion, by the torus construction)."""
    ds = SyntheticVideos(64, seed=0, scene=scene)
    for index in range(4):
        clips = [ds.render(index, 3, m) for m in range(8)]
        assert all(np.array_equal(c[:, 0], clips[0][:, 0]) for c in clips)
        assert all(not np.array_equal(c[:, 1:], d[:, 1:]) for i, c in enumerate(clips) for d in clips[i + 1:])
        assert not np.array_equal(ds.render(index, 4, 0)[:, 0], clips[0][:, 0])  # another shape shows at once


def centres(mask):
    """(T, S, S) bool -> (T, 2) circular-mean (y, x) of each frame's True pixels, on the S px torus."""
    angles = np.exp(2j * np.pi * np.arange(mask.shape[-1]) / mask.shape[-1])
    t, y, x = np.nonzero(mask)
    means = [[np.angle(angles[c[t == k]].mean()) for c in (y, x)] for k in range(mask.shape[0])]
    return np.array(means) * mask.shape[-1] / (2 * np.pi)


def wrap(d, size):
    return (d + size / 2) % size - size / 2  # shortest signed distance on the torus


def track(ds, index, motion, mirror=False):
    """The object's centre (T, 2) and orientation (T,) through the clutter, from the same scene rendered with
    other shapes: a square and a cross differ symmetrically about the centre; a square and a half-disc
    differ mostly on one side, which turns with the object."""
    square, cross, half = (ds.render(index, a, motion)[..., ::-1] if mirror else ds.render(index, a, motion)
                           for a in (0, 4, 6))  # solid square, solid cross, solid half-disc
    centre = centres((square != cross).any(0))
    offset = wrap(centres((square != half).any(0)) - centre, ds.img_size)
    return centre, np.unwrap(np.arctan2(offset[:, 0], offset[:, 1]))  # y points down: increasing is clockwise


@pytest.mark.parametrize("index", [0, 1, 2])
def test_motion_classes_move_the_object_as_named(index):
    """Translations move >= 2% of the frame a frame along their axis, without turning; rotations turn >= 0.15
    rad a frame about a fixed centre; sways turn back. At 128 px, so that the shapes' rasterisation
    jitter (about 0.3 px, 0.3 rad here) stays well below the motions."""
    ds = SyntheticVideos(64, img_size=128, seed=5)
    for m, name in enumerate(MOTIONS):
        centre, angle = track(ds, index, m)
        step, turn = wrap(np.diff(centre, axis=0), 128), angle[-1] - angle[0]  # (T-1, 2) px, radians
        axis = 1 if name in ("right", "left", "sway left-right") else 0
        if name in ("right", "left", "down", "up"):
            sign = 1 if name in ("right", "down") else -1
            assert sign * step[:, axis].sum() > 7 * 0.02 * 128 - 2 and abs(step[:, 1 - axis].sum()) < 2
            assert abs(turn) < 0.45
        elif name.startswith("sway"):
            assert step[:, axis].max() > 1 and step[:, axis].min() < -1 and abs(step[:, 1 - axis]).max() < 1
        else:
            assert abs(step).max() < 1.5 and (turn > 0.6 if name == "clockwise" else turn < -0.6)


def test_mirrored_motion_is_the_motion_of_the_flipped_clip():
    ds = SyntheticVideos(64, img_size=128, seed=5)
    centre, _ = track(ds, 0, MOTIONS.index("right"), mirror=True)
    assert wrap(np.diff(centre[:, 1]), 128).sum() < -10  # a flipped "right" moves left
    _, angle = track(ds, 0, MOTIONS.index("clockwise"), mirror=True)
    assert angle[-1] - angle[0] < -0.6  # a flipped "clockwise" turns anticlockwise
    mirrored = ["left", "right", "down", "up", "anticlockwise", "clockwise", *MOTIONS[6:]]  # sways stay
    assert [MOTIONS[m] for m in MIRRORED_MOTION] == mirrored


def test_training_flip_maps_the_motion_label():
    ds, plain = SyntheticVideos(64, label="motion"), SyntheticVideos(64, label="appearance")
    index = next(i for i in range(64) if MOTIONS[ds.labels(i)[1]] == "right")
    outcomes = set()
    for seed in range(8):
        clip, label = ds.load(index, np.random.default_rng(seed))
        flipped = not torch.equal(clip, ds[index][0])
        outcomes.add(flipped)
        assert label == (MIRRORED_MOTION[ds[index][1]] if flipped else ds[index][1])
        if flipped:
            assert torch.equal(clip, ds[index][0].flip(3)) and MOTIONS[label] == "left"
        assert plain.load(index, np.random.default_rng(seed))[1] == plain[index][1]
    assert outcomes == {True, False}


def test_synthetic_generation_is_fast():
    """About 2 ms of one core per 8 x 64 x 64 clip; the bound leaves room for a busy shared machine. CPU
    time of the numpy generator: wall time depends on the other processes, CPU time much less."""
    ds = SyntheticVideos(50)
    ds.render(0, 0, 0)
    start = time.process_time()
    for i in range(20):
        ds.render(i, *ds.labels(i))
    assert (time.process_time() - start) / 20 < 0.010


# ----------------------------------------------------------------------------------------------------
# The training stream


def test_step_sampler_resume_equals_the_uninterrupted_tail():
    full = list(StepSampler(10, 3, 0, 20, seed=1))
    assert len(full) == 20 and all(s == step for step, batch in enumerate(full) for s, _ in batch)
    for k in (1, 7, 19):
        assert list(StepSampler(10, 3, k, 20, seed=1)) == full[k:]
    assert list(StepSampler(10, 3, 0, 20, seed=2)) != full


@pytest.mark.parametrize("n", [12, 10])
def test_step_sampler_ranks_are_disjoint_and_cover_each_epoch_once(n):
    batch, world, total = 3, 2, 10
    ranks = [list(StepSampler(n, batch, 0, total, seed=0, rank=r, world_size=world)) for r in range(world)]
    stream = []
    for step in range(total):
        per_rank = [[i for _, i in ranks[r][step]] for r in range(world)]
        if n % (batch * world) == 0:  # (a step that straddles two epochs may repeat an index)
            assert not set(per_rank[0]) & set(per_rank[1])
        stream += per_rank[0] + per_rank[1]  # the global batch: rank 0's B, then rank 1's B
    for e in range(len(stream) // n):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))  # each epoch a permutation
    assert stream[:n] != stream[n:2 * n]  # a fresh order each epoch


class Flaky(torch.utils.data.Dataset):
    """Clip i is the tensor [i, a draw from the augmentation rng]; the indices in `bad` raise DataError as an
    unreadable video does."""

    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def load(self, index, rng):
        if index in self.bad:
            raise DataError(f"/videos/v{index}.mp4: cannot decode (corrupt)")
        return torch.tensor([index, rng.integers(1000)]), index


def test_train_stream_replays_the_augmentation():
    ds = SyntheticVideos(16)
    a, b = TrainStream(ds, seed=1), TrainStream(ds, seed=1)
    assert all(torch.equal(a[(s, 3)][0], b[(s, 3)][0]) for s in range(6))
    assert {torch.equal(a[(s, 3)][0], ds[3][0]) for s in range(6)} == {True, False}  # flipped at some steps
    assert a[(2, 3)][2:] == (2, [])


def test_train_stream_skips_bad_clips_and_names_them():
    stream = TrainStream(Flaky(100, bad=[7]), seed=0)
    clip, label, step, skipped = stream[(4, 7)]
    assert label != 7 and clip[0] == label and step == 4
    assert skipped == ["/videos/v7.mp4: cannot decode (corrupt)"]  # train.py prints and counts these
    again = TrainStream(Flaky(100, bad=[7]), seed=0)[(4, 7)]
    assert torch.equal(again[0], clip)  # the replacement is deterministic too
    assert stream[(4, 8)][3] == []


def test_train_stream_stops_when_no_video_loads():
    with pytest.raises(DataError, match=r"50 videos in a row could not be loaded \(the last: /videos/v\d"):
        TrainStream(Flaky(10, bad=range(10)))[(0, 0)]


def test_bad_fraction_is_counted_over_the_run():
    """--max-bad-fraction: more than that fraction of the run's attempts (at least 20) failing stops it."""
    check_bad_fraction(bad=1, loaded=18, max_bad_fraction=0.05)  # 1 of 19: too few attempts to judge
    check_bad_fraction(bad=5, loaded=95, max_bad_fraction=0.05)  # exactly 5%: allowed
    with pytest.raises(DataError, match=r"6 of 100 clips failed to load, more than --max-bad-fraction 0.05"):
        check_bad_fraction(bad=6, loaded=94, max_bad_fraction=0.05)
    check_bad_fraction(bad=6, loaded=94, max_bad_fraction=0.1)


def test_train_loader_batches_replay_across_resume_and_workers():
    ds, masker = SyntheticVideos(20, frames=4, img_size=32), MultiBlockMasker((2, 4, 4), seed=0)
    full = list(make_train_loader(ds, masker, batch_size=4, start_step=0, total_steps=4, seed=3))
    first = full[0]
    assert first["clips"].shape == (4, 3, 4, 32, 32) and first["labels"].shape == (4,)
    assert first["step"] == 0 and first["skipped"] == [] and len(first["masks"]) == 2
    resumed = list(make_train_loader(ds, masker, 4, start_step=2, total_steps=4, seed=3, workers=2))
    for a, b in zip(full[2:], resumed):
        assert a["step"] == b["step"] and torch.equal(a["clips"], b["clips"])
        assert torch.equal(a["labels"], b["labels"])
        assert all(torch.equal(x, y) for m, n in zip(a["masks"], b["masks"]) for x, y in zip(m, n))


# ----------------------------------------------------------------------------------------------------
# Real video. Frame i is uniform with red 20 + 10 * (i % 20) and green 20 + 10 * (i // 20), so the frame
# numbers can be read back from a decoded clip; blue ramps left to right, to tell crops apart.


def write_video(path, n, w=96, h=64):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.options = w, h, "yuv420p", {"qp": "0", "g": "8"}
        for i in range(n):
            frame = np.zeros((h, w, 3), np.uint8)
            frame[..., 0], frame[..., 1] = 20 + 10 * (i % 20), 20 + 10 * (i // 20)
            frame[..., 2] = 30 + 2 * np.arange(w)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def frame_numbers(clip):
    """(3, T, H, W) normalised -> the T frame numbers."""
    rgb = unnormalise(clip).mean(dim=(2, 3)) * 255  # (3, T)
    low, high = ((rgb[:2] - 20) / 10).round().long()
    assert ((rgb[:2] - 20) / 10 - ((rgb[:2] - 20) / 10).round()).abs().max() < 0.3, "frame colour off"
    return (low + 20 * high).tolist()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "v40.mp4", 40)
    write_video(root / "v200.mp4", 200)
    (root / "list.txt").write_text("v40.mp4 2\n\nv200.mp4 0\n")
    return root


def test_crop_boxes_follow_the_pretraining_ranges():
    """Official pretraining crop (configs/pretrain/vitl16.yaml): area U(0.3, 1) of the frame, aspect w/h
    log-uniform in (0.75, 1.35), inside the frame (boxes that would not fit are redrawn, which on a square
    frame trims both aspect ends alike)."""
    rng = np.random.default_rng(0)
    top, left, h, w = np.array([random_crop_box(300, 300, rng, *VIDEO_CROP) for _ in range(2000)]).T
    area, aspect = h * w / 300**2, w / h
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 300).all()
    assert 0.29 < area.min() < 0.31 and area.max() > 0.95
    assert 0.74 < aspect.min() < 0.77 and 1.32 < aspect.max() < 1.36
    assert abs(np.median(np.log(aspect)) - np.log(0.75 * 1.35) / 2) < 0.03  # log-uniform: median mid-range


OFFICIAL_16x4 = [0, 4, 8, 12, 17, 21, 25, 29, 34, 38, 42, 46, 51, 55, 59, 63]  # floor(linspace(0, 64, 16))


def test_eval_clip_is_the_centre_window_with_the_official_stride(videos):
    vl = VideoList(videos / "list.txt", frames=16, frame_step=4, img_size=32, train=False)
    assert len(vl) == 2 and vl.num_classes == 3 and vl.items[1] == (videos / "v200.mp4", 0)
    clip, label = vl[1]
    assert clip.shape == (3, 16, 32, 32) and clip.dtype == torch.float32 and label == 0
    assert frame_numbers(clip) == [68 + i for i in OFFICIAL_16x4]  # start (200 - 64) // 2 = 68


def test_short_video_is_padded_with_its_last_frame(videos):
    vl = VideoList(videos / "list.txt", frames=16, frame_step=4, img_size=32, train=False)
    assert frame_numbers(vl[0][0]) == [0, 4, 8, 12, 17, 21, 25, 29, 34, 38] + [39] * 6


def test_training_view_takes_a_random_window_anywhere(videos):
    vl = VideoList(videos / "list.txt", frames=8, frame_step=4, img_size=32)
    starts = set()
    for seed in range(6):  # after seeking to a keyframe (every 8 frames) inside the video
        clip, label = vl.load(1, np.random.default_rng(seed))
        ids = frame_numbers(clip)
        assert clip.shape == (3, 8, 32, 32) and label == 0
        assert [i - ids[0] for i in ids] == [0, 4, 9, 13, 18, 22, 27, 31] and 0 <= ids[0] <= 200 - 32
        starts.add(ids[0])
    assert len(starts) > 3
    assert torch.equal(vl[1][0], vl[1][0])  # __getitem__ seeds from the index


def test_probe_view_never_flips(videos):
    """flip=False (probe training, as the official probe: SSv2 has left/right classes) keeps the same
    windows and crops and never mirrors; the pretraining view mirrors about half the clips."""
    flipping = VideoList(videos / "list.txt", frames=8, frame_step=4, img_size=32)
    plain = VideoList(videos / "list.txt", frames=8, frame_step=4, img_size=32, flip=False)
    mirrored = 0
    for seed in range(8):
        a, _ = flipping.load(1, np.random.default_rng(seed))
        b, _ = plain.load(1, np.random.default_rng(seed))
        assert torch.equal(a, b) or torch.equal(a, b.flip(3))
        mirrored += not torch.equal(a, b)
        assert (unnormalise(b)[2].mean(dim=(0, 1)).diff() > 0).all()  # blue rises left to right: not mirrored
    assert 0 < mirrored < 8


def test_eval_views_segments_and_crops(videos):
    vl = VideoList(videos / "list.txt", frames=8, frame_step=4, img_size=32)
    views = vl.eval_views(1, segments=2, views=3)
    assert views.shape == (3, 2, 3, 8, 32, 32)
    offsets = [0, 4, 9, 13, 18, 22, 27, 31]
    for v in range(3):  # windows centred at frames 50 and 150
        assert frame_numbers(views[v, 0]) == [34 + o for o in offsets]
        assert frame_numbers(views[v, 1]) == [134 + o for o in offsets]
    blue = unnormalise(views[:, 0].transpose(0, 1))[2].mean(dim=(1, 2, 3))  # (views,)
    assert blue[0] < blue[1] < blue[2]  # left, centre, right


def test_csv_list_with_header(videos):
    (videos / "list.csv").write_text("path,label\nv40.mp4,1\n")
    vl = VideoList(videos / "list.csv", frames=4, frame_step=2, img_size=16)
    assert vl.items == [(videos / "v40.mp4", 1)] and vl.num_classes == 2
    assert vl[0][0].shape == (3, 4, 16, 16)


@pytest.mark.parametrize("line", ["onlyonefield", "v40.mp4 x", "v40.mp4 -1", "v40.mp4 1.0", "v40.mp4 \u00b2",
                                  "v40.mp4 1000000000000"])
def test_bad_list_line_names_file_and_line(videos, line):
    (videos / "bad.txt").write_text(f"v40.mp4 0\n{line}\n")
    with pytest.raises(DataError, match=f"bad.txt:2: .*{line}"):
        VideoList(videos / "bad.txt")


def test_list_encodings(videos):
    """A spreadsheet's UTF-8 CSV (byte-order mark first) reads; another encoding is named with its line."""
    (videos / "bom.csv").write_bytes("path,label\nv40.mp4,1\n".encode("utf-8-sig"))
    assert VideoList(videos / "bom.csv").items == [(videos / "v40.mp4", 1)]
    (videos / "latin1.txt").write_bytes("v40.mp4 0\ncaf\u00e9.mp4 1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:2: not UTF-8 text \(byte 0xe9\)"):
        VideoList(videos / "latin1.txt")


def test_worker_errors_arrive_as_one_line():
    """With workers > 0 a DataError crosses the process boundary as the same one line as with workers=0,
    not torch's "Caught DataError in DataLoader worker process 0. Original Traceback ..."."""
    masker = MultiBlockMasker((2, 4, 4), seed=0)
    messages = []
    for workers in (0, 1):
        with pytest.raises(DataError) as e:
            list(make_train_loader(Flaky(10, bad=range(10)), masker, 2, 0, 1, workers=workers))
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "\n" not in messages[1] and messages[1].startswith("50 videos")


def test_missing_or_empty_list(videos):
    with pytest.raises(DataError, match=r"nothere\.txt: list file not found"):
        VideoList(videos / "nothere.txt")
    (videos / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.txt: the list names no videos"):
        VideoList(videos / "empty.txt")


def test_bad_videos_raise_data_error_naming_file_and_line(videos):
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (videos / "notes.txt").write_text("not a video\n")
    with av.open(str(videos / "audio.wav"), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        samples.sample_rate = 8000
        out.mux(stream.encode(samples))
        out.mux(stream.encode())
    cases = {"gone.mp4": "video file not found", "zero.mp4": "empty file", "random.mp4": "cannot decode",
             "audio.wav": "no video stream", "notes.txt": "cannot decode"}
    (videos / "broken.txt").write_text("".join(f"{name} 0\n" for name in cases))
    vl = VideoList(videos / "broken.txt", frames=4, frame_step=2, img_size=16)
    for i, (name, reason) in enumerate(cases.items()):
        with pytest.raises(DataError, match=f"{name} .*broken.txt:{i + 1}.*{reason}"):
            vl.load(i, np.random.default_rng(0))
        with pytest.raises(DataError, match=f"{name} .*broken.txt:{i + 1}.*{reason}"):
            vl.eval_views(i, 2, 3)


# ----------------------------------------------------------------------------------------------------
# Images


@pytest.fixture
def images(tmp_path):
    for name, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for k in range(2):
            Image.new("RGB", (40 + 10 * k, 30), colour).save(tmp_path / name / f"{k}.png")
    return tmp_path


def test_image_folder_repeats_the_image_along_time(images):
    ds = ImageFolder(images, frames=4, img_size=28)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 4
    clip, label = ds[2]
    assert clip.shape == (3, 4, 28, 28) and label == 1
    assert (clip == clip[:, :1]).all()  # the same image in every frame
    assert torch.allclose(unnormalise(clip)[:, 0, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)  # blue
    train = ImageFolder(images, frames=4, img_size=28, train=True)
    assert train[0][0].shape == (3, 4, 28, 28) and torch.equal(train[0][0], train[0][0])


def test_image_eval_resizes_short_side_to_256_224_then_centre_crops(tmp_path):
    (tmp_path / "a").mkdir()
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[..., 0] = np.arange(64) * 4  # red = 4 x column
    Image.fromarray(pixels).save(tmp_path / "a" / "ramp.png")
    clip, _ = ImageFolder(tmp_path, frames=2, img_size=28)[0]  # short side 28 * 256/224 = 32: no resize
    red = (unnormalise(clip)[0, 0] * 255).round()  # (28, 28)
    assert torch.equal(red[0], torch.arange(18, 46) * 4.0)  # columns 18..45: the centre 28 of 64


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere: image folder not found"):
        ImageFolder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no class folders"):
        ImageFolder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "ok.png")
    with pytest.raises(DataError, match="dog: empty class folder"):
        ImageFolder(tmp_path)
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image")
    ds = ImageFolder(tmp_path, frames=2, img_size=8)
    with pytest.raises(DataError, match=r"broken\.jpg: cannot read the image"):
        ds[1]


# ----------------------------------------------------------------------------------------------------
# The probe's data (probe.py)


def test_train_fraction_is_stratified_and_seeded():
    labels = [0] * 100 + [1] * 10 + [2] * 3
    keep = stratified_subset(labels, 0.1, seed=0)
    assert Counter(labels[i] for i in keep) == {0: 10, 1: 1, 2: 1}  # per class, at least one each
    assert keep == stratified_subset(labels, 0.1, seed=0)
    assert keep != stratified_subset(labels, 0.1, seed=1)
    with pytest.raises(ValueError, match="train_fraction"):
        stratified_subset(labels, 0.0, seed=0)


def test_probe_items_batch_clips_and_keep_unreadable_videos(videos, tmp_path):
    """An evaluation item of a video list holds views x segments clips, so a batch of batch_size clips holds
    batch_size // (views * segments) videos; an unreadable video stays in its batch as its message; labels
    are read and checked without decoding, and a bad one names the list's line."""
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    lines = f"{videos / 'v40.mp4'} 1\n{tmp_path / 'bad.mp4'} 0\n{videos / 'v200.mp4'} 2\n"
    (tmp_path / "list.txt").write_text(lines)
    vl = VideoList(tmp_path / "list.txt", frames=4, frame_step=2, img_size=32, train=False)
    items = ProbeItems(vl, range(3), train=False, segments=2, views=3)
    batches = list(items.loader(batch_size=12, shuffle=False))  # 2 videos of 6 clips per batch
    assert [y.tolist() for _, y, _ in batches] == [[1], [2]]
    clips, _, errors = batches[0]
    assert clips.shape == (1, 3, 2, 3, 4, 32, 32) and len(errors) == 1 and "bad.mp4" in errors[0]
    assert batches[1][2] == []
    assert labels_of(vl, 3) == [1, 0, 2]
    with pytest.raises(ValueError, match=r"v200\.mp4 \(.*list\.txt:3\): label 2 is outside the probe's 2"):
        labels_of(vl, 2)


def test_labels_of_synthetic_clips_are_the_label_they_are_made_for():
    ds = SyntheticVideos(64, seed=5, label="motion")
    assert labels_of(ds, 8) == [ds[i][1] for i in range(64)] == [ds.labels(i)[1] for i in range(64)]
    with pytest.raises(ValueError, match=r"synthetic item \d+: label \d is outside the probe's 3 classes"):
        labels_of(ds, 3)


# ----------------------------------------------------------------------------------------------------
# List files for real datasets (python data.py folders / ssv2)


def test_folder_list_numbers_sorted_classes_and_keeps_them_across_splits(tmp_path, capsys):
    """Kinetics-style class folders -> a list VideoList reads with the labels of the sorted class names; the
    validation split, listed with the training split's classes, gets the same numbers even with a class
    missing; class names with spaces survive."""
    for split, names in (("train", ["air drumming", "abseiling", "zumba"]), ("val", ["abseiling", "zumba"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                (tmp_path / split / name / f"{name[:3]}{i}.mp4").write_bytes(b"")
        (tmp_path / split / "abseiling" / "notes.txt").write_text("not a video")
    data.main(["folders", str(tmp_path / "train"), str(tmp_path / "lists/train.txt")])
    assert "wrote" in capsys.readouterr().out
    classes = (tmp_path / "lists/train.classes.txt").read_text().splitlines()
    assert classes == ["abseiling", "air drumming", "zumba"]
    data.main(["folders", str(tmp_path / "val"), str(tmp_path / "lists/val.txt"),
               "--classes", str(tmp_path / "lists/train.classes.txt")])
    train, val = VideoList(tmp_path / "lists/train.txt"), VideoList(tmp_path / "lists/val.txt")
    assert [(p.name, y) for p, y in train.items] == [("abs0.mp4", 0), ("abs1.mp4", 0), ("air0.mp4", 1),
                                                     ("air1.mp4", 1), ("zum0.mp4", 2), ("zum1.mp4", 2)]
    assert [(p.name, y) for p, y in val.items] == [("abs0.mp4", 0), ("abs1.mp4", 0), ("zum0.mp4", 2),
                                                   ("zum1.mp4", 2)]
    assert all(p.is_absolute() and p.parent.parent.name == "val" for p, _ in val.items)
    (tmp_path / "val" / "yoga").mkdir()
    with pytest.raises(DataError, match=r"class folders \['yoga'\] are not among the 3 given classes"):
        data.folder_list(tmp_path / "val", classes)


def test_ssv2_list_maps_templates_to_the_released_label_indices(tmp_path):
    labels = {"Putting something on a surface": "1", "Pushing something from left to right": "0"}
    split = [{"id": "78687", "template": "Putting [something] on a surface", "label": "putting a cup down"},
             {"id": "42", "template": "Pushing [something] from left to right", "label": "pushing a pen"}]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "train.json").write_text(json.dumps(split))
    data.main(["ssv2", str(tmp_path / "videos"), str(tmp_path / "labels.json"), str(tmp_path / "train.json"),
               str(tmp_path / "ssv2_train.txt")])
    items = VideoList(tmp_path / "ssv2_train.txt").items
    assert [(p.name, y) for p, y in items] == [("78687.webm", 1), ("42.webm", 0)]
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "7", "template": "Spinning [something]"}]))
    with pytest.raises(SystemExit, match=r"video 7 has template 'Spinning something', which .* does not"):
        data.main(["ssv2", str(tmp_path), str(tmp_path / "labels.json"), str(tmp_path / "bad.json"),
                   str(tmp_path / "x.txt")])


def test_scenes_clean_is_still_and_cluttered_moves_around_the_object():
    """The clean scene changes only where the object is (in either frame); the cluttered one changes almost
    everywhere (drift, blobs, noise)."""
    clean = SyntheticVideos(8, seed=2, scene="clean")
    cluttered = SyntheticVideos(8, seed=2, scene="cluttered")
    for i in range(4):
        a = clean.labels(i)[0]
        still = clean.render(i, a, 0)  # (3, T, S, S), moving right
        changed = np.abs(still[:, 1:] - still[:, :-1]).max(0) > 0  # (T-1, S, S)
        assert 0 < changed.mean() < 0.4  # the object's path only
        busy = cluttered.render(i, a, 0)
        assert (np.abs(busy[:, 1:] - busy[:, :-1]).max(0) > 0).mean() > 0.9
    with pytest.raises(ValueError, match="scene must be one of"):
        SyntheticVideos(8, scene="foggy")


def test_the_fast_scene_is_the_clean_one_with_the_object_moving_2_5x_as_far():
    """Same draws, so frame 0 is the clean scene's; moving right, the object's mask reaches in frame 2 the
    place the clean scene's reaches in frame 5 (2.5 x 2 = 5 frames' worth of the same speed)."""
    clean, fast = SyntheticVideos(8, seed=4, scene="clean"), SyntheticVideos(8, seed=4, scene="fast")
    for i in range(8):
        a = clean.labels(i)[0]
        (c, c_mask), (f, f_mask) = clean.render(i, a, 0, with_mask=True), fast.render(i, a, 0, with_mask=True)
        assert np.array_equal(c[:, 0], f[:, 0])
        assert not np.array_equal(c[:, 2], f[:, 2])
        assert (c_mask[5] != f_mask[2]).sum() <= 8  # the same place, up to rounding on the edge pixels
        assert (c_mask[2] != f_mask[2]).sum() > 50  # and not where the clean scene's object is at frame 2
