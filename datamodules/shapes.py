"""Procedurally generated scenes of shapes: embedded segmentation and pix2pix data that need no download.

Each scene has a smooth background and 1 to ``max_shapes`` shapes — disk (class 1), square
(class 2) and triangle (class 3), class 0 the background — of random size, position and rotation,
later shapes covering earlier ones. Everything is drawn from ``numpy.random.default_rng(seed)``,
so a ``(seed, image_size, count)`` triple always gives the same scenes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from lightning_tricks import checks

from .dense import DenseDataModule

SHAPE_CLASSES = ("background", "disk", "square", "triangle")
_SIDES = {2: 4, 3: 3}  # regular polygons: class -> number of sides
# Base colours of the segmentation scenes (jittered per shape) and of the pix2pix renderings.
_SHAPE_COLOURS = np.array([[0.0, 0.0, 0.0], [0.9, 0.3, 0.2], [0.2, 0.7, 0.3], [0.25, 0.35, 0.9]])
# Flat label colours of the pix2pix input (A), like Cityscapes' colour-coded label maps.
LABEL_PALETTE = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def shape_masks(count: int, size: int, max_shapes: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, size, size)`` uint8 class masks of random scenes of shapes.

    A shape of class c, centre (cx, cy), circumradius r and angle θ covers the pixels (x, y) (pixel
    centres) with |p|² ≤ r² for a disk, and for a regular n-gon (square n = 4, triangle n = 3)
    with x'·cos φ_k + y'·sin φ_k ≤ r·cos(π/n) for every k, φ_k = θ + 2πk/n, (x', y') = p − centre.
    """
    coords = np.arange(size) + 0.5
    x, y = np.meshgrid(coords, coords, indexing="xy")
    masks = np.zeros((count, size, size), dtype=np.uint8)
    for scene in masks:
        for _ in range(rng.integers(1, max_shapes + 1)):
            cls = int(rng.integers(1, len(SHAPE_CLASSES)))
            radius = rng.uniform(size / 8, size / 4)
            cx, cy = rng.uniform(radius / 2, size - radius / 2, size=2)
            theta = rng.uniform(0, 2 * np.pi)
            dx, dy = x - cx, y - cy
            if cls == 1:
                inside = dx**2 + dy**2 <= radius**2
            else:
                sides = _SIDES[cls]
                angles = theta + 2 * np.pi * np.arange(sides) / sides
                projections = dx[..., None] * np.cos(angles) + dy[..., None] * np.sin(angles)
                inside = (projections <= radius * np.cos(np.pi / sides)).all(axis=-1)
            scene[inside] = cls
    return masks


