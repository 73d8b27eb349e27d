"""lasnn.data: built-in and file-based data sets, the seeded tensor loader, batch augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lasnn.data import DatasetError, TensorLoader, load_dataset, random_crop, random_hflip, shard_indices


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_split_is_fixed_stratified_and_complete(digits):
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10 and digits.x_train.dim() == 4
    assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797
    assert digits.x_test.shape[0] == 360
    again = load_dataset("digits")
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    # stratified: every class in the test split, in proportion
    counts = torch.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(other.y_test, digits.y_test)


def test_normalisation_standardises_train_split(digits):
    x = digits.normalize(digits.x_train)
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_mnist1d_is_the_standard_offline_split():
    ds = load_dataset("mnist1d")
    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert ds.x_train.dim() == 3 and ds.num_classes == 10
    assert set(ds.y_train.unique().tolist()) == set(range(10))
    assert ds.crop_padding == 0 and not ds.hflip  # signals: no flips, no crops


def test_synthetic_is_small_and_deterministic():
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert torch.equal(a.x_train, b.x_train) and a.num_classes == 4
    assert a.x_train.shape[0] == 256 and a.x_test.shape[0] == 128


def test_unknown_and_missing_datasets_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope'.*mnist1d"):
        load_dataset("nope")
    with pytest.raises(DatasetError, match=r"never downloaded.*data_batch_1"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("cifar100", tmp_path / "absent")
    with pytest.raises(DatasetError, match="lacks train, test, meta"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(DatasetError, match=r"wnids\.txt"):
        load_dataset("tinyimagenet", tmp_path)


def _write_cifar(root, n_per_file=6, classes=10, label_key="labels", files=None):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name in files:
        entry = {"data": rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, classes, n_per_file).tolist()}
        with open(root / name, "wb") as f:
            pickle.dump(entry, f)


def test_cifar10_pickles_load_from_parent_or_folder(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar(root, files=[f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    for where in (tmp_path, root):
        ds = load_dataset("cifar10", where)
        assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_train.dtype == torch.uint8
        assert ds.x_test.shape == (6, 3, 32, 32) and ds.classes[3] == "c3"
    # channel-major rows: pixel (c, h, w) of sample 0 is data[0, c*1024 + h*32 + w]
    with open(root / "data_batch_1", "rb") as f:
        raw = pickle.load(f)["data"]
    assert int(ds.x_train[0, 2, 5, 7]) == int(raw[0, 2 * 1024 + 5 * 32 + 7])
    assert ds.hflip and ds.crop_padding == 4
    batch = next(iter(ds.loader("train", 4, seed=0)))[0]
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32


def test_cifar_malformed_files_raise(tmp_path):
    root = tmp_path / "cifar-100-python"
    _write_cifar(root, classes=100, label_key="fine_labels", files=["train", "test"])
    (root / "meta").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"cannot read .*meta.* as a python pickle"):
        load_dataset("cifar100", tmp_path)
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [str(i) for i in range(100)]}, f)
    assert load_dataset("cifar100", tmp_path).num_classes == 100
    with open(root / "test", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match=r"uint8 \[N, 3072\]"):
        load_dataset("cifar100", tmp_path)


def test_tinyimagenet_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for k, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (40 * k, 10 * i, 0)).save(d / f"{w}_{i}.JPEG")
        Image.new("RGB", (64, 64), (40 * k, 0, 0)).save(root / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset("tinyimagenet", tmp_path)
    assert ds.x_train.shape == (4, 3, 64, 64) and ds.num_classes == 2
    assert ds.y_train.tolist() == [0, 0, 1, 1] and ds.y_test.tolist() == [0, 1]
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="line 1"):
        load_dataset("tinyimagenet", tmp_path)


# ----------------------------------------------------------------------------------------- loader


def _collect(loader, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.iter_from(start)]


def test_train_loader_is_seeded_per_epoch_and_replayable(digits):
    loader = digits.loader("train", 100, seed=3)
    assert len(loader) == digits.x_train.shape[0] // 100  # drop_last for training
    loader.set_epoch(1)
    a = _collect(loader)
    b = _collect(loader)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    # a mid-epoch restart replays exactly the remaining batches (augmentation included)
    tail = _collect(loader, start=5)
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a[5:], tail, strict=True))
    loader.set_epoch(2)
    c = _collect(loader)
    assert not torch.equal(a[0][1], c[0][1])
    other_seed = digits.loader("train", 100, seed=4)
    other_seed.set_epoch(1)
    assert not torch.equal(_collect(other_seed)[0][1], a[0][1])


def test_loader_index_names_the_rows_of_each_batch(digits):
    loader = digits.loader("train", 100, augment=False, seed=5, rank=1, world_size=2)
    loader.set_epoch(3)
    plain = _collect(loader, start=2)
    with_index = list(loader.iter_from(2, with_index=True))
    assert len(with_index) == len(plain) > 0
    for (x, y), (xi, yi, idx) in zip(plain, with_index, strict=True):
        assert idx.dtype == torch.int64 and idx.shape == y.shape
        assert torch.equal(xi, x) and torch.equal(yi, y)
        assert torch.equal(y, digits.y_train[idx]) and torch.equal(x, digits.normalize(digits.x_train[idx]))
    with pytest.raises(ValueError, match="start_step"):
        next(loader.iter_from(-1))


def test_test_loader_covers_every_sample_once_in_order(digits):
    loader = digits.loader("test", 64)
    ys = torch.cat([y for _, y in loader])
    assert torch.equal(ys, digits.y_test)
    xs = torch.cat([x for x, _ in loader])
    assert torch.equal(xs, digits.normalize(digits.x_test))  # no augmentation at test time


def test_shards_partition_the_data_like_distributed_sampler():
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    parts = [shard_indices(order, r, 3, pad=False) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(11))
    padded = [shard_indices(order, r, 3, pad=True) for r in range(3)]
    assert {p.numel() for p in padded} == {4}
    assert set(torch.cat(padded).tolist()) == set(range(11))
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    seen = torch.cat([torch.cat([b for _, b in TensorLoader(x, y, 2, rank=r, world_size=2)]) for r in range(2)])
    assert sorted(seen.tolist()) == list(range(10))


def test_loader_rejects_bad_arguments():
    x, y = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(x, y, 0)
    with pytest.raises(ValueError, match="same number of samples"):
        TensorLoader(x, y[:3], 2)
    with pytest.raises(ValueError, match="rank"):
        TensorLoader(x, y, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="split"):
        load_dataset("synthetic").loader("val", 2)


@pytest.mark.parametrize("shape", [(6, 2, 5, 7), (6, 3, 9)], ids=["2d", "1d"])
def test_random_crop_takes_a_window_of_the_zero_padded_input(shape):
    x = torch.rand(shape) + 1  # no zeros inside, so padding shows as zeros
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    spatial = x.shape[2:]
    xp = torch.nn.functional.pad(x, [2] * (2 * len(spatial)))
    shifts = set()
    for i in range(x.shape[0]):
        # find the window of the padded sample that equals the output (exactly one must match)
        offs = [
            o for o in np.ndindex(*([5] * len(spatial)))
            if torch.equal(out[i], xp[i][(slice(None), *(slice(a, a + n) for a, n in zip(o, spatial, strict=True)))])
        ]
        assert len(offs) == 1
        shifts.add(offs[0])
    assert len(shifts) > 1  # offsets differ between samples
    assert torch.equal(random_crop(x, 0, g), x)


def test_random_hflip_flips_some_samples_only():
    x = torch.rand(64, 1, 4, 6)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


# ------------------------------------------------------------------------------ Fashion-MNIST (idx files)


def _write_idx(path, arr: np.ndarray, *, compress: bool = False, cut: int = 0, extra: bytes = b"") -> None:
    import gzip
    import struct

    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}[arr.dtype]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes() + extra
    raw = raw[: len(raw) - cut] if cut else raw
    path.write_bytes(gzip.compress(raw) if compress else raw)


def _fake_fashion(folder, n_train=12, n_test=6, compress=True):
    from lasnn.data.datasets import FASHION_MNIST_FILES

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for key, arr in arrays.items():
        name = FASHION_MNIST_FILES[key] + (".gz" if compress else "")
        _write_idx(folder / name, arr, compress=compress)
    return arrays


def test_read_idx_round_trips_types_and_compression(tmp_path):
    from lasnn.data import read_idx

    for arr in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.arange(-3, 3, dtype=">i4"),
                np.linspace(0, 1, 6, dtype=">f4").reshape(3, 2)):
        for compress in (False, True):
            p = tmp_path / f"a{arr.dtype.str}{compress}.idx"
            _write_idx(p, arr, compress=compress)
            got = read_idx(p)
            assert got.shape == arr.shape and np.array_equal(got, arr) and got.dtype.isnative


def test_read_idx_rejects_truncated_oversized_and_foreign_files(tmp_path):
    from lasnn.data import read_idx

    arr = np.zeros((3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "short", arr, cut=5)
    with pytest.raises(DatasetError, match=r"short.*needs 2368 \(truncated\)"):
        read_idx(tmp_path / "short")
    _write_idx(tmp_path / "long", arr, extra=b"xx")
    with pytest.raises(DatasetError, match="trailing data"):
        read_idx(tmp_path / "long")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DatasetError, match="is not an idx file"):
        read_idx(tmp_path / "png")
    (tmp_path / "head").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DatasetError, match="truncated inside its header"):
        read_idx(tmp_path / "head")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(DatasetError, match="cannot read idx file"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DatasetError, match="cannot read idx file"):
        read_idx(tmp_path / "absent")


@pytest.mark.parametrize("layout", ["flat", "flat-plain", "torchvision"])
def test_fashionmnist_from_data_dir_layouts(tmp_path, layout):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = _fake_fashion(folder, compress=layout != "flat-plain")
    ds = load_dataset("fashionmnist", tmp_path)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.x_train.dtype == torch.uint8
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays["train_images"]))
    assert torch.equal(ds.y_test, torch.from_numpy(arrays["test_labels"]).long())
    assert ds.crop_padding == 2 and ds.hflip and ds.classes[0] == "T-shirt/top"
    x, y = next(iter(ds.loader("train", 4, seed=0)))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (4,)


def test_fashionmnist_missing_or_mismatched_files_raise_clear_errors(tmp_path):
    from lasnn.data.datasets import FASHION_MNIST_FILES

    with pytest.raises(DatasetError, match=r"apt-get install dataset-fashion-mnist.*FashionMNIST/raw"):
        load_dataset("fashionmnist", tmp_path)
    _fake_fashion(tmp_path / "m")
    (tmp_path / "m" / (FASHION_MNIST_FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(DatasetError, match="never downloaded"):
        load_dataset("fashionmnist", tmp_path / "m")
    _fake_fashion(tmp_path / "n")
    _write_idx(tmp_path / "n" / (FASHION_MNIST_FILES["test_labels"] + ".gz"), np.zeros(5, np.uint8), compress=True)
    with pytest.raises(DatasetError, match=r"one uint8 label per image \(6\)"):
        load_dataset("fashionmnist", tmp_path / "n")
    _fake_fashion(tmp_path / "o")
    _write_idx(tmp_path / "o" / (FASHION_MNIST_FILES["train_images"] + ".gz"), np.zeros((12, 32, 32), np.uint8),
               compress=True)
    with pytest.raises(DatasetError, match=r"uint8 \[N, 28, 28\] images"):
        load_dataset("fashionmnist", tmp_path / "o")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashionmnist_from_the_debian_package():
    ds = load_dataset("fashionmnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(ds.y_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.y_test), torch.full((10,), 1000))
    assert abs(ds.mean[0] - 0.2860) < 1e-3 and abs(ds.std[0] - 0.3530) < 1e-3  # the published statistics


def test_mnist1d_generation_leaves_the_global_rngs_alone():
    import random

    from lasnn.data.datasets import _mnist1d_arrays

    _mnist1d_arrays.cache_clear()
    random.seed(3)
    np.random.seed(3)  # noqa: NPY002
    expected = (random.random(), np.random.random())  # noqa: NPY002
    random.seed(3)
    np.random.seed(3)  # noqa: NPY002
    ds = load_dataset("mnist1d")
    assert (random.random(), np.random.random()) == expected  # noqa: NPY002
    assert ds.x_train.shape == (4000, 1, 40)
