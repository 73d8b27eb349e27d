"""Data sets as whole in-memory tensors, with seeded batch-level augmentation.

Programmatic API (what the trainer, the conversion baseline and the demo use)::

    from lasnn.data import load_dataset
    ds = load_dataset("mnist1d")               # or "digits", "synthetic", "cifar10", ... (data_dir=...)
    ds.x_train, ds.y_train                     # [N, C, L] / [N, C, H, W] raw values, [N] int64
    ds.num_classes, ds.input_shape             # 10, (1, 40)
    ds.mean, ds.std, ds.scale                  # per-channel normalisation of x * scale
    train = ds.loader("train", 128, seed=0)    # shuffled, augmented, normalised batches
    train.set_epoch(epoch)                     # like DistributedSampler.set_epoch
    for x, y in train: ...                     # x [B, *input_shape] float32, y [B] int64
    test = ds.loader("test", 512)              # fixed order, no augmentation
    x = ds.normalize(ds.x_test[:16])           # raw -> model input without augmentation

Data sets (``DATASETS``):

- ``mnist1d`` (default of the commands): MNIST-1D (Greydanus, 2020) generated offline with the ``mnist1d``
  package's default arguments: 4000 train / 1000 test signals ``[1, 40]``, 10 classes. No augmentation.
- ``digits``: scikit-learn's bundled 8x8 digits, a fixed stratified 80/20 split (seed 0): 1437 / 360
  images ``[1, 8, 8]``. Augmentation: random crop with 1-pixel zero padding (no flips: digits).
- ``synthetic``: 4 classes of noisy random 8x8 templates (256 / 128), learnable; for tests.
- ``fashionmnist``: Fashion-MNIST, 60000 / 10000 grey 28x28 images ``[1, 28, 28]`` of 10 clothing classes,
  read from the four standard idx files (plain or ``.gz``): by default where the Debian package
  ``dataset-fashion-mnist`` puts them (``/usr/share/datasets/fashion-mnist``), or from ``data_dir`` holding
  the four files or torchvision's ``FashionMNIST/raw/``. Augmentation: crop (padding 2) and flip.
- ``cifar10`` / ``cifar100``: the python-pickle releases (``cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``, ``batches.meta``; ``cifar-100-python/train``, ``test``, ``meta``) under ``data_dir``.
- ``tinyimagenet``: the ``tiny-imagenet-200`` folder (``wnids.txt``, ``train/<wnid>/images/*.JPEG``,
  ``val/images``, ``val/val_annotations.txt``) under ``data_dir``; decoded once with Pillow.
  Images: random crop (padding 4, 8 for Tiny ImageNet) and horizontal flip.

Nothing is ever downloaded; a missing or malformed data set raises ``DatasetError`` (a ValueError)
naming the files it expected.

Randomness: the shuffling order of an epoch is drawn from ``(seed, epoch)`` and the augmentation of a
batch from ``(seed, epoch, step)``, so ``TensorLoader.iter_from(step)`` replays any part of any epoch
exactly (what makes a mid-epoch resume bit-exact). With ``rank``/``world_size`` each process gets its
DistributedSampler-style shard.
"""

from lasnn.data.datasets import DATASETS, Dataset, DatasetError, load_dataset, read_idx
from lasnn.data.loader import TensorLoader, random_crop, random_hflip, shard_indices

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetError",
    "TensorLoader",
    "load_dataset",
    "random_crop",
    "random_hflip",
    "read_idx",
    "shard_indices",
]
