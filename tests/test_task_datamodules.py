"""Segmentation and paired-image datamodules.

VOC, Cityscapes and pix2pix folders are written here in their real layouts (VOC: JPEG images,
palette PNG masks and the split lists; Cityscapes: PNG images and ``labelIds`` PNGs per city;
pix2pix: side-by-side A | B JPEGs) and read back through torchvision's dataset classes with
``download=False``. JPEG is lossy, so expected images are the files as PIL decodes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import Cityscapes

from lightning_tricks.datamodules import (
    CityscapesDataModule,
    DatasetNotFoundError,
    PairedImageDataModule,
    PairedShapesDataModule,
    ShapesSegmentationDataModule,
    VOCSegmentationDataModule,
)
from lightning_tricks.datamodules.segmentation import IMAGENET_MEAN, IMAGENET_STD, cityscapes_train_ids

pytestmark = pytest.mark.usefixtures("single_thread")

VOC_SIZES = [(20, 28), (24, 20), (18, 18), (30, 26), (22, 24), (20, 20)]  # (height, width)


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth uint8 RGB image (JPEG keeps it close), different per call."""
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6, size=3)
    channels = [127 + 100 * np.sin(x / 5 + phase[c]) * np.cos(y / 7 - phase[c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def write_voc(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    masks = {}
    palette = rng.integers(0, 256, size=768).tolist()
    for index, (height, width) in enumerate(VOC_SIZES):
        name = f"2007_{index:06d}"
        Image.fromarray(smooth_image(rng, height, width)).save(
            base / "JPEGImages" / f"{name}.jpg", quality=95
        )
        mask = rng.integers(0, 21, size=(height, width)).astype(np.uint8)
        mask[0] = 255  # object border
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        png.save(base / "SegmentationClass" / f"{name}.png")
        masks[name] = mask
    names = sorted(masks)
    (base / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:4]) + "\n")
    (base / "ImageSets/Segmentation/val.txt").write_text("\n".join(names[4:]) + "\n")
    return masks


def write_cityscapes(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two cities in train, one in val; returns the val (image, label ids) pairs by image file name."""
    val = {}
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt",))):
        for city in cities:
            for folder in ("leftImg8bit", "gtFine"):
                (root / folder / split / city).mkdir(parents=True)
            for index in range(2):
                stem = f"{city}_000000_{index:06d}"
                image = smooth_image(rng, 16, 24)
                ids = rng.integers(0, 34, size=(16, 24)).astype(np.uint8)
                Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
                if split == "val":
                    val[f"{stem}_leftImg8bit.png"] = (image, ids)
    return val


def normalised(image: np.ndarray) -> torch.Tensor:
    scaled = torch.from_numpy(image).double().permute(2, 0, 1) / 255
    return (scaled - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def window_matches(image, mask, out_image, out_mask, size) -> list[tuple[int, int, bool]]:
    """Every (top, left, mirrored) window of the padded (image, mask) equal to the loader's output."""
    height, width = mask.shape
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    padded_mask = np.pad(mask.astype(np.int64), ((0, pad_h), (0, pad_w)), constant_values=255)
    padded_image = torch.nn.functional.pad(normalised(image), (0, pad_w, 0, pad_h))
    found = []
    for flip in (False, True):
        m = padded_mask[:, ::-1] if flip else padded_mask
        im = padded_image.flip(-1) if flip else padded_image
        for top in range(m.shape[0] - size + 1):
            for left in range(m.shape[1] - size + 1):
                same_mask = np.array_equal(m[top : top + size, left : left + size], out_mask.numpy())
                if same_mask and torch.allclose(
                    im[:, top : top + size, left : left + size], out_image.double(), atol=1e-5
                ):
                    found.append((top, left, flip))
    return found


def test_voc_loaders_read_the_folder_with_joint_flip_and_crop(tmp_path):
    masks = write_voc(tmp_path, np.random.default_rng(0))
    dm = VOCSegmentationDataModule(tmp_path, image_size=16, batch_size=2)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4, 2, 2)
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (2, 16, 16) and labels.dtype == torch.int64

    names = sorted(masks)
    torch.manual_seed(0)
    seen_flip, seen_offset = False, False
    for _ in range(6):
        for position, name in enumerate(names[:4]):
            decoded = np.asarray(Image.open(tmp_path / "VOCdevkit/VOC2012/JPEGImages" / f"{name}.jpg"))
            out_image, out_mask = dm.train_set[position]
            matches = window_matches(decoded, masks[name], out_image, out_mask, 16)
            assert matches, f"training sample {name} is no joint crop of its image and mask"
            seen_flip |= all(flip for *_, flip in matches)
            seen_offset |= all((top, left) != (0, 0) for top, left, _ in matches)
    assert seen_flip and seen_offset

    for position, name in enumerate(names[4:]):  # evaluation: padded with 255 (mask), centre crop
        decoded = np.asarray(Image.open(tmp_path / "VOCdevkit/VOC2012/JPEGImages" / f"{name}.jpg"))
        out_image, out_mask = dm.val_set[position]
        height, width = masks[name].shape
        top, left = (max(height, 16) - 16 + 1) // 2, (max(width, 16) - 16 + 1) // 2
        assert (top, left, False) in window_matches(decoded, masks[name], out_image, out_mask, 16)
    assert set(labels.unique().tolist()) <= set(range(21)) | {255}


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    val = write_cityscapes(tmp_path, np.random.default_rng(1))
    dm = CityscapesDataModule(tmp_path, image_size=16, batch_size=2, augment=False)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (4, 2)
    lookup = {c.id: (c.train_id if 0 <= c.train_id < 255 else 255) for c in Cityscapes.classes if c.id >= 0}
    assert cityscapes_train_ids()[: max(lookup) + 1].tolist() == [lookup[i] for i in range(max(lookup) + 1)]
    for position, path in enumerate(dm.val_set.dataset.images):  # torchvision's file order
        image, ids = val[Path(path).name]
        out_image, out_mask = dm.val_set[position]
        expected = np.vectorize(lookup.get)(ids)[:, 4:20]  # 16×24 → centre 16×16
        assert np.array_equal(out_mask.numpy(), expected)
        torch.testing.assert_close(out_image.double(), normalised(image)[:, :, 4:20], rtol=0, atol=1e-5)
    assert set(np.unique(expected)) <= set(range(19)) | {255}


def write_pairs(root: Path, rng: np.random.Generator, splits=("train", "val")) -> dict[str, list]:
    written = {}
    for split in splits:
        (root / split).mkdir(parents=True)
        written[split] = []
        for index in range(3):
            a, b = smooth_image(rng, 16, 16), smooth_image(rng, 16, 16)
            Image.fromarray(np.concatenate([a, b], axis=1)).save(root / split / f"{index}.png")
            written[split].append((a, b))
    return written


@pytest.mark.parametrize("direction", ["AtoB", "BtoA"])
def test_paired_images_split_side_by_side_files(tmp_path, direction):
    written = write_pairs(tmp_path, np.random.default_rng(2))
    dm = PairedImageDataModule(tmp_path, direction=direction, image_size=16, batch_size=2)
    dm.setup("fit")
    dm.setup("test")  # no test/ folder: the val folder
    as_range = lambda x: torch.from_numpy(x).permute(2, 0, 1).float() / 127.5 - 1  # noqa: E731
    for position, (a, b) in enumerate(written["val"]):
        x, y = dm.test_set[position]
        first, second = (a, b) if direction == "AtoB" else (b, a)
        torch.testing.assert_close(x, as_range(first), rtol=0, atol=1e-6)
        torch.testing.assert_close(y, as_range(second), rtol=0, atol=1e-6)
    torch.manual_seed(0)
    flips = 0
    for _ in range(8):
        x, y = dm.train_set[0]
        a, b = (as_range(t) for t in written["train"][0])
        first, second = (a, b) if direction == "AtoB" else (b, a)
        mirrored = torch.allclose(x, first.flip(-1), atol=1e-6)
        assert mirrored or torch.allclose(x, first, atol=1e-6)
        torch.testing.assert_close(y, second.flip(-1) if mirrored else second, rtol=0, atol=1e-6)
        flips += mirrored
    assert 0 < flips < 8


def test_paired_images_random_crop_after_load_size(tmp_path):
    write_pairs(tmp_path, np.random.default_rng(3))
    dm = PairedImageDataModule(tmp_path, image_size=8, load_size=12, batch_size=2)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (2, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 3, 8, 8)


@pytest.mark.parametrize(
    ("make", "expected_path"),
    [
        (lambda root: VOCSegmentationDataModule(root), "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"),
        (lambda root: CityscapesDataModule(root), "leftImg8bit/train"),
        (lambda root: PairedImageDataModule(root), "train"),
    ],
)
def test_missing_dataset_error_names_the_path(make, expected_path, tmp_path):
    dm = make(tmp_path / "absent")
    with pytest.raises(DatasetNotFoundError) as caught:
        dm.setup("fit")
    assert str(tmp_path / "absent" / expected_path) in str(caught.value)


def test_shapes_are_deterministic_by_seed_and_masks_match_images():
    def scenes(seed):
        dm = ShapesSegmentationDataModule(image_size=16, train_size=6, val_size=3, test_size=3, seed=seed)
        dm.setup()
        return dm.val_set.tensors

    (images, masks), (again, masks_again), (other, _) = scenes(0), scenes(0), scenes(1)
    assert torch.equal(images, again) and torch.equal(masks, masks_again) and not torch.equal(images, other)
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3} and (masks > 0).any()
    shape_red = images[:, 0][masks == 1].mean()  # disks are reddish, the background is not
    assert shape_red > images[:, 0][masks == 0].mean()


def test_paired_shapes_b_is_a_function_of_a_and_direction_swaps():
    def pairs(direction, seed=0):
        dm = PairedShapesDataModule(
            image_size=16, train_size=4, val_size=4, test_size=4, seed=seed, direction=direction
        )
        dm.setup()
        return dm.val_set.tensors

    a, b = pairs("AtoB")
    b_swapped, a_swapped = pairs("BtoA")
    assert torch.equal(a, a_swapped) and torch.equal(b, b_swapped)
    assert a.min() >= -1 and b.max() <= 1
    flat_a = a.permute(0, 2, 3, 1).reshape(-1, 3)
    assert len(flat_a.unique(dim=0)) <= 4  # the label palette


def test_batch_size_is_read_when_the_train_loader_is_built():
    dm = ShapesSegmentationDataModule(image_size=8, batch_size=4, train_size=16, val_size=2, test_size=2)
    dm.setup("fit")
    assert len(next(iter(dm.train_dataloader()))[0]) == 4
    dm.batch_size = 8
    assert len(next(iter(dm.train_dataloader()))[0]) == 8


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: ShapesSegmentationDataModule(image_size=4), "image_size"),
        (lambda: ShapesSegmentationDataModule(batch_size=0), "batch_size"),
        (lambda: PairedShapesDataModule(direction="AB"), "direction"),
        (lambda: PairedImageDataModule(image_size=16, load_size=8), "load_size"),
        (lambda: VOCSegmentationDataModule(download="yes"), "download"),
        (lambda: CityscapesDataModule(data_dir=3), "data_dir"),
    ],
)
def test_bad_arguments_name_the_argument(make, name):
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        make()
