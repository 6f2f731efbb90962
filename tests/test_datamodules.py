"""Tests of the classification datamodules.

The torchvision-backed modules read tiny files written here in the real on-disk formats (pickled
CIFAR batches, MNIST idx files, SVHN ``.mat``) through torchvision's own loaders with
``download=False``. torchvision checks the md5 of the CIFAR and SVHN files against checksums kept
as class attributes (``CIFAR10.train_list`` / ``test_list`` / ``meta``, the same on ``CIFAR100``,
``SVHN.split_list``); the fixtures set those attributes, with ``monkeypatch`` (undone after each
test), to the md5 of the files just written, so torchvision's integrity check runs unchanged:
it passes for these files and fails for any other (see ``test_corrupted_files_fail_the_md5_check``).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.io
import torch
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
from sklearn.datasets import load_digits
from torchvision.datasets import CIFAR10, CIFAR100, SVHN

from lightning_tricks.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    MNISTDataModule,
    SVHNDataModule,
)

# ----------------------------------------------------------------------------- writers of the real formats


@dataclass
class Written:
    """What a writer put on disk: images as (N, H, W, C) uint8 and the labels torchvision should return."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def random_images(rng: np.random.Generator, count: int, size: int, channels: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, size, size, channels), dtype=np.uint8)


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's row layout: 3072 bytes per image, the red plane, then green, then blue, each row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def dump_pickle(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root: Path, rng: np.random.Generator) -> Written:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = Written(
        random_images(rng, 60, 32, 3), np.arange(60) % 10, random_images(rng, 10, 32, 3), np.arange(10)
    )
    for batch in range(5):
        part = slice(12 * batch, 12 * (batch + 1))
        dump_pickle(
            folder / f"data_batch_{batch + 1}",
            {
                "batch_label": f"training batch {batch + 1} of 5",
                "data": cifar_rows(written.train_images[part]),
                "labels": written.train_labels[part].tolist(),
                "filenames": [f"{i}.png" for i in range(12)],
            },
        )
    dump_pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "data": cifar_rows(written.test_images),
            "labels": written.test_labels.tolist(),
            "filenames": [],
        },
    )
    dump_pickle(
        folder / "batches.meta",
        {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 12, "num_vis": 3072},
    )
    return written


def write_cifar100(root: Path, rng: np.random.Generator) -> Written:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = Written(
        random_images(rng, 200, 32, 3), np.arange(200) % 100, random_images(rng, 20, 32, 3), np.arange(20) * 5
    )
    for name, images, labels in (
        ("train", written.train_images, written.train_labels),
        ("test", written.test_images, written.test_labels),
    ):
        dump_pickle(
            folder / name,
            {
                "filenames": [],
                "batch_label": name,
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": cifar_rows(images),
            },
        )
    dump_pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)],
        },
    )
    return written


def write_idx(path: Path, array: np.ndarray) -> None:
    """idx format: two zero bytes, type 0x08 (uint8), the number of dimensions, big-endian int32 sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, rng: np.random.Generator) -> Written:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    written = Written(
        random_images(rng, 60, 28, 1),
        np.arange(60) % 10,
        random_images(rng, 10, 28, 1),
        np.arange(10)[::-1].copy(),
    )
    for prefix, images, labels in (
        ("train", written.train_images, written.train_labels),
        ("t10k", written.test_images, written.test_labels),
    ):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[..., 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return written


def write_svhn(root: Path, rng: np.random.Generator) -> Written:
    """SVHN's .mat files: X of shape (32, 32, 3, N), y of shape (N, 1) with labels 1..10 where 10 is the digit 0."""
    root.mkdir(parents=True, exist_ok=True)
    written = Written(
        random_images(rng, 60, 32, 3), np.arange(60) % 10, random_images(rng, 10, 32, 3), np.arange(10)
    )
    for name, images, labels in (
        ("train_32x32.mat", written.train_images, written.train_labels),
        ("test_32x32.mat", written.test_images, written.test_labels),
    ):
        stored = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(root / name, {"X": images.transpose(1, 2, 3, 0), "y": stored})
    return written


