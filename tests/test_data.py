"""Data loaders: shapes and ranges, exact resume, epoch rollover, rank shards, bad files, errors."""

import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from archirf.config import Config, DataConfig
from archirf.data import DataError, build_loader
from archirf.data.order import ResumableOrder
from archirf.data.tensor_loader import DeviceTensorLoader

CPU = torch.device("cpu")


def make_cfg(seed=0, **data) -> Config:
    return Config(seed=seed, data=DataConfig(**data))


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)


def assert_resumes_exactly(make_loader, k, m):
    """k batches, save, m more; a fresh loader restored from the state yields the same m."""
    first = make_loader()
    take(first, k)
    state = first.state_dict()
    assert all(type(v) is int for v in state.values()), state
    expected = take(first, m)
    second = make_loader()
    second.load_state_dict(state)
    assert_same_batches(take(second, m), expected)
    return first, state, expected


def index_loader(num_samples, batch_size, *, seed=0, rank=0, world_size=1, random_flip=False):
    """A DeviceTensorLoader whose image i holds i in its left column and -1 elsewhere, so a
    batch reveals which samples it holds and whether each was flipped."""
    images = torch.full((num_samples, 1, 2, 3), -1.0)
    images[:, 0, :, 0] = torch.arange(num_samples, dtype=torch.float32)[:, None]
    labels = torch.arange(num_samples)
    return DeviceTensorLoader(images, labels, 0, batch_size, seed=seed, rank=rank, world_size=world_size,
                              random_flip=random_flip)


# ---------------------------------------------------------------------------------------------- order


def test_order_epochs_are_permutations_and_batches_continue_across_epochs():
    n, batch = 10, 4
    loader = index_loader(n, batch)
    seen = torch.cat([y for _, y in take(loader, 5)]).tolist()        # 20 positions = 2 epochs exactly
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:]) == list(range(n))
    assert seen[:n] != seen[n:], "each epoch must have its own order"
    assert loader.state_dict() == {"epoch": 2, "index": 0}            # normalised at the epoch end
    # The 3rd batch straddled the epoch end: 2 samples of epoch 0, then 2 of epoch 1.
    order = ResumableOrder(n, seed=0)
    assert order.take(4) == [(0, 0, 4)] and order.take(4) == [(0, 4, 8)] and order.take(4) == [(0, 8, 10), (1, 0, 2)]


def test_order_depends_only_on_seed_and_epoch():
    a, b = ResumableOrder(50, seed=3), ResumableOrder(50, seed=3)
    b.take(1234)  # wherever b is, epoch e's permutation is the same
    for e in range(3):
        assert torch.equal(a.permutation(e)[0], b.permutation(e)[0])
        assert torch.equal(a.permutation(e)[1], b.permutation(e)[1])
    assert not torch.equal(a.permutation(0)[0], ResumableOrder(50, seed=4).permutation(0)[0])


