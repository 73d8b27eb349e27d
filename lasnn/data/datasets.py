"""Data set loaders: everything is read once into whole tensors (see ``lasnn.data`` for the API)."""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lasnn.data.loader import TensorLoader, random_crop, random_hflip

__all__ = ["DATASETS", "Dataset", "DatasetError", "load_dataset", "read_idx"]


class DatasetError(ValueError):
    """A data set is unknown, missing or malformed (the message names the files expected)."""


@dataclass
class Dataset:
    """A data set held in memory as whole tensors, with its normalisation and augmentation recipe.

    Attributes:
        name: registry name (``lasnn.data.DATASETS``).
        x_train, x_test: ``[N, C, H, W]`` images or ``[N, C, L]`` signals, raw values (uint8 for the
            image files, float32 otherwise); ``prepare`` scales, augments and normalises a batch.
        y_train, y_test: ``[N]`` int64 labels in ``[0, num_classes)``.
        num_classes: number of classes.
        mean, std: per-channel normalisation applied after scaling by ``scale``.
        scale: raw value -> intensity in [0, 1] (1/255 for uint8 images, 1/16 for digits, 1 for signals).
        crop_padding: random-crop padding used by training augmentation (0: none).
        hflip: whether training augmentation flips horizontally.
        classes: class names when the data set has them.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0
    crop_padding: int = 0
    hflip: bool = False
    classes: list[str] | None = field(default=None, repr=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample without the batch axis: ``(C, H, W)`` or ``(C, L)``."""
        return tuple(self.x_train.shape[1:])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw batch ``[B, C, ...]`` -> float32 model input: ``(x * scale - mean) / std`` per channel."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(shape)
        return (x.float() * self.scale - mean) / std

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training augmentation of a raw batch: random crop with zero padding, then a random flip."""
        x = random_crop(x, self.crop_padding, generator)
        if self.hflip:
            x = random_hflip(x, generator)
        return x

    def prepare(
        self, x: torch.Tensor, generator: torch.Generator | None = None, *, augment: bool = False
    ) -> torch.Tensor:
        """Raw batch -> model input (augmented first when ``augment``; needs ``generator`` then)."""
        if augment:
            if generator is None:
                raise ValueError("prepare(augment=True) needs a generator")
            x = self.augment(x, generator)
        return self.normalize(x)

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        train: bool | None = None,
        augment: bool | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> TensorLoader:
        """A ``TensorLoader`` over ``split`` (``"train"`` or ``"test"``) yielding normalised batches.

        ``train`` (default: ``split == "train"``) shuffles per epoch and drops the last incomplete batch;
        ``augment`` (default: ``train``) applies ``augment``. Batches: ``x [B, *input_shape]`` float32,
        ``y [B]`` int64.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        train = (split == "train") if train is None else train
        augment = train if augment is None else augment
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = functools.partial(
            _transform, self, augment
        )
        return TensorLoader(
            x, y, batch_size, shuffle=train, transform=transform, seed=seed, rank=rank, world_size=world_size,
            drop_last=train and x.shape[0] >= batch_size * world_size, device=device,
        )