def trust_cifar_files(monkeypatch: pytest.MonkeyPatch, dataset_class: type[CIFAR10], folder: Path) -> None:
    """Point torchvision's md5 table of ``dataset_class`` (CIFAR10 or CIFAR100) at the files in ``folder``."""
    for attribute in ("train_list", "test_list"):
        entries = [[name, md5(folder / name)] for name, _ in getattr(dataset_class, attribute)]
        monkeypatch.setattr(dataset_class, attribute, entries)
    meta = dataset_class.meta
    monkeypatch.setattr(dataset_class, "meta", {**meta, "md5": md5(folder / meta["filename"])})


def trust_svhn_files(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Point torchvision's md5 table of SVHN at the ``.mat`` files in ``folder``."""
    split_list = {
        split: [url, name, md5(folder / name) if (folder / name).exists() else checksum]
        for split, (url, name, checksum) in SVHN.split_list.items()
    }
    monkeypatch.setattr(SVHN, "split_list", split_list)


@dataclass
class Format:
    datamodule: type
    write: Callable[[Path, np.random.Generator], Written]
    trust: Callable[[pytest.MonkeyPatch, Path], None]
    val_size: int | float
    flips: bool


FORMATS = {
    "cifar10": Format(
        CIFAR10DataModule,
        write_cifar10,
        lambda mp, root: trust_cifar_files(mp, CIFAR10, root / "cifar-10-batches-py"),
        20,
        True,
    ),
    "cifar100": Format(
        CIFAR100DataModule,
        write_cifar100,
        lambda mp, root: trust_cifar_files(mp, CIFAR100, root / "cifar-100-python"),
        100,
        True,
    ),
    "mnist": Format(MNISTDataModule, write_mnist, lambda mp, root: None, 0.25, False),
    "svhn": Format(SVHNDataModule, write_svhn, trust_svhn_files, 20, False),
}


@pytest.fixture(params=list(FORMATS))
def on_disk(request, tmp_path, monkeypatch) -> tuple[Format, Path, Written]:
    """One dataset written in its real format under tmp_path, with torchvision's md5 table set to match."""
    spec = FORMATS[request.param]
    root = tmp_path / "data"
    written = spec.write(root, np.random.default_rng(len(request.param)))
    spec.trust(monkeypatch, root)
    return spec, root, written


def normalised(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Reference: (x / 255 - mean_c) / std_c in float64, as (N, C, H, W)."""
    scaled = images.astype(np.float64) / 255.0
    return torch.from_numpy(((scaled - np.asarray(mean)) / np.asarray(std)).transpose(0, 3, 1, 2))


def unnormalised(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Inverse of ``normalised`` for (N, C, H, W) tensors: 0..255 values as (N, H, W, C) float64."""
    scaled = images.double() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return (scaled * 255).permute(0, 2, 3, 1).numpy()


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


# ----------------------------------------------------------------------------- torchvision-backed datamodules


def test_loaders_yield_the_written_values_normalised(on_disk):
    spec, root, written = on_disk
    dm = spec.datamodule(root, batch_size=8, val_size=spec.val_size, seed=3, augment=False)
    dm.setup("fit")
    dm.setup("test")
    expected_train = normalised(written.train_images, dm.mean, dm.std)

    for images, labels in dm.train_dataloader():
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape[1:] == (dm.in_channels, dm.image_size, dm.image_size) and len(images) <= 8
        assert labels.min() >= 0 and labels.max() < dm.num_classes

    val_images, val_labels = collect(dm.val_dataloader())
    torch.testing.assert_close(val_images.double(), expected_train[dm.val_indices], rtol=0, atol=1e-5)
    assert val_labels.tolist() == written.train_labels[dm.val_indices].tolist()

    test_images, test_labels = collect(dm.test_dataloader())
    torch.testing.assert_close(
        test_images.double(), normalised(written.test_images, dm.mean, dm.std), rtol=0, atol=1e-5
    )
    assert test_labels.tolist() == written.test_labels.tolist()

    train_images, train_labels = collect(dm.train_dataloader())
    by_content = {image.tobytes(): index for index, image in enumerate(written.train_images)}
    found = [
        by_content[pixels.round().astype(np.uint8).tobytes()]
        for pixels in unnormalised(train_images, dm.mean, dm.std)
    ]
    assert Counter(found) == Counter(dm.train_indices.tolist())
    torch.testing.assert_close(train_images.double(), expected_train[found], rtol=0, atol=1e-5)
    assert train_labels.tolist() == written.train_labels[found].tolist()


def test_split_is_seeded_stratified_disjoint_and_complete(on_disk):
    spec, root, written = on_disk
    splits = []
    for seed in (0, 0, 1):
        dm = spec.datamodule(root, val_size=spec.val_size, seed=seed)
        dm.setup("fit")
        splits.append((dm.train_indices.tolist(), dm.val_indices.tolist()))
    (train, val), same, other = splits
    assert same == (train, val) and other != (train, val)
    total = len(written.train_labels)
    n_val = spec.val_size if isinstance(spec.val_size, int) else round(spec.val_size * total)
    assert len(val) == n_val and set(train).isdisjoint(val) and sorted(train + val) == list(range(total))
    per_class = Counter(written.train_labels[val].tolist())
    share = n_val / total
    for label, count in Counter(written.train_labels.tolist()).items():
        assert abs(per_class[label] - share * count) <= 1


def padded_crops(image: np.ndarray, pad: int, size: int) -> tuple[list[tuple[int, int, bool]], np.ndarray]:
    """Every (row offset, column offset, mirrored) crop of ``image`` zero-padded by ``pad`` pixels."""
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    offsets = [
        (dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (False, True)
    ]
    crops = [padded[dy : dy + size, dx : dx + size][:, :: -1 if flip else 1] for dy, dx, flip in offsets]
    return offsets, np.stack(crops)


def test_augmentation_is_a_padded_crop_with_flip_only_where_documented(on_disk):
    spec, root, written = on_disk
    dm = spec.datamodule(root, val_size=spec.val_size, seed=5)
    dm.setup("fit")
    torch.manual_seed(0)
    seen_shift, seen_flip = False, False
    for position in range(24):
        index = int(dm.train_indices[position])
        offsets, crops = padded_crops(written.train_images[index], dm.crop_padding, dm.image_size)
        pixels = unnormalised(dm.train_set[position][0][None], dm.mean, dm.std)[0]
        np.testing.assert_allclose(pixels, pixels.round(), atol=1e-3)
        matches = [
            offset
            for offset, crop in zip(offsets, crops, strict=True)
            if np.array_equal(crop, pixels.round())
        ]
        assert matches, f"training sample {position} is no padded crop of image {index}"
        seen_shift |= any((dy, dx) != (dm.crop_padding, dm.crop_padding) for dy, dx, _ in matches)
        seen_flip |= all(flip for _, _, flip in matches)
    assert seen_shift and seen_flip == spec.flips
    plain = normalised(written.train_images[dm.val_indices[:1]], dm.mean, dm.std)[0]
    torch.testing.assert_close(dm.val_set[0][0].double(), plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "datamodule", [CIFAR10DataModule, CIFAR100DataModule, MNISTDataModule, SVHNDataModule]
)
def test_missing_dataset_error_says_where_it_looked_and_how_to_get_it(datamodule, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = datamodule("relative/data")
    dm.prepare_data()
    assert not (tmp_path / "relative").exists()
    with pytest.raises(DatasetNotFoundError) as caught:
        dm.setup("fit")
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, RuntimeError)
    message = str(caught.value)
    assert str(tmp_path / "relative" / "data" / dm.required_files[0]) in message
    assert "download=True" in message and "http" in message


def test_corrupted_files_fail_the_md5_check(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(0))
    with pytest.raises(DatasetNotFoundError, match=r"md5.*download=True") as caught:
        CIFAR10DataModule(tmp_path).setup("fit")
    assert str(tmp_path.resolve()) in str(caught.value)


def test_prepare_data_downloads_only_when_asked(tmp_path, monkeypatch):
    write_cifar10(tmp_path, np.random.default_rng(0))
    trust_cifar_files(monkeypatch, CIFAR10, tmp_path / "cifar-10-batches-py")
    calls = []
    monkeypatch.setattr(CIFAR10, "download", lambda self: calls.append(self.train))
    CIFAR10DataModule(tmp_path).prepare_data()
    assert calls == []
    CIFAR10DataModule(tmp_path, download=True).prepare_data()
    assert calls == [True, False]


def test_val_size_zero_trains_on_everything_and_too_large_is_rejected(tmp_path, monkeypatch):
    write_cifar10(tmp_path, np.random.default_rng(0))
    trust_cifar_files(monkeypatch, CIFAR10, tmp_path / "cifar-10-batches-py")
    dm = CIFAR10DataModule(tmp_path, val_size=0)
    dm.setup("fit")
    assert len(dm.train_set) == 60 and dm.val_dataloader() == []
    with pytest.raises(ValueError, match="`val_size`=60"):
        CIFAR10DataModule(tmp_path, val_size=60).setup("fit")


def test_default_splits_follow_the_documented_sizes():
    assert CIFAR10DataModule().val_size == 5_000
    assert CIFAR100DataModule().val_size == 2_500
    assert MNISTDataModule().val_size == 5_000 and SVHNDataModule().val_size == 5_000
    assert CIFAR10DataModule(val_size=0.1).val_size == 0.1


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split_sizes_seeded_stratified_disjoint(digits):
    dm = DigitsDataModule()
    dm.setup()
    parts = [dm.train_indices, dm.val_indices, dm.test_indices]
    assert [len(part) for part in parts] == [1258, 180, 359]
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [1258, 180, 359]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1797))
    again, other = DigitsDataModule(), DigitsDataModule(seed=1)
    again.setup()
    other.setup()
    assert all(
        np.array_equal(a, b)
        for a, b in zip(parts, [again.train_indices, again.val_indices, again.test_indices], strict=True)
    )
    assert not np.array_equal(dm.test_indices, other.test_indices)
    class_sizes = np.bincount(digits.target)
    for part, share in ((dm.test_indices, 359 / 1797), (dm.val_indices, 180 / 1797)):
        assert np.all(np.abs(np.bincount(digits.target[part], minlength=10) - share * class_sizes) <= 1.5)


def test_digits_values_are_sklearn_pixels_standardised_with_training_statistics(digits):
    dm = DigitsDataModule(image_size=8, channels=1, val_size=100, test_size=300, seed=2)
    dm.setup()
    scaled = digits.images.astype(np.float64) / 16.0
    train_pixels = [value for index in dm.train_indices for value in scaled[index].ravel()]
    mean = sum(train_pixels) / len(train_pixels)
    std = (sum((value - mean) ** 2 for value in train_pixels) / len(train_pixels)) ** 0.5
    assert dm.mean == pytest.approx((mean,), rel=1e-6) and dm.std == pytest.approx((std,), rel=1e-6)
    for dataset, indices in (
        (dm.train_set, dm.train_indices),
        (dm.val_set, dm.val_indices),
        (dm.test_set, dm.test_indices),
    ):
        images, labels = dataset.tensors
        expected = torch.from_numpy((scaled[indices] - mean) / std).unsqueeze(1)
        torch.testing.assert_close(images.double(), expected, rtol=0, atol=1e-5)
        assert labels.tolist() == digits.target[indices].tolist()


def bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres: output pixel i samples input coordinate (i + 0.5) * in / out - 0.5."""

    def taps(out_index: int, in_size: int) -> tuple[int, int, float]:
        source = max((out_index + 0.5) * in_size / size - 0.5, 0.0)
        low = int(source)
        return low, min(low + 1, in_size - 1), source - low

    out = np.zeros((size, size))
    for row in range(size):
        top, bottom, wy = taps(row, image.shape[0])
        for col in range(size):
            left, right, wx = taps(col, image.shape[1])
            out[row, col] = (1 - wy) * ((1 - wx) * image[top, left] + wx * image[top, right]) + wy * (
                (1 - wx) * image[bottom, left] + wx * image[bottom, right]
            )
    return out


@pytest.mark.parametrize("size", [32, 13])
def test_digits_resize_is_bilinear_and_channels_are_copies(digits, size):
    dm = DigitsDataModule(image_size=size, channels=3)
    dm.setup()
    images, _ = dm.test_set.tensors
    assert images.shape == (359, 3, size, size) and images.dtype == torch.float32
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert len(dm.mean) == len(dm.std) == 3 and dm.mean[0] == dm.mean[2]
    for position in (0, 100, 358):
        index = dm.test_indices[position]
        expected = bilinear_reference(digits.images[index] / 16.0, size)
        np.testing.assert_allclose(
            images[position, 0].double().numpy() * dm.std[0] + dm.mean[0], expected, atol=1e-5
        )


def test_digits_labels_stay_with_their_images():
    """A 1-nearest-neighbour classifier over the training split must classify the test split well."""
    dm = DigitsDataModule(image_size=8)
    dm.setup()
    train_images, train_labels = dm.train_set.tensors
    test_images, test_labels = dm.test_set.tensors
    nearest = torch.cdist(test_images.flatten(1).double(), train_images.flatten(1).double()).argmin(dim=1)
    assert (train_labels[nearest] == test_labels).double().mean() >= 0.95


def test_digits_loaders_and_batch_size_read_at_each_call():
    dm = DigitsDataModule(channels=3, batch_size=64)
    dm.setup("fit")
    first = dm.train_dataloader()
    images, labels = next(iter(first))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() <= 9
    dm.batch_size = 17
    assert next(iter(dm.train_dataloader()))[0].shape[0] == 17
    assert next(iter(first))[0].shape[0] == 64
    assert len(dm.val_dataloader()) == -(-180 // 17) and next(iter(dm.test_dataloader()))[0].shape[0] == 17


class DoublesBatchSize(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        lightning_setattr(pl_module, "batch_size", 2 * trainer.datamodule.batch_size)


def test_trainer_picks_up_a_batch_size_changed_like_batch_size_finder_does(trainer_for, digits_module):
    dm = DigitsDataModule(image_size=8, batch_size=16)
    module = digits_module(validate=True)
    limits = dict(limit_train_batches=2, limit_val_batches=1)
    trainer = trainer_for([DoublesBatchSize()], max_epochs=3, reload_dataloaders_every_n_epochs=1, **limits)
    trainer.fit(module, datamodule=dm)
    assert lightning_hasattr(module, "batch_size")
    sizes = [(epoch, len(labels)) for (epoch, _), labels in zip(module.positions, module.batches)]
    assert sizes == [(0, 16), (0, 16), (1, 32), (1, 32), (2, 64), (2, 64)]
    assert dm.hparams.batch_size == dm.batch_size == 128


# ----------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("datamodule", "kwargs", "error", "name"),
    [
        (DigitsDataModule, {"batch_size": 0}, ValueError, "batch_size"),
        (DigitsDataModule, {"batch_size": -4}, ValueError, "batch_size"),
        (DigitsDataModule, {"batch_size": 2.5}, TypeError, "batch_size"),
        (DigitsDataModule, {"num_workers": -1}, ValueError, "num_workers"),
        (DigitsDataModule, {"val_size": -1}, ValueError, "val_size"),
        (DigitsDataModule, {"val_size": 1.0}, ValueError, "val_size"),
        (DigitsDataModule, {"val_size": "10%"}, TypeError, "val_size"),
        (DigitsDataModule, {"test_size": -0.2}, ValueError, "test_size"),
        (DigitsDataModule, {"image_size": 4}, ValueError, "image_size"),
        (DigitsDataModule, {"channels": 2}, ValueError, "channels"),
        (DigitsDataModule, {"seed": -1}, ValueError, "seed"),
        (DigitsDataModule, {"stratify": "yes"}, TypeError, "stratify"),
        (CIFAR10DataModule, {"batch_size": 0}, ValueError, "batch_size"),
        (CIFAR100DataModule, {"num_workers": -2}, ValueError, "num_workers"),
        (MNISTDataModule, {"val_size": 1.5}, ValueError, "val_size"),
        (SVHNDataModule, {"data_dir": 3}, TypeError, "data_dir"),
        (CIFAR10DataModule, {"download": "yes"}, TypeError, "download"),
        (CIFAR10DataModule, {"augment": None}, TypeError, "augment"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_argument(datamodule, kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        datamodule(**kwargs)


def test_digits_split_sizes_that_leave_nothing_to_train_on_are_rejected_in_setup():
    with pytest.raises(ValueError, match=re.escape("`val_size`=900 and `test_size`=0.5")):
        DigitsDataModule(val_size=900, test_size=0.5).setup()


def test_loaders_before_setup_say_what_to_do():
    with pytest.raises(RuntimeError, match=r"setup\('fit'\)"):
        DigitsDataModule().train_dataloader()


# ----------------------------------------------------------------------------- exact resume (issue 19, finding 13)


@pytest.fixture
def fit_digits(trainer_for, digits_module) -> Callable[..., L.LightningModule]:
    """``fit_digits(root, max_steps, callbacks=(), ckpt_path=None, plain="", validate=False,
    **options)``: ``max_steps`` steps on digits (batch 100 of 1,438 images: 15 steps an epoch, the
    last of 38; with ``validate``, 1,258 and 13 steps, a validation split and loop), rooted in
    ``root``; ``plain="shuffled"`` or ``"sequential"`` replaces the loader with a user's plain
    DataLoader. Returns the trained ``digits_module``."""

    def fit(
        root: Path, max_steps: int, callbacks=(), ckpt_path=None, plain: str = "", validate=False, **options
    ) -> L.LightningModule:
        L.seed_everything(7, verbose=False)
        dm = DigitsDataModule(image_size=8, batch_size=100, val_size=180 if validate else 0)
        if plain:

            def plain_loader() -> torch.utils.data.DataLoader:
                return torch.utils.data.DataLoader(dm.train_set, batch_size=100, shuffle=plain == "shuffled")

            dm.train_dataloader = plain_loader
        module = digits_module(validate)
        steps = dict(max_steps=max_steps, max_epochs=-1)
        trainer = trainer_for(
            callbacks, default_root_dir=root, enable_checkpointing=bool(callbacks), **steps, **options
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module

    return fit


@pytest.mark.parametrize("at", [5, 15, 20])  # mid-epoch 0, the end of epoch 0, mid-epoch 1
def test_a_fit_resumed_from_any_step_trains_exactly_as_the_uninterrupted_one(tmp_path, at, fit_digits):
    """Every weight equal (torch.equal) after 30 steps, and the same batches in the same order, when
    the fit is stopped after 22 steps and resumed from the checkpoint of step ``at``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = fit_digits(tmp_path / "full", 30)
    saver = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=at, save_top_k=-1)
    fit_digits(tmp_path / "first", 22, [saver])
    (checkpoint,) = (tmp_path / "ckpt").glob(f"*-step={at}.ckpt")
    resumed = fit_digits(tmp_path / "second", 30, [ModelCheckpoint(tmp_path / "unused")], checkpoint)
    assert len(resumed.batches) == 30 - at
    for ours, theirs in zip(resumed.batches, full.batches[at:]):
        assert torch.equal(ours, theirs)
    for (name, ours), theirs in zip(resumed.state_dict().items(), full.state_dict().values()):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("on_train_epoch_end", [False, True])
