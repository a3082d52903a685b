import gzip
import pickle

import numpy as np
import pytest
import torch
from conftest import write_idx

from plasticity_lightning import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DataNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    PlasticityConfigError,
)


def test_digits_splits_are_stratified_disjoint_and_deterministic():
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(val_fraction=0.2, test_fraction=0.2, seed=3)
    dm.setup("fit")
    images = {name: split.inputs for name, split in dm.splits.items()}
    assert {name: len(x) for name, x in images.items()} == {"train": 1077, "val": 360, "test": 360}
    rows = torch.cat([x.flatten(1) for x in images.values()])
    assert rows.unique(dim=0).shape[0] == torch.as_tensor(load_digits().images).flatten(1).unique(dim=0).shape[0]
    for split in dm.splits.values():
        counts = torch.bincount(split.targets, minlength=10)
        assert counts.min() >= counts.max() * 0.8  # every class present in roughly equal share
    again = DigitsDataModule(val_fraction=0.2, test_fraction=0.2, seed=3)
    again.setup("fit")
    assert torch.equal(again.splits["val"].targets, dm.splits["val"].targets)
    x, _y, index = dm.splits["train"][5]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and index == 5
    raw = DigitsDataModule(normalize=False)
    raw.setup("fit")
    x = raw.splits["train"].transform(raw.splits["train"].inputs)
    assert x.min() == 0 and x.max() == 1  # pixel values 0..16 scaled to [0, 1]


def test_digits_batches_leave_the_loader_with_indices():
    dm = DigitsDataModule(batch_size=8)
    dm.setup("fit")
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 8, 8) and y.shape == (8,) and index.shape == (8,)
    assert torch.equal(dm.on_after_batch_transfer((x, y, index), 0)[1], y)  # no trainer: (x, y)


@pytest.mark.parametrize(("cls", "classes"), [(CIFAR10DataModule, 10), (CIFAR100DataModule, 100)])
def test_synthetic_cifar_has_the_real_shapes(cls, classes, tmp_path):
    dm = cls(synthetic=True, synthetic_size=300, data_dir=str(tmp_path), batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert int(y.max()) < classes and dm.num_classes == classes
    assert not any(tmp_path.iterdir())  # nothing downloaded or written
    sizes = {name: len(split) for name, split in dm.splits.items()}
    assert sizes["train"] + sizes["val"] == 300 and sizes["test"] == max(classes, 60)


def test_cifar_augmentation_keeps_shape_and_changes_pixels():
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=50, augment=True, val_fraction=0.2)
    dm.setup("fit")
    train = dm.splits["train"]
    torch.manual_seed(0)
    draws = torch.stack([train[0][0] for _ in range(8)])
    assert draws.shape == (8, 3, 32, 32)
    assert not all(torch.equal(draws[0], d) for d in draws[1:])  # random crops/flips differ
    val = dm.splits["val"]
    assert torch.equal(val[0][0], val[0][0])  # evaluation is not augmented


@pytest.mark.parametrize("download", [False, True])
def test_missing_cifar_files_give_a_clear_error(download, tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    # never reach the network, even on a machine that has one: the download fails as it does offline
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nothing"), download=download)
    dm.prepare_data()  # the failed download's reason is kept for the message
    with pytest.raises(DataNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message
    assert "nothing" in message and "cifar-10-batches-py" in message and "synthetic: true" in message
    assert ("download is off" in message) == (not download)
    assert ("Name or service not known" in message) == download


def test_torchvision_layout_in_data_dir_is_used(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28))
    for stem, n in (("train", 30), ("t10k", 10)):
        part = images[:30] if stem == "train" else images[30:]
        write_idx(raw / f"{stem}-images-idx3-ubyte", part)
        write_idx(raw / f"{stem}-labels-idx1-ubyte", np.arange(n) % 10)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False, val_fraction=0.0 + 1 / 3, normalize=False)
    dm.setup("fit")
    assert len(dm.splits["test"]) == 10
    assert torch.equal(dm.splits["test"].inputs[:, 0], torch.as_tensor(images[30:], dtype=torch.uint8))
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 30


def test_fashion_mnist_offline_idx_copy(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for stem, n in (("train", 20), ("t10k", 10)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            path = tmp_path / f"{stem}-{kind}-ubyte.gz"
            raw = tmp_path / "raw.bin"
            write_idx(raw, array)
            path.write_bytes(gzip.compress(raw.read_bytes()))
            if stem == "t10k" and kind == "images-idx3":
                expected = array
    monkeypatch.setattr(FashionMNISTDataModule, "debian_dir", tmp_path)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "empty"), download=False, val_fraction=0.5)
    dm.setup("fit")
    assert torch.equal(dm.splits["test"].inputs[:, 0], torch.as_tensor(expected, dtype=torch.uint8))
    assert dm.splits["test"].targets.tolist() == [i % 10 for i in range(10)]


def test_mnist_offline_pickle_copy(tmp_path, monkeypatch):
    package = tmp_path / "site" / "mnist"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    rng = np.random.default_rng(2)
    pixels = {name: rng.integers(0, 256, (n, 784)) for name, n in (("train", 12), ("val", 6), ("test", 4))}
    splits = tuple(
        (pixels[name].astype(np.float32) / 256, np.arange(len(pixels[name])) % 10) for name in ("train", "val", "test")
    )
    with gzip.open(package / "data" / "mnist.pkl.gz", "wb") as f:
        pickle.dump(splits, f)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    dm = MNISTDataModule(data_dir=str(tmp_path / "empty"), download=False, val_fraction=1 / 3)
    dm.setup("fit")
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 18  # the pickle's train + val
    assert torch.equal(dm.splits["test"].inputs.flatten(1), torch.as_tensor(pixels["test"], dtype=torch.uint8))


def test_bad_image_arguments():
    with pytest.raises(PlasticityConfigError, match=r"CIFAR10DataModule.val_fraction=1.5 is invalid"):
        CIFAR10DataModule(val_fraction=1.5)
    with pytest.raises(PlasticityConfigError, match=r"CIFAR100DataModule.synthetic_size=0 is invalid"):
        CIFAR100DataModule(synthetic=True, synthetic_size=0)
    with pytest.raises(PlasticityConfigError, match=r"DigitsDataModule: val_fraction \+ test_fraction"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)
    tiny = CIFAR10DataModule(synthetic=True, synthetic_size=10, val_fraction=0.95)
    with pytest.raises(PlasticityConfigError, match=r"CIFAR10DataModule.val_fraction=0.95 holds out all 10 images"):
        tiny.setup("fit")
