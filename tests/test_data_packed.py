"""The fast data paths: DALI decoding (CPU pipelines here; the `dali` extra must be installed), tar shards, packed uint8 arrays and
`archirf.prepare`: the same images, labels and order as the PIL loader, exact resume across world sizes,
bad files skipped and counted, writers and readers round-tripping, one-line errors."""

import json
import os
import socket
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from archirf.config import Config, ConfigError, DataConfig, load_config
from archirf.data import DataError, build_loader
from archirf.prepare import main as prepare_main

from test_data import assert_resumes_exactly, assert_same_batches, take
from test_distributed import TINY, rows, torchrun

CPU = torch.device("cpu")


def photo(rng, h, w, channels=3):
    """A smooth picture with texture and a bright left edge (so resizing, cropping and flips all show)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = [np.sin(6 * xx * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(5 * yy * rng.uniform(0.5, 2))
            for _ in range(channels)]
    arr = (np.stack(base, -1) * 90 + 128 + rng.normal(0, 12, (h, w, channels))).clip(0, 255).astype(np.uint8)
    arr[:, : max(2, w // 8)] = 250
    return arr[..., 0] if channels == 1 else arr


def write_photos(root, counts, channels=3, sizes=((37, 53), (61, 29), (24, 24), (90, 70))):
    """JPEGs and PNGs of assorted sizes and aspect ratios, one sub-folder per class."""
    rng = np.random.default_rng(0)
    for cls, count in counts.items():
        os.makedirs(root / cls, exist_ok=True)
        for i in range(count):
            h, w = sizes[(i + len(cls)) % len(sizes)]
            image = Image.fromarray(photo(rng, h, w, channels))
            image.save(root / cls / f"img{i:02d}.{'jpg' if i % 2 else 'png'}", quality=92)


def cfg_of(root, source="folder", seed=1, **data):
    data = {"source": source, "root": str(root), "resolution": 16, "channels": 3, "num_classes": 3,
            "num_workers": 0, "random_flip": True, **data}
    return Config(seed=seed, data=DataConfig(**data))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_photos(root, {"ant": 5, "bee": 4, "cat": 5})
    return root


def levels(a, b):
    """Mean |a - b| of two [-1, 1] batches in 0..255 levels."""
    return float((a - b).abs().mean() * 127.5)


# ------------------------------------------------------------------------------------------------ DALI


@pytest.mark.parametrize("resolution,channels", [(16, 3), (24, 1)])
def test_dali_gives_the_torch_paths_labels_order_and_flips_and_close_pixels(tmp_path, resolution, channels):
    write_photos(tmp_path, {"ant": 5, "bee": 4, "cat": 5}, channels=channels)
    torch_batches = take(build_loader(cfg_of(tmp_path, loader="torch", resolution=resolution, channels=channels),
                                      5, CPU), 6)
    loader = build_loader(cfg_of(tmp_path, loader="dali", resolution=resolution, channels=channels), 5, CPU)
    assert type(loader).__name__ == "DaliLoader" and loader.classes == ["ant", "bee", "cat"]
    dali_batches = take(loader, 6)
    for (xt, yt), (xd, yd) in zip(torch_batches, dali_batches):
        assert torch.equal(yt, yd)
        assert xd.shape == xt.shape == (5, channels, resolution, resolution) and xd.dtype == torch.float32
        assert xd.min() >= -1 and xd.max() <= 1
        # The tolerance docs/data.md states: ADM box-halves large images before its bicubic resize, DALI
        # resizes once (antialiased); the crops are aligned (a misaligned crop alone costs ~10 levels here).
        assert levels(xt, xd) < 8
        # Flips agree: the bright edge is on the same side.
        assert torch.equal(xt[:, :, :, 0].mean((1, 2)) > xt[:, :, :, -1].mean((1, 2)),
                           xd[:, :, :, 0].mean((1, 2)) > xd[:, :, :, -1].mean((1, 2)))


def test_dali_matches_adm_to_rounding_when_no_box_halving_happens(tmp_path):
    # Short sides below twice the target: ADM resizes bicubically once, as DALI does.
    write_photos(tmp_path, {"a": 4, "b": 4}, sizes=((30, 47), (41, 20), (20, 20)))
    c = dict(resolution=16, num_classes=2, random_flip=False)
    for (xt, yt), (xd, yd) in zip(take(build_loader(cfg_of(tmp_path, loader="torch", **c), 4, CPU), 2),
                                  take(build_loader(cfg_of(tmp_path, loader="dali", **c), 4, CPU), 2)):
        assert torch.equal(yt, yd) and levels(xt, xd) < 1.0


def test_dali_resumes_exactly_and_its_stream_does_not_depend_on_the_world_size(photos):
    cfg = cfg_of(photos, loader="dali")
    assert_resumes_exactly(lambda: build_loader(cfg, 4, CPU), k=3, m=4)      # 14 images: crosses an epoch end
    one = take(build_loader(cfg, 4, CPU), 6)
    ranks = [build_loader(cfg, 4, CPU, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        for r in range(2):
            assert_same_batches([next(ranks[r])], [one[2 * step + r]])
    # A 2-rank checkpoint (after 3 steps = 6 micro batches) continues on one rank with batch 6.
    resumed = build_loader(cfg, 4, CPU)
    resumed.load_state_dict(ranks[0].state_dict())
    assert_same_batches(take(resumed, 1), take(build_loader(cfg, 4, CPU), 7)[6:])


def _dali_rank(rank, port, state, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loader = build_loader(state["cfg"], 4, CPU, rank=rank, world_size=2)
        loader.load_state_dict(state["position"])
        batches = take(loader, 2)
        gathered = [None, None]
        dist.all_gather_object(gathered, [(x, y) for x, y in batches])
        torch.save((gathered, loader.state_dict()), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_dali_two_gloo_ranks_resume_a_one_rank_position_and_hand_back(photos, tmp_path):
    import torch.multiprocessing as mp

    cfg = cfg_of(photos, loader="dali")
    one = build_loader(cfg, 4, CPU)
    take(one, 3)                                      # a mid-epoch position
    expected = take(build_loader(cfg, 4, CPU), 7)[3:]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # (results in files: a multiprocessing Manager forks this process, whose DALI threads do not survive a fork)
    mp.spawn(_dali_rank, args=(port, {"cfg": cfg, "position": one.state_dict()}, str(tmp_path)), nprocs=2)
    gathered, state = torch.load(tmp_path / "rank0.pt")
    assert torch.load(tmp_path / "rank1.pt")[1] == state
    assert_same_batches([gathered[0][0], gathered[1][0], gathered[0][1], gathered[1][1]], expected)
    again = build_loader(cfg, 4, CPU)                 # and the 2-rank state resumes on one rank
    again.load_state_dict(state)
    assert_same_batches(take(again, 1), take(build_loader(cfg, 4, CPU), 8)[7:])


def test_dali_skips_and_counts_bad_files_as_the_torch_path_does(tmp_path):
    write_photos(tmp_path, {"ant": 4, "bee": 4, "cat": 4})
    good = (tmp_path / "ant" / "img01.jpg").read_bytes()
    (tmp_path / "ant" / "img98.jpg").write_bytes(b"not an image")                       # garbage
    (tmp_path / "bee" / "img98.jpg").write_bytes(good[: len(good) // 2])               # truncated download
    # JPEG start and end markers around garbage: only a decoder finds out (DALI fails, the loader recovers)
    (tmp_path / "cat" / "img98.jpg").write_bytes(good[:3] + bytes(range(256)) * 3 + good[-2:])
    (tmp_path / "cat" / "img99.png").write_bytes(b"")                                  # empty
    results = {}
    for kind in ("torch", "dali"):
        loader = build_loader(cfg_of(tmp_path, loader=kind), 4, CPU)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = take(loader, 8)                 # 16 files, 2 epochs
        results[kind] = (batches, set(loader.skipped_files))
        assert loader.num_skipped == 4
        assert sum("skipping unreadable image" in str(w.message) for w in caught) == 4
    (torch_batches, torch_bad), (dali_batches, dali_bad) = results["torch"], results["dali"]
    assert torch_bad == dali_bad == {str(tmp_path / c / n) for c, n in
                                     (("ant", "img98.jpg"), ("bee", "img98.jpg"), ("cat", "img98.jpg"),
                                      ("cat", "img99.png"))}
    for (xt, yt), (xd, yd) in zip(torch_batches, dali_batches):   # the same replacements
        assert torch.equal(yt, yd) and levels(xt, xd) < 8


def test_missing_dali_names_the_extra_to_install(photos, monkeypatch):
    from archirf.data.folder import use_dali

    assert use_dali(cfg_of(photos, loader="auto"), torch.device("cuda"))              # installed: auto takes it
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)              # import fails as if not installed
    with pytest.raises(DataError, match=r"pip install 'archirf\[dali\]'.*data.loader=torch"):
        build_loader(cfg_of(photos, loader="dali"), 4, CPU)
    assert not use_dali(cfg_of(photos, loader="auto"), torch.device("cuda"))          # not installed: PIL
    assert type(build_loader(cfg_of(photos, loader="auto"), 4, CPU)).__name__ == "FolderLoader"


def test_dali_reads_files_as_pil_does_exif_rotations_and_other_formats(tmp_path):
    """EXIF orientation is not applied (ADM's preprocessing does not); a file with an image format DALI does not
    take (a TIFF named .jpg) is read through PIL, not skipped; a file DALI alone fails on is fed PIL's decoding."""
    write_photos(tmp_path, {"a": 3, "b": 3})
    rng = np.random.default_rng(5)
    exif = Image.Exif()
    exif[0x0112] = 6                                                  # "rotate 90 CW to display"
    Image.fromarray(photo(rng, 20, 44)).save(tmp_path / "a" / "img50.jpg", quality=95, exif=exif)
    Image.fromarray(photo(rng, 30, 30)).save(tmp_path / "b" / "img51.jpg", format="TIFF")
    c = dict(num_classes=2, random_flip=False)
    pil = take(build_loader(cfg_of(tmp_path, loader="torch", **c), 4, CPU), 4)
    loader = build_loader(cfg_of(tmp_path, loader="dali", **c), 4, CPU)
    for (xt, yt), (xd, yd) in zip(pil, take(loader, 4)):
        assert torch.equal(yt, yd) and levels(xt, xd) < 8
    assert loader.num_skipped == 0
    # DALI failing on a batch whose files PIL reads: the culprit is found and fed as PIL's decoding
    from archirf.data import dali as dali_module

    real = dali_module._dali_decodes
    loader = build_loader(cfg_of(tmp_path, loader="dali", **c), 4, CPU)

    def failing():                                   # DALI took a batch from the feed, then failed on it
        loader._feed(None)
        raise RuntimeError("Critical error in pipeline:\nsimulated")

    loader._pipe.run = failing
    calls = []
    dali_module._dali_decodes = lambda data, channels, device: calls.append(1) or len(calls) != 2
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = take(loader, 4)
    finally:
        dali_module._dali_decodes = real
    rerouted = [w for w in caught if "DALI cannot decode" in str(w.message) and "PIL can" in str(w.message)]
    assert len(rerouted) == 1 and loader.num_skipped == 0
    for (xt, yt), (xd, yd) in zip(pil, got):
        assert torch.equal(yt, yd) and levels(xt, xd) < 8


def test_configs_saved_before_data_storage_still_load(tmp_path):
    from omegaconf import OmegaConf

    from archirf.config import from_yaml_text

    text = OmegaConf.to_yaml(OmegaConf.structured(Config())).replace("  storage: auto", "  latent_storage: auto")
    assert "latent_storage: auto" in text and from_yaml_text(text).data.storage == "auto"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  source: latents\n  root: x.safetensors\n  latent_storage: host\n")
    assert load_config(str(recipe)).data.storage == "host"
    # a digits run's dump held latent_storage: host, which that source never read: dropped, not refused
    assert from_yaml_text(text.replace("latent_storage: auto", "latent_storage: host")).data.storage == "auto"
    recipe.write_text("data:\n  source: latents\n  root: x.safetensors\n  latent_storage: host\n  storage: device\n")
    with pytest.raises(ConfigError, match="data.latent_storage=host and data.storage=device are both set"):
        load_config(str(recipe))


def test_loader_and_storage_settings_are_refused_where_unread():
    with pytest.raises(ConfigError, match="data.loader=dali: decodes image files"):
        load_config(None, ["data.loader=dali"])                         # digits
    with pytest.raises(ConfigError, match="data.storage=host: where an array or latents set lives"):
        load_config(None, ["data.storage=host"])
    with pytest.raises(ConfigError, match="data.source=shards needs data.root"):
        load_config(None, ["data.source=shards"])
    with pytest.raises(ConfigError, match="'data.latent_storage' .* is now 'data.storage'; rename it"):
        load_config(None, ["data.latent_storage=host"])


# ---------------------------------------------------------------------------------------------- shards


def test_shards_round_trip_and_read_like_the_folder(photos, tmp_path):
    out = tmp_path / "shards"
    cfg = ["data.source=folder", f"data.root={photos}", "data.num_classes=3", "--no-progress"]
    assert prepare_main(["shards", "--out", str(out), "--per-shard", "5", *cfg]) == 0
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    # Every file's bytes and class, unchanged, each once.
    files = {p.read_bytes(): ["ant", "bee", "cat"].index(p.parent.name) for p in photos.glob("*/*")}
    seen = {}
    for path in tars:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if not name.endswith(".cls"):
                seen[data] = int(members[name.split(".")[0] + ".cls"])
    assert seen == files
    # The loaders read the same images: one epoch of the shards source is the folder's set of images.
    def epoch(source, root, loader):
        x, y = zip(*take(build_loader(cfg_of(root, source=source, loader=loader, random_flip=False), 14, CPU), 1))
        return sorted((int(label), tuple(image.flatten().tolist())) for image, label in zip(x[0], y[0]))
    assert epoch("shards", out, "torch") == epoch("folder", photos, "torch")
    loader = build_loader(cfg_of(out, source="shards", loader="dali"), 4, CPU)
    assert loader.classes == ["ant", "bee", "cat"]
    assert_resumes_exactly(lambda: build_loader(cfg_of(out, source="shards", loader="dali"), 4, CPU), k=3, m=3)


def test_shard_index_is_cached_rebuilt_on_change_and_foreign_shards_read(tmp_path):
    from archirf.data.shards import INDEX_NAME, find_shard_samples

    # A foreign WebDataset shard: nested keys, a .json beside each image, no index, no .cls.
    root = tmp_path / "wds"
    root.mkdir()
    rng = np.random.default_rng(1)
    with tarfile.open(root / "a.tar", "w") as tar:
        for k in range(3):
            path = tmp_path / f"{k}.png"
            Image.fromarray(photo(rng, 20, 30)).save(path)
            tar.add(path, arcname=f"part/x{k}.png")
            tar.add(path, arcname=f"part/x{k}.seg.png.json")    # not an image suffix: ignored
    samples, classes, labelled = find_shard_samples(str(root))
    assert [m.name for m, _ in samples] == ["part/x0.png", "part/x1.png", "part/x2.png"] and not labelled
    assert (root / INDEX_NAME).exists()
    with pytest.raises(DataError, match="without a .cls class id but data.num_classes=3; set data.num_classes=0"):
        build_loader(cfg_of(root, source="shards"), 2, CPU)
    x, y = next(build_loader(cfg_of(root, source="shards", num_classes=0), 3, CPU))
    assert x.shape == (3, 3, 16, 16) and (y == 0).all()
    # The cached index is used while the shards are unchanged; a truncated one is rebuilt.
    import archirf.data.shards as shards_module

    real = shards_module.build_index
    shards_module.build_index = lambda *a, **k: pytest.fail("the cached index was not used")
    try:
        assert len(find_shard_samples(str(root))[0]) == 3
    finally:
        shards_module.build_index = real
    (root / INDEX_NAME).write_bytes((root / INDEX_NAME).read_bytes()[:100])
    assert len(find_shard_samples(str(root))[0]) == 3
    # A changed shard rebuilds the index.
    with tarfile.open(root / "a.tar", "a") as tar:
        tar.add(tmp_path / "0.png", arcname="part/x3.png")
    assert len(find_shard_samples(str(root))[0]) == 4
    with tarfile.open(root / "b.tar", "w") as tar:
        tar.add(tmp_path / "0.png", arcname="y.png")
        info = tarfile.TarInfo("y.cls")
        info.size = 3
        tar.addfile(info, __import__("io").BytesIO(b"cat"))
    with pytest.raises(DataError, match=r"b.tar:y.cls holds 'cat', not a class id"):
        find_shard_samples(str(root))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .tar shards; write them with python -m archirf.prepare shards"):
        find_shard_samples(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------- array


def test_array_round_trip_equals_the_folder_loader_and_continues_an_interrupted_run(photos, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "images.safetensors"
    args = ["array", "--out", str(out), "--chunk", "4", "--batch", "3", "--keep-parts", "--no-progress",
            "data.source=folder", f"data.root={photos}", "data.num_classes=3", "data.resolution=16", "data.channels=3"]
    assert prepare_main(args) == 0
    with safe_open(str(out), framework="pt") as f:
        images, labels, meta = f.get_tensor("images"), f.get_tensor("labels"), f.metadata()
    assert images.shape == (14, 3, 16, 16) and images.dtype == torch.uint8 and labels.tolist() == [0] * 5 + [1] * 4 + [2] * 5
    assert json.loads(meta["classes"]) == ["ant", "bee", "cat"] and json.loads(meta["skipped"]) == []
    assert json.loads(meta["images"])["count"] == 14
    # The array source yields exactly the folder loader's batches (order, flips, values), and resumes.
    array_cfg = cfg_of(out, source="array")
    assert_same_batches(take(build_loader(array_cfg, 4, CPU), 6), take(build_loader(cfg_of(photos, loader="torch"), 4, CPU), 6))
    assert_resumes_exactly(lambda: build_loader(array_cfg, 4, CPU), k=2, m=3)
    assert_same_batches(take(build_loader(cfg_of(out, source="array", storage="host"), 4, CPU), 3),
                        take(build_loader(array_cfg, 4, CPU), 3))
    # An interrupted run (a chunk missing) continues from its parts and writes the same file.
    first = out.read_bytes()
    os.unlink(out)
    parts = tmp_path / "images.safetensors.parts"
    os.unlink(parts / "chunk-000002.safetensors")
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("chunk-*")}
    assert prepare_main(args) == 0 and out.read_bytes() == first
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("chunk-*") if p.name in kept} == kept  # not redone
    # ...but not with other settings.
    os.unlink(out)
    assert prepare_main(args[:-1] + ["data.channels=1"]) == 2


def test_array_prepared_on_two_ranks_equals_one_rank_and_skips_bad_files(tmp_path, photos):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(photos, src)
    (src / "bee" / "img97.png").write_bytes(b"broken")
    common = ["--chunk", "3", "--no-progress", "data.source=folder", f"data.root={src}", "data.num_classes=3",
              "data.resolution=16", "data.channels=3"]
    assert prepare_main(["array", "--out", str(tmp_path / "one.safetensors"), *common]) == 0
    torchrun(2, "array", "--out", str(tmp_path / "two.safetensors"), *common, module="archirf.prepare")
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    from archirf.data.array import read_array

    images, labels, meta = read_array(str(tmp_path / "one.safetensors"))
    assert len(images) == 14 and json.loads(meta["skipped"])[0].startswith(str(src / "bee" / "img97.png"))


def test_array_settings_are_checked(photos, tmp_path):
    out = tmp_path / "a.safetensors"
    assert prepare_main(["array", "--out", str(out), "--no-progress", "data.source=folder", f"data.root={photos}",
                         "data.num_classes=3", "data.resolution=16", "data.channels=3"]) == 0
    with pytest.raises(DataError, match="are 3x16x16 .* set data.channels=3 data.resolution=16"):
        build_loader(cfg_of(out, source="array", resolution=32), 4, CPU)
    with pytest.raises(DataError, match="holds 3 classes but data.num_classes=2; set data.num_classes=3"):
        build_loader(cfg_of(out, source="array", num_classes=2), 4, CPU)
    with pytest.raises(DataError, match="is a folder; data.source=array reads one .safetensors file"):
        build_loader(cfg_of(photos, source="array"), 4, CPU)
    x, y = next(build_loader(cfg_of(out, source="array", num_classes=0), 14, CPU))
    assert (y == 0).all()
    assert prepare_main(["array", "--out", str(tmp_path / "d.safetensors"), "data.source=digits"]) == 2
    assert prepare_main(["shards", "--out", str(photos), "data.source=folder", f"data.root={photos}"]) == 2
    assert prepare_main(["shards", "--out", str(tmp_path / "s"), "--chunk", "3", "data.source=folder",
                         f"data.root={photos}"]) == 2                      # an option of the other command
    with pytest.raises(SystemExit):                                        # not even abbreviated
        prepare_main(["array", "--out", str(tmp_path / "b.safetensors"), "--per", "3", "data.source=folder",
                      f"data.root={photos}"])
    assert prepare_main(["array", "--out", str(tmp_path), "data.source=folder", f"data.root={photos}"]) == 2
    with pytest.raises(DataError, match="holds 3 classes but data.num_classes=4; set data.num_classes=3"):
        build_loader(cfg_of(out, source="array", num_classes=4), 4, CPU)
    from archirf.encode import _Images

    with pytest.raises(DataError, match="are 3x16x16 .* set data.channels=3 data.resolution=16"):
        _Images(cfg_of(out, source="array", resolution=32))                  # encode checks the array too


def test_encode_and_reference_read_arrays_and_shards_as_the_folder(photos, tmp_path):
    from archirf.encode import _Images
    from archirf.eval.reference import dataset_images

    arr, shards = tmp_path / "a.safetensors", tmp_path / "s"
    base = ["--no-progress", "data.source=folder", f"data.root={photos}", "data.num_classes=3",
            "data.resolution=16", "data.channels=3"]
    assert prepare_main(["array", "--out", str(arr), *base]) == 0
    assert prepare_main(["shards", "--out", str(shards), *base]) == 0
    folder = cfg_of(photos)
    want = torch.cat(list(_Images(folder).batches(0, 14, 5)))
    assert torch.equal(torch.cat(list(_Images(cfg_of(arr, source="array")).batches(0, 14, 5))), want)
    assert torch.equal(_Images(cfg_of(arr, source="array")).labels, _Images(folder).labels)
    n, batches = dataset_images(cfg_of(arr, source="array"), 5, 0, 1)
    assert n == 14 and torch.equal(torch.cat([b for _, b in batches]), want)
    # Shards hold the same images in their own (shuffled) order.
    n, batches = dataset_images(cfg_of(shards, source="shards"), 5, 0, 1)
    got = torch.cat([b for _, b in batches])
    assert n == 14 and sorted(map(bytes, got.flatten(1).numpy())) == sorted(map(bytes, want.flatten(1).numpy()))


# ----------------------------------------------------------------------------------------- in training


def test_training_from_shards_with_dali_on_one_and_two_ranks_resumes_across_world_sizes(photos, tmp_path):
    shards = tmp_path / "shards"
    assert prepare_main(["shards", "--out", str(shards), "--per-shard", "6", "--no-progress", "data.source=folder",
                         f"data.root={photos}"]) == 0
    data = ["data.source=shards", f"data.root={shards}", "data.loader=dali", "data.num_classes=3", "data.channels=3",
            "data.random_flip=true", "data.num_workers=1"]
    full, half = tmp_path / "full", tmp_path / "half"
    torchrun(1, f"run_dir={full}", *TINY, *data, "total_images=96", "checkpoint_every=48")
    torchrun(2, f"run_dir={half}", *TINY, *data, "total_images=48", "checkpoint_every=48")
    torchrun(1, f"run_dir={half}", *TINY, *data, "total_images=96", "checkpoint_every=48")
    a, b = rows(full), rows(half)
    assert [r["images_seen"] for r in a] == [r["images_seen"] for r in b] == [24, 48, 72, 96]
    for x, y in zip(a, b):                        # the same batches; 2 ranks sum in another order
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), (x, y)