def test_a_fit_resumed_from_an_epoch_end_checkpoint_trains_exactly_as_the_uninterrupted_one(
    tmp_path, on_train_epoch_end, fit_digits
):
    """``ModelCheckpoint(every_n_epochs=1)`` of a module with a validation loop, saved after the
    validation or at the training epoch's end: stopped after 20 steps (13 an epoch), resumed from
    the end of epoch 0; every weight equal after 30 steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = fit_digits(tmp_path / "full", 30, validate=True)
    saver = ModelCheckpoint(
        tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=on_train_epoch_end
    )
    fit_digits(tmp_path / "first", 20, [saver], validate=True)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=13.ckpt"
    unused = [ModelCheckpoint(tmp_path / "u")]
    resumed = fit_digits(tmp_path / "second", 30, unused, checkpoint, validate=True)
    assert [torch.equal(a, b) for a, b in zip(resumed.batches, full.batches[13:])] == [True] * 17
    for (name, ours), theirs in zip(resumed.state_dict().items(), full.state_dict().values()):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("plain", ["", "sequential"])
def test_lightning_trains_one_extra_batch_after_a_train_epoch_end_checkpoint_without_validation(
    tmp_path, plain, fit_digits
):
    """What the README says of Lightning 2.6 (our loader or a plain one): resumed from a checkpoint
    saved at ``on_train_epoch_end`` of a module without ``validation_step``, the fit trains one
    more batch in the finished epoch (batch index 15 of 15) before the next epoch starts."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    fit_digits(tmp_path / "first", 15, [saver], plain=plain)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=15.ckpt"
    resumed = fit_digits(tmp_path / "second", 17, [ModelCheckpoint(tmp_path / "u")], checkpoint, plain=plain)
    assert resumed.positions == [(0, 15), (1, 0)]