def test_batch_larger_than_dataset_spans_several_epochs():
    loader = index_loader(3, 8)
    y = next(loader)[1]
    assert y.shape == (8,) and sorted(y[:3].tolist()) == [0, 1, 2] and sorted(y[3:6].tolist()) == [0, 1, 2]
    assert loader.state_dict() == {"epoch": 2, "index": 2}


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_one_rank_stream_into_contiguous_runs(world_size):
    """Each call takes the next world_size * batch samples of the global stream; rank r gets the r-th
    run of batch of them. No padding: every sample once per epoch, whatever the world size."""
    n, batch, calls = 11, 2, 7                                          # crosses epoch ends
    one = torch.cat([y for _, y in take(index_loader(n, batch * world_size), calls)])
    ranks = [index_loader(n, batch, rank=r, world_size=world_size) for r in range(world_size)]
    per_call = [[next(r)[1] for r in ranks] for _ in range(calls)]
    assert torch.equal(torch.cat([y for ys in per_call for y in ys]), one)
    assert sorted(one[:n].tolist()) == list(range(n))
    states = [r.state_dict() for r in ranks]
    assert all(st == states[0] for st in states), "the state must be the same on every rank"
    assert states[0] == {"epoch": (calls * batch * world_size) // n, "index": (calls * batch * world_size) % n}


def test_state_from_two_ranks_resumes_on_one_and_three_at_the_same_place():
    two = [index_loader(12, 2, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):                                                  # 16 samples: into epoch 1
        [next(r) for r in two]
    state = two[0].state_dict()
    assert state == {"epoch": 1, "index": 4}
    reference = index_loader(12, 6)                                     # one rank, same global batch
    reference.load_state_dict(state)
    expected = next(reference)[1]
    three = [index_loader(12, 2, rank=r, world_size=3) for r in range(3)]
    for r in three:
        r.load_state_dict(state)
    assert torch.equal(torch.cat([next(r)[1] for r in three]), expected)


def test_flips_are_per_sample_and_survive_resume():
    def make():
        return index_loader(10, 3, random_flip=True)

    _, _, batches = assert_resumes_exactly(make, k=2, m=6)     # crosses an epoch boundary
    x = torch.cat([b[0] for b in batches])                      # (18, 1, 2, 3)
    flipped = x[:, 0, 0, -1] >= 0                               # the index column moved to the right
    assert flipped.any() and (~flipped).any()
    index = torch.where(flipped, x[:, 0, 0, -1], x[:, 0, 0, 0]).long()
    assert torch.equal(index, torch.cat([b[1] for b in batches])), "a flip must move the whole image"


def test_resume_with_index_past_the_end_starts_the_next_epoch():
    order = ResumableOrder(10, seed=0, world_size=2)
    order.load_state_dict({"epoch": 3, "index": 12})    # written for a larger dataset
    assert order.state_dict() == {"epoch": 4, "index": 0}


def test_loaders_leave_the_global_rng_alone(tmp_path):
    write_tree(tmp_path, {"a": 3, "b": 3})
    loaders = [build_loader(make_cfg(), 4, CPU), build_loader(make_cfg(source="synthetic"), 4, CPU),
               build_loader(make_cfg(source="folder", root=str(tmp_path), num_classes=2, num_workers=2,
                                     random_flip=True), 4, CPU)]
    for loader in loaders:
        before = torch.get_rng_state()
        take(loader, 3)
        loader.load_state_dict({"epoch": 0, "index": 1})
        take(loader, 2)
        assert torch.equal(before, torch.get_rng_state()), type(loader).__name__


# --------------------------------------------------------------------------------------------- digits


@pytest.mark.parametrize("resolution,channels", [(16, 1), (32, 3), (8, 1)])
def test_digits_shapes_range_and_labels(resolution, channels):
    loader = build_loader(make_cfg(resolution=resolution, channels=channels), 600, CPU)
    assert loader.num_samples == 1797 and loader.num_classes == 10
    batches = take(loader, 3)                                    # 1800 > one epoch
    x, y = batches[0]
    assert x.shape == (600, channels, resolution, resolution) and x.dtype == torch.float32
    assert y.shape == (600,) and y.dtype == torch.long
    x = torch.cat([b[0] for b in batches])
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.99 and x.max() > 0.9
    assert set(torch.cat([b[1] for b in batches]).tolist()) == set(range(10))
    if channels == 3:
        assert torch.equal(x[:, 0], x[:, 2])
    assert (x[:, 0, :, 0] < -0.9).float().mean() > 0.95, "digits have a dark left edge"
    assert abs(x.mean() + 0.39) < 0.01, "resizing must keep the mean brightness"


def test_digits_are_scikit_learns_digits_read_without_importing_it():
    """The digits come from the file load_digits reads, parsed as it parses it, in a process that never imports
    scikit-learn (whose import would lengthen every run's start)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from archirf.data.digits import _digits_arrays

    pixels, labels = _digits_arrays()
    ref = load_digits()
    assert pixels.shape == (1797, 8, 8) and np.array_equal(pixels, ref.images)
    assert np.array_equal(labels, ref.target) and set(labels.tolist()) == set(range(10))
    code = ("import sys; from archirf.data.digits import digits_tensors; x, y = digits_tensors(16, 1); "
            "assert x.shape == (1797, 1, 16, 16); print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('sklearn', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_digits_resume_exact_across_epochs():
    assert_resumes_exactly(lambda: build_loader(make_cfg(seed=5, random_flip=True), 256, CPU), k=5, m=4)


def test_digits_unconditional_labels_are_zero_and_bad_num_classes_fails():
    _, y = next(build_loader(make_cfg(num_classes=0), 64, CPU))
    assert not y.any()
    with pytest.raises(DataError, match="num_classes=10"):
        build_loader(make_cfg(num_classes=7), 8, CPU)


def test_digits_flip_is_the_only_difference_when_enabled():
    x_plain, _ = next(build_loader(make_cfg(seed=1), 300, CPU))
    x_flip, _ = next(build_loader(make_cfg(seed=1, random_flip=True), 300, CPU))
    same = (x_plain == x_flip).flatten(1).all(1)
    mirrored = (x_plain.flip(-1) == x_flip).flatten(1).all(1)
    assert (same | mirrored).all() and (~same).sum() > 100 and same.sum() > 100


def test_synthetic_is_fixed_by_seed():
    cfg = make_cfg(source="synthetic", synthetic_size=32, resolution=8, channels=3)
    a, b = build_loader(cfg, 16, CPU), build_loader(cfg, 16, CPU)
    assert a.num_samples == 32
    assert_same_batches(take(a, 3), take(b, 3))
    other_seed = make_cfg(seed=1, source="synthetic", synthetic_size=32, resolution=8, channels=3)
    x, y = next(build_loader(other_seed, 32, CPU))
    assert x.shape == (32, 3, 8, 8) and x.min() >= -1 and x.max() <= 1 and y.max() < 10
    assert len(torch.unique(x.flatten(1), dim=0)) == 32


# --------------------------------------------------------------------------------------------- folder


def write_tree(root, counts, size=(9, 13)):
    """Portrait PNGs (the crop cuts rows), each its own colour with bright left columns (so flips show)."""
    rng = np.random.default_rng(0)
    for cls, count in counts.items():
        folder = os.path.join(root, cls) if cls else str(root)
        os.makedirs(folder, exist_ok=True)
        for i in range(count):
            arr = np.broadcast_to(rng.integers(0, 200, 3, dtype=np.uint8), (size[1], size[0], 3)).copy()
            arr[:, :3] = 255
            Image.fromarray(arr).save(os.path.join(folder, f"img{i:02d}.png"))


def folder_cfg(root, **data):
    data = {"source": "folder", "root": str(root), "resolution": 8, "channels": 3, "num_classes": 3,
            "num_workers": 0, **data}
    return make_cfg(seed=data.pop("seed", 0), **data)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_shapes_and_exact_resume(tmp_path, num_workers):
    write_tree(tmp_path, {"cat": 4, "dog": 3, "emu": 4})
    cfg = folder_cfg(tmp_path, num_workers=num_workers, random_flip=True, seed=2)
    first, state, expected = assert_resumes_exactly(lambda: build_loader(cfg, 4, CPU), k=2, m=6)
    assert first.num_samples == 11 and first.classes == ["cat", "dog", "emu"] and first.num_classes == 3
    x, y = expected[0]
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() >= -1 and x.max() <= 1
    # Rewinding a loader whose workers have already prefetched past the saved position.
    first.load_state_dict(state)
    assert_same_batches(take(first, 6), expected)
    # Flips happen, and only as whole mirror images (bright column on the left or the right).
    x = torch.cat([b[0] for b in expected])
    left, right = x[:, :, :, 0] > 0.95, x[:, :, :, -1] > 0.95
    assert (left.all((1, 2)) ^ right.all((1, 2))).all() and left.all((1, 2)).any() and right.all((1, 2)).any()
    first.close()


def test_folder_labels_follow_sorted_class_folders(tmp_path):
    write_tree(tmp_path, {"b": 2, "a": 3, "c": 1})
    os.makedirs(tmp_path / "empty")
    loader = build_loader(folder_cfg(tmp_path), 6, CPU)
    assert loader.classes == ["a", "b", "c"]
    y = next(loader)[1]
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 2]


def test_folder_corrupt_file_is_skipped_counted_and_warned(tmp_path):
    write_tree(tmp_path, {"a": 3, "b": 3, "c": 3})
    bad = tmp_path / "b" / "img01.png"
    bad.write_bytes(b"this is not a png")
    cfg = folder_cfg(tmp_path)

    def one_epoch():
        loader = build_loader(cfg, 3, CPU)
        with pytest.warns(UserWarning, match="img01.png") as record:
            batches = take(loader, 3)
        return loader, batches, [r for r in record if "unreadable" in str(r.message)]

    loader, batches, warned = one_epoch()
    assert loader.num_skipped == 1 and str(bad) in loader.skipped_files and len(warned) == 1
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (9, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    # Its replacement is the next file in dataset order (b/img02.png, label 1): deterministic.
    y = torch.cat([b[1] for b in batches])
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert_same_batches(one_epoch()[1], batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # a file already reported is not warned about again
        take(loader, 3)
    assert loader.num_skipped == 1


def test_folder_with_workers_skips_corrupt_files(tmp_path):
    write_tree(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "a" / "img00.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    loader = build_loader(folder_cfg(tmp_path, num_classes=2, num_workers=2), 4, CPU)
    with pytest.warns(UserWarning, match="img00.png"):
        x = torch.cat([next(loader)[0] for _ in range(4)])
    assert loader.num_skipped == 1 and torch.isfinite(x).all()
    loader.close()


def test_folder_single_folder_is_one_class(tmp_path):
    write_tree(tmp_path, {"": 5})
    loader = build_loader(folder_cfg(tmp_path, num_classes=1, channels=1), 5, CPU)
    assert loader.classes == [tmp_path.name] and loader.num_samples == 5
    x, y = next(loader)
    assert x.shape == (5, 1, 8, 8) and not y.any()


def test_folder_missing_empty_and_mismatched_roots_fail_clearly(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}.*does not exist"):
        build_loader(folder_cfg(missing), 4, CPU)
    empty = tmp_path / "empty"
    os.makedirs(empty / "cls")
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"{empty} contains no images"):
        build_loader(folder_cfg(empty), 4, CPU)
    write_tree(tmp_path / "two", {"x": 1, "y": 1})
    with pytest.raises(DataError, match="has 2 classes .*set data.num_classes=2"):
        build_loader(folder_cfg(tmp_path / "two", num_classes=3), 4, CPU)
    unconditional = build_loader(folder_cfg(tmp_path / "two", num_classes=0), 2, CPU)
    assert not next(unconditional)[1].any()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_of_only_unreadable_images_fails_before_the_first_batch(tmp_path, num_workers):
    write_tree(tmp_path, {"a": 2, "b": 2})
    reasons = {}
    for i, path in enumerate(sorted(tmp_path.rglob("*.png"))):
        path.write_bytes(b"not an image %d" % i)
        reasons[path] = "UnidentifiedImageError"
    first = sorted(reasons)[0]
    with pytest.raises(DataError) as err:
        build_loader(folder_cfg(tmp_path, num_classes=2, num_workers=num_workers), 2, CPU)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert f"none of the 4 images under data.root={tmp_path} could be decoded" in msg
    assert f"{first}: UnidentifiedImageError" in msg          # the first file, with its own reason


def test_folder_dataset_names_the_file_it_failed_on(tmp_path):
    """Even past the loader's probe (files broken mid-run), the error pairs each path with its reason."""
    from archirf.data.folder import FolderDataset

    write_tree(tmp_path, {"": 3})
    paths = sorted(tmp_path.glob("*.png"))
    for path in paths:
        path.write_bytes(b"x")
    dataset = FolderDataset([(str(p), 0) for p in paths], 8, 3)
    with pytest.raises(DataError, match=f"first: {paths[2]}: UnidentifiedImageError"):
        dataset[(2, False)]


def _count_skipped(rank, port, results):
    import torch.distributed as dist

    from archirf.data import skipped_images

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Both ranks met b.png (each looking for a replacement): it counts once.
        files = [{"a.png": "bad", "b.png": "bad"}, {"b.png": "bad", "c.png": "bad"}][rank]
        results[rank] = skipped_images(SimpleNamespace(skipped_files=files))
    finally:
        dist.destroy_process_group()


def test_skipped_images_are_the_union_over_ranks():
    import socket

    import torch.multiprocessing as mp

    from archirf.data import skipped_images

    assert skipped_images(SimpleNamespace()) == {}                            # a source that never skips
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_count_skipped, args=(port, results), nprocs=2)
    assert dict(results) == {0: {"skipped_images": 3}, 1: {"skipped_images": 3}}