def scene_images(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(N, 3, H, W)`` float32 images in [0, 1] of the scenes: a random linear colour gradient as
    background, each class its base colour scaled by a random brightness in [0.6, 1] per image and
    channel, plus Gaussian pixel noise (σ = 0.05)."""
    count, size = masks.shape[0], masks.shape[-1]
    ramp = np.linspace(0.0, 1.0, size)
    start, end = rng.uniform(0.2, 0.6, size=(2, count, 3, 1, 1))
    direction = rng.integers(0, 2, size=count).astype(bool)
    gradient = np.where(direction[:, None, None, None], ramp[None, None, :, None], ramp[None, None, None, :])
    background = start + (end - start) * gradient
    colours = _SHAPE_COLOURS[None] * rng.uniform(0.6, 1.0, size=(count, len(SHAPE_CLASSES), 3))
    painted = np.take_along_axis(colours[:, :, :, None, None], masks[:, None, None].astype(np.int64), axis=1)[
        :, 0
    ]
    images = np.where(masks[:, None] > 0, painted, background)
    images = images + rng.normal(0.0, 0.05, size=images.shape)
    return np.clip(images, 0.0, 1.0).astype(np.float32)


def rendered_images(masks: np.ndarray) -> np.ndarray:
    """``(N, 3, H, W)`` float32 "photos" of the masks in [0, 1], a deterministic function of the mask
    (what pix2pix learns): a fixed vertical sky-to-ground background with a horizontal stripe
    texture, each shape its class colour lit from the top left, and a dark one-pixel outline where
    the class changes."""
    size = masks.shape[-1]
    ramp = np.linspace(0.0, 1.0, size)
    sky, ground = np.array([0.55, 0.7, 0.9]), np.array([0.45, 0.4, 0.3])
    stripes = 0.06 * np.sin(2 * np.pi * np.arange(size) / 4)
    background = sky[:, None] + (ground - sky)[:, None] * ramp[None] + stripes[None]
    background = np.broadcast_to(background[:, :, None], (3, size, size))
    light = 0.7 + 0.3 * (1 - (ramp[:, None] + ramp[None, :]) / 2)
    shapes = _SHAPE_COLOURS[masks.astype(np.int64)].transpose(0, 3, 1, 2) * light
    images = np.where(masks[:, None] > 0, shapes, background[None])
    edge = np.zeros_like(masks, dtype=bool)
    edge[:, 1:] |= masks[:, 1:] != masks[:, :-1]
    edge[:, :, 1:] |= masks[:, :, 1:] != masks[:, :, :-1]
    images = np.where(edge[:, None], images * 0.3, images)
    return np.clip(images, 0.0, 1.0).astype(np.float32)


def label_images(masks: np.ndarray) -> np.ndarray:
    """``(N, 3, H, W)`` float32 colour-coded label maps: :data:`LABEL_PALETTE` per class."""
    return LABEL_PALETTE[masks.astype(np.int64)].transpose(0, 3, 1, 2).astype(np.float32)


class RandomMirror(Dataset):
    """``(x, y)`` pairs of tensors mirrored together left-right with probability ½ (torch's RNG)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.dataset[index]
        if torch.rand(()) < 0.5:
            return x.flip(-1), y.flip(-1)
        return x, y


class _ShapesDataModule(DenseDataModule):
    """Shared split sizes, seed and scene generation of the two shapes datamodules."""

    num_classes = len(SHAPE_CLASSES)
    in_channels = 3

    def __init__(
        self,
        image_size: int,
        batch_size: int,
        num_workers: int,
        train_size: int,
        val_size: int,
        test_size: int,
        max_shapes: int,
        seed: int,
        augment: bool,
    ) -> None:
        super().__init__(image_size, batch_size, num_workers)
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            checks.integer(name, value, minimum=1)
        checks.integer("max_shapes", max_shapes, minimum=1)
        checks.integer("seed", seed, minimum=0)
        if not isinstance(augment, bool):
            raise TypeError(f"`augment` must be True or False, got {augment!r}.")
        self.save_hyperparameters()
        self.sizes = (train_size, val_size, test_size)
        self.max_shapes, self.seed, self.augment = max_shapes, seed, augment

    def setup(self, stage: str | None = None) -> None:
        """Generate the scenes of all three splits on the first call."""
        if self.train_set is not None:
            return
        rng = np.random.default_rng(self.seed)
        masks = shape_masks(sum(self.sizes), self.image_size, self.max_shapes, rng)
        inputs, targets = self._pairs(masks, rng)
        bounds = np.cumsum((0, *self.sizes))
        splits = [TensorDataset(inputs[lo:hi], targets[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
        self.train_set = RandomMirror(splits[0]) if self.augment else splits[0]
        self.val_set, self.test_set = splits[1:]

    def _pairs(self, masks: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class ShapesSegmentationDataModule(_ShapesDataModule):
    """Scenes of shapes with their class masks (4 classes): the embedded segmentation data.

    Images ``(3, S, S)`` float32 are ``(x − 0.5) / 0.25`` of the [0, 1] scenes of
    :func:`scene_images` (class colours jittered in brightness, random background gradient, pixel
    noise); masks ``(S, S)`` int64 in 0..3. Training pairs are randomly mirrored (seed 000 §1's
    augmentation) unless ``augment=False``. Deterministic given ``seed`` and ``image_size``.

    Args:
        image_size: side ``S`` of the scenes, ``>= 8``.
        batch_size: scenes per batch, ``>= 1``.
        num_workers: ``DataLoader`` worker processes.
        train_size, val_size, test_size: scenes per split, ``>= 1``.
        max_shapes: most shapes per scene, ``>= 1``.
        seed: seed of the generator, ``>= 0``.
        augment: randomly mirror the training pairs.

    Example::

        >>> dm = ShapesSegmentationDataModule(image_size=16, batch_size=4, train_size=8, val_size=4, test_size=4)
        >>> dm.setup("fit")
        >>> images, masks = next(iter(dm.val_dataloader()))
        >>> images.shape, masks.shape, masks.dtype
        (torch.Size([4, 3, 16, 16]), torch.Size([4, 16, 16]), torch.int64)
    """

    ignore_index = 255

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 16,
        num_workers: int = 0,
        train_size: int = 512,
        val_size: int = 128,
        test_size: int = 128,
        max_shapes: int = 3,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__(
            image_size, batch_size, num_workers, train_size, val_size, test_size, max_shapes, seed, augment
        )

    def _pairs(self, masks: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        images = (scene_images(masks, rng) - 0.5) / 0.25
        return torch.from_numpy(images), torch.from_numpy(masks).long()


class PairedShapesDataModule(_ShapesDataModule):
    """pix2pix pairs from scenes of shapes: colour-coded label map ↔ rendered "photo" (like
    Cityscapes labels → photo of seed 000 Fig. 7).

    A is :func:`label_images` (flat class colours), B is :func:`rendered_images` (lit shapes with
    outlines on a textured background), both ``(3, S, S)`` float32 in [-1, 1] (pix2pix's range).
    ``direction="AtoB"`` yields ``(A, B)``, ``"BtoA"`` yields ``(B, A)``. Training pairs are
    mirrored together at random unless ``augment=False``.

    Args: as :class:`ShapesSegmentationDataModule`, plus ``direction``.

    Example::

        >>> dm = PairedShapesDataModule(image_size=16, batch_size=2, train_size=4, val_size=2, test_size=2)
        >>> dm.setup("fit")
        >>> a, b = next(iter(dm.val_dataloader()))
        >>> a.shape, b.shape, bool(a.min() >= -1 and b.max() <= 1)
        (torch.Size([2, 3, 16, 16]), torch.Size([2, 3, 16, 16]), True)
    """

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 8,
        num_workers: int = 0,
        train_size: int = 256,
        val_size: int = 32,
        test_size: int = 32,
        max_shapes: int = 3,
        seed: int = 0,
        augment: bool = True,
        direction: str = "AtoB",
    ) -> None:
        if direction not in ("AtoB", "BtoA"):
            raise ValueError(f"`direction` must be 'AtoB' or 'BtoA'; got {direction!r}.")
        super().__init__(
            image_size, batch_size, num_workers, train_size, val_size, test_size, max_shapes, seed, augment
        )
        self.direction = direction

    def _pairs(self, masks: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        a = torch.from_numpy(label_images(masks) * 2 - 1)
        b = torch.from_numpy(rendered_images(masks) * 2 - 1)
        return (a, b) if self.direction == "AtoB" else (b, a)