@pytest.mark.parametrize(("plain", "at"), [("shuffled", 15), ("sequential", 5)])
def test_a_plain_dataloader_does_not_resume_exactly(tmp_path, plain, at, fit_digits):
    """What the README says of a user's plain ``DataLoader``: shuffled, resumed at an epoch end, its
    next epoch is shuffled differently; resumed mid-epoch, the epoch starts over from its first
    batch, and is cut short by the batches done before the checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = fit_digits(tmp_path / "full", 20, plain=plain)
    saver = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=at, save_top_k=-1)
    fit_digits(tmp_path / "first", at, [saver], plain=plain)
    (checkpoint,) = (tmp_path / "ckpt").glob(f"*-step={at}.ckpt")
    unused = [ModelCheckpoint(tmp_path / "unused")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = fit_digits(tmp_path / "second", 20, unused, checkpoint, plain=plain)
    assert not torch.equal(resumed.layer.weight, full.layer.weight)
    if plain == "sequential":
        assert any("dataloader is not resumable" in str(w.message) for w in caught)
        restarted = zip(resumed.batches[: 15 - at], full.batches)
        assert all(torch.equal(ours, first) for ours, first in restarted), "the epoch starts over"
        assert torch.equal(resumed.batches[15 - at], full.batches[15]), "the next epoch comes early"


def test_the_shuffled_order_depends_on_the_seed_and_the_epoch_only():
    dm = DigitsDataModule(image_size=8, batch_size=1438, val_size=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    orders = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(epoch + 100)  # the global RNG plays no part
        orders.append(next(iter(loader))[1])
    assert torch.equal(orders[0], orders[2]) and not torch.equal(orders[0], orders[1])
    assert sorted(loader.sampler) == list(range(1438))


def test_a_ddp_fit_resumed_mid_epoch_trains_exactly_as_the_uninterrupted_one(
    tmp_path, fit_digits, digits_module
):
    """Two CPU processes (719 images each: 8 steps an epoch): stopped after 9 steps, resumed from
    the checkpoint of step 5; every weight equal after 12 steps (Lightning keeps our sampler)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ddp = {"strategy": "ddp_fork", "devices": 2}
    full = fit_digits(tmp_path / "full", 12, **ddp)
    fit_digits(tmp_path / "first", 9, [ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=5)], **ddp)
    (checkpoint,) = (tmp_path / "ckpt").glob("*-step=5.ckpt")
    resumed = fit_digits(tmp_path / "second", 12, [ModelCheckpoint(tmp_path / "unused")], checkpoint, **ddp)
    for (name, ours), theirs in zip(resumed.state_dict().items(), full.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert not torch.equal(resumed.layer.weight, digits_module().layer.weight), "it trained"


def test_under_ddp_each_process_resumes_its_own_share():
    """Two processes: disjoint shares covering the epoch's permutation (brute force: seed + epoch),
    and a resume skips the samples each process already trained on, in its share."""
    from datamodules.base import ResumableSampler

    dataset = list(range(10))
    shares = [list(ResumableSampler(dataset, shuffle=True, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    permutation = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert shares == [permutation[0::2], permutation[1::2]]
    sampler = ResumableSampler(dataset, shuffle=True, seed=3, num_replicas=2, rank=1)
    sampler.resume(epoch=0, start=2)
    assert list(sampler) == permutation[1::2][2:]
    assert list(sampler) == permutation[1::2], "the skip applies once"