def _transform(ds: Dataset, augment: bool, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return ds.prepare(x, generator, augment=augment)


def _channel_stats(x: torch.Tensor, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    dims = [0, *range(2, x.dim())]
    xf = x.double() * scale
    mean = xf.mean(dim=dims)
    std = xf.std(dim=dims).clamp_min(1e-6)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# ----------------------------------------------------------------------------------------- built-in


@functools.lru_cache(maxsize=2)
def _digits_arrays(seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    return tuple(train_test_split(d.images, d.target, test_size=0.2, random_state=seed, stratify=d.target))


def _load_digits(data_dir: Path | None, seed: int) -> Dataset:
    # The split is fixed (seed 0 unless asked otherwise) so that every run and report compares the same
    # 1437 train / 360 test images.
    xtr, xte, ytr, yte = _digits_arrays(seed)
    x_train = torch.from_numpy(xtr).float().unsqueeze(1)
    x_test = torch.from_numpy(xte).float().unsqueeze(1)
    scale = 1.0 / 16.0
    mean, std = _channel_stats(x_train, scale)
    # 8x8 digits: a 1-pixel shift is the useful augmentation; flips would turn digits into other shapes.
    return Dataset("digits", x_train, torch.from_numpy(ytr).long(), x_test, torch.from_numpy(yte).long(), 10,
                   mean, std, scale=scale, crop_padding=1, hflip=False, classes=[str(i) for i in range(10)])


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> dict:
    from mnist1d.data import get_dataset_args, make_dataset

    from lasnn.runtime import preserved_rng

    # make_dataset generates the standard split offline in about a second (its get_dataset would
    # download a pickle instead), so an in-process cache is all it needs. It seeds Python's and
    # numpy's global RNGs; the caller's streams are restored afterwards.
    with preserved_rng():
        return make_dataset(get_dataset_args())


def _load_mnist1d(data_dir: Path | None, seed: int) -> Dataset:
    d = _mnist1d_arrays()
    x_train = torch.from_numpy(np.asarray(d["x"], dtype=np.float32)).unsqueeze(1)
    x_test = torch.from_numpy(np.asarray(d["x_test"], dtype=np.float32)).unsqueeze(1)
    mean, std = _channel_stats(x_train, 1.0)
    # No augmentation: the generator already shifts, scales and corrupts each signal, and the data set
    # is the fixed benchmark split. Signals are not flipped (time has a direction).
    return Dataset("mnist1d", x_train, torch.from_numpy(np.asarray(d["y"])).long(), x_test,
                   torch.from_numpy(np.asarray(d["y_test"])).long(), 10, mean, std, scale=1.0,
                   crop_padding=0, hflip=False, classes=[str(i) for i in range(10)])


def _load_synthetic(data_dir: Path | None, seed: int) -> Dataset:
    # Learnable random data for tests: each class is a fixed random 8x8 template plus noise.
    g = torch.Generator().manual_seed(1234 + seed)
    num_classes, n_train, n_test = 4, 256, 128
    templates = torch.rand(num_classes, 1, 8, 8, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = (templates[y] + 0.25 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
        return x, y

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    mean, std = _channel_stats(x_train, 1.0)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes, mean, std, scale=1.0,
                   crop_padding=1, hflip=False, classes=[f"class{i}" for i in range(num_classes)])


# ------------------------------------------------------------------------------------- from files


def _find_dir(data_dir: Path | None, folder: str, dataset: str, expected: list[str]) -> Path:
    if data_dir is None:
        raise DatasetError(
            f"dataset {dataset!r} is read from disk and is never downloaded: pass data_dir (--data-dir) "
            f"pointing at the folder that holds {folder}/ (expected files: {', '.join(expected)})"
        )
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DatasetError(f"data_dir {str(data_dir)!r} does not exist or is not a folder (dataset {dataset!r} "
                           f"expects {folder}/ with {', '.join(expected)})")
    # Accept both the parent (torchvision's root) and the data set folder itself.
    for cand in (data_dir / folder, data_dir):
        if all((cand / f).exists() for f in expected):
            return cand
    root = data_dir / folder if (data_dir / folder).is_dir() else data_dir
    missing = [f for f in expected if not (root / f).exists()]
    raise DatasetError(
        f"dataset {dataset!r}: {str(root)!r} lacks {', '.join(missing)} (expected {folder}/ holding "
        f"{', '.join(expected)}, the standard release; lasnn never downloads)"
    )


def _unpickle(path: Path, dataset: str) -> dict:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as e:  # any unpickling failure means a malformed file
        raise DatasetError(f"dataset {dataset!r}: cannot read {str(path)!r} as a python pickle ({e})") from e
    if not isinstance(entry, dict):
        raise DatasetError(f"dataset {dataset!r}: {str(path)!r} holds a {type(entry).__name__}, expected a dict")
    return entry


def _cifar_arrays(files: list[Path], label_key: str, dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for p in files:
        e = _unpickle(p, dataset)
        if "data" not in e or label_key not in e:
            raise DatasetError(f"dataset {dataset!r}: {str(p)!r} lacks the 'data' and {label_key!r} entries "
                               f"(has {sorted(e)})")
        data = np.asarray(e["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(e[label_key]) != data.shape[0]:
            raise DatasetError(f"dataset {dataset!r}: {str(p)!r} 'data' must be uint8 [N, 3072] with N labels, "
                               f"got {data.dtype} {data.shape} and {len(e[label_key])} labels")
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.as_tensor(np.asarray(e[label_key]), dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def _load_cifar10(data_dir: Path | None, seed: int) -> Dataset:
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    root = _find_dir(data_dir, "cifar-10-batches-py", "cifar10", [*train_files, "test_batch", "batches.meta"])
    x_train, y_train = _cifar_arrays([root / f for f in train_files], "labels", "cifar10")
    x_test, y_test = _cifar_arrays([root / "test_batch"], "labels", "cifar10")
    meta = _unpickle(root / "batches.meta", "cifar10")
    classes = list(meta.get("label_names", [])) or None
    return _image_dataset("cifar10", x_train, y_train, x_test, y_test, 10, classes, crop_padding=4)


def _load_cifar100(data_dir: Path | None, seed: int) -> Dataset:
    root = _find_dir(data_dir, "cifar-100-python", "cifar100", ["train", "test", "meta"])
    x_train, y_train = _cifar_arrays([root / "train"], "fine_labels", "cifar100")
    x_test, y_test = _cifar_arrays([root / "test"], "fine_labels", "cifar100")
    meta = _unpickle(root / "meta", "cifar100")
    classes = list(meta.get("fine_label_names", [])) or None
    return _image_dataset("cifar100", x_train, y_train, x_test, y_test, 100, classes, crop_padding=4)


def _read_rgb64(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.shape != (64, 64, 3):
        raise DatasetError(f"dataset 'tinyimagenet': {str(path)!r} is {arr.shape[1]}x{arr.shape[0]}, expected 64x64")
    return arr


def _load_tinyimagenet(data_dir: Path | None, seed: int) -> Dataset:
    root = _find_dir(data_dir, "tiny-imagenet-200", "tinyimagenet",
                     ["wnids.txt", "train", "val/images", "val/val_annotations.txt"])
    wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
    if not wnids:
        raise DatasetError(f"dataset 'tinyimagenet': {str(root / 'wnids.txt')!r} lists no class ids")
    index = {w: i for i, w in enumerate(wnids)}
    train_x, train_y = [], []
    for w in wnids:
        files = sorted((root / "train" / w / "images").glob("*.JPEG"))
        if not files:
            raise DatasetError(f"dataset 'tinyimagenet': no images in {str(root / 'train' / w / 'images')!r} "
                               "(expected train/<wnid>/images/*.JPEG for every id in wnids.txt)")
        train_x += [_read_rgb64(f) for f in files]
        train_y += [index[w]] * len(files)
    test_x, test_y = [], []
    for line_no, line in enumerate((root / "val" / "val_annotations.txt").read_text().splitlines(), 1):
        parts = line.split("\t") if "\t" in line else line.split()
        if not parts:
            continue
        if len(parts) < 2 or parts[1] not in index:
            raise DatasetError(f"dataset 'tinyimagenet': val/val_annotations.txt line {line_no} is not "
                               f"'<file> <wnid> ...' with a wnid from wnids.txt: {line!r}")
        test_x.append(_read_rgb64(root / "val" / "images" / parts[0]))
        test_y.append(index[parts[1]])
    x_train = torch.from_numpy(np.stack(train_x)).permute(0, 3, 1, 2).contiguous()
    x_test = torch.from_numpy(np.stack(test_x)).permute(0, 3, 1, 2).contiguous()
    return _image_dataset("tinyimagenet", x_train, torch.tensor(train_y), x_test, torch.tensor(test_y),
                          len(wnids), wnids, crop_padding=8)


# Fashion-MNIST: the four idx files of the standard release (Xiao et al., 2017).
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: where the Debian package ``dataset-fashion-mnist`` installs the idx files
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
# idx type codes -> numpy dtype (big-endian multi-byte types)
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

    Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, one big-endian uint32 size per dimension, then the data in
    row-major order.

    Args:
        path: the file (``.gz`` is decompressed; otherwise the gzip magic bytes decide).
    Returns:
        ``np.ndarray`` of the header's shape and dtype (native byte order), e.g. ``[60000, 28, 28]`` uint8.
    Raises:
        DatasetError naming the file for a missing, truncated, oversized or malformed file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"cannot read idx file {str(path)!r}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DatasetError(f"{str(path)!r} is not an idx file (expected magic 00 00 <type> <ndim>, got "
                           f"{raw[:4].hex(' ') or 'an empty file'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"idx file {str(path)!r} is truncated inside its header ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing data"
        raise DatasetError(f"idx file {str(path)!r} holds {len(raw)} bytes; its header {list(shape)} "
                           f"({dtype.name}) needs {expected} ({what})")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _fashion_dir(data_dir: Path | None) -> tuple[Path, dict[str, Path]]:
    # Accepted layouts: the four files in a folder (plain or .gz), or torchvision's FashionMNIST/raw/.
    candidates = []
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        candidates += [d, d / "FashionMNIST" / "raw", d / "raw"]
    else:
        candidates.append(FASHION_MNIST_SYSTEM_DIR)
    for cand in candidates:
        found = {}
        for key, stem in FASHION_MNIST_FILES.items():
            for name in (stem, stem + ".gz"):
                if (cand / name).is_file():
                    found[key] = cand / name
                    break
        if len(found) == len(FASHION_MNIST_FILES):
            return cand, found
    names = ", ".join(f"{s}[.gz]" for s in FASHION_MNIST_FILES.values())
    where = (f"data_dir {str(data_dir)!r} (looked in it, FashionMNIST/raw/ and raw/ under it)" if data_dir is not None
             else f"{str(FASHION_MNIST_SYSTEM_DIR)!r} (no --data-dir given)")
    raise DatasetError(
        f"dataset 'fashionmnist' not found in {where}; it is never downloaded. Install the Debian package "
        f"(apt-get install dataset-fashion-mnist, which puts the files in {FASHION_MNIST_SYSTEM_DIR}/) or pass "
        f"--data-dir pointing at a folder holding the four idx files ({names}) or torchvision's "
        "FashionMNIST/raw/ layout"
    )


@functools.lru_cache(maxsize=2)
def _fashion_arrays(root: str) -> tuple[np.ndarray, ...]:
    _, files = _fashion_dir(Path(root))
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DatasetError(f"dataset 'fashionmnist': {str(files[split + '_images'])!r} must hold uint8 "
                               f"[N, 28, 28] images, got {x.dtype} {list(x.shape)}")
        if y.dtype != np.uint8 or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DatasetError(f"dataset 'fashionmnist': {str(files[split + '_labels'])!r} must hold one uint8 "
                               f"label per image ({x.shape[0]}), got {y.dtype} {list(y.shape)}")
    return (arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"])


def _load_fashionmnist(data_dir: Path | None, seed: int) -> Dataset:
    root, _ = _fashion_dir(data_dir)
    xtr, ytr, xte, yte = _fashion_arrays(str(root))
    x_train = torch.from_numpy(xtr.copy()).unsqueeze(1)
    x_test = torch.from_numpy(xte.copy()).unsqueeze(1)
    # Augmentation: 2-pixel crop padding and horizontal flips (clothes are left-right symmetric; the
    # crop is the 28x28 analogue of CIFAR's 4 pixels at 32x32).
    return _image_dataset("fashionmnist", x_train, torch.from_numpy(ytr.astype(np.int64)), x_test,
                          torch.from_numpy(yte.astype(np.int64)), 10, list(FASHION_MNIST_CLASSES), crop_padding=2)


def _image_dataset(name, x_train, y_train, x_test, y_test, num_classes, classes, crop_padding) -> Dataset:
    bad = int(((y_train < 0) | (y_train >= num_classes)).sum() + ((y_test < 0) | (y_test >= num_classes)).sum())
    if bad:
        raise DatasetError(f"dataset {name!r}: {bad} labels fall outside [0, {num_classes})")
    mean, std = _channel_stats(x_train, 1.0 / 255.0)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, mean, std, scale=1.0 / 255.0,
                   crop_padding=crop_padding, hflip=True, classes=classes)


DATASETS: dict[str, Callable[[Path | None, int], Dataset]] = {
    "mnist1d": _load_mnist1d,
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "tinyimagenet": _load_tinyimagenet,
    "fashionmnist": _load_fashionmnist,
    "synthetic": _load_synthetic,
}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, split_seed: int = 0) -> Dataset:
    """Load a data set into memory.

    Args:
        name: one of ``lasnn.data.DATASETS``: ``mnist1d`` (default of the commands), ``digits``,
            ``synthetic`` (built in); ``fashionmnist`` (idx files from the ``dataset-fashion-mnist``
            Debian package or ``data_dir``); ``cifar10``, ``cifar100``, ``tinyimagenet`` (read from ``data_dir``).
        data_dir: folder holding (or being) ``cifar-10-batches-py``, ``cifar-100-python`` or
            ``tiny-imagenet-200``, or the four Fashion-MNIST idx files (or torchvision's
            ``FashionMNIST/raw/``); ignored by the built-in data sets.
        split_seed: seed of the digits train/test split and of the synthetic data (0: the standard one).
    Returns:
        a ``Dataset`` (tensors ``[N, C, H, W]`` / ``[N, C, L]`` plus labels, classes and normalisation).
    Raises:
        DatasetError (a ValueError) for an unknown name or missing/malformed files, naming what was expected.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[key](Path(data_dir) if data_dir is not None else None, int(split_seed))
