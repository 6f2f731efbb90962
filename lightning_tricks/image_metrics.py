"""Image metrics that order a dataset for the mini-batch heatmap (seed ``002_696f8026b30a9c31.txt`` §3.2).

Every metric is a batched tensor function ``images (N, C, H, W) -> scores``, on whatever device the
images are on: ``(N,)`` for a scalar score, ``(N, m)`` for a lexicographic key (column 0 first).
:func:`metric_order` sorts either kind. Any callable with that signature works as a custom metric.

- :func:`intensity`: the sum of all channels at all pixels (§3.2.1);
- :func:`color`: the image's mean colour in HSV, sorted by hue, then saturation, then value (§3.2.2);
- :func:`edges`: the number of pixels of a Canny edge map (§3.2.3, kornia's Canny);
- :class:`PerceptualDistance`: the LPIPS-style distance to the dataset's average image in the
  feature space of a CNN (§3.2.4).

The functions take images as they come: ``edges``' thresholds apply to the gradient magnitude of
the images as given, and ``color`` expects RGB (or grey) values in ``[0, 1]`` and clamps values
outside, so both need the images as stored, not a loader's standardised tensors (seed §3.2 scores
the images). ``MinibatchHeatmap`` gives them as stored: through the datamodule's ``denormalize``
or its ``metric_transform=`` argument.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

Metric = Callable[[Tensor], Tensor]
"""A metric: ``images (N, C, H, W) -> scores (N,)`` or ``(N, m)`` (a lexicographic key)."""

ImageTransform = Callable[[Tensor], Tensor]
"""``images (N, C, H, W) -> images``: what a metric sees of a training batch (e.g. a datamodule's
``denormalize``)."""

ALEXNET_RELU_LAYERS = (1, 4, 7, 9, 11)
"""Indices in ``torchvision.models.alexnet().features`` of the ReLUs after conv1..conv5 (LPIPS's taps)."""

PERCEPTUAL_MIN_SIDE = 64
"""Images smaller than this are upsampled (bilinear) before AlexNet, whose first layers need ~64 px."""


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a (N, C, H, W) tensor; got {shape}.")


def intensity(images: Tensor) -> Tensor:
    """Sum of every channel at every pixel, ``M_1 = Σ_i Σ_j Σ_k D_{i,j,k}``
    (seed ``002_696f8026b30a9c31.txt`` §3.2.1). Returns ``(N,)``.

    Example::

        >>> intensity(torch.ones(2, 3, 4, 4)).tolist()
        [48.0, 48.0]
    """
    _check_images(images)
    return images.sum(dim=(1, 2, 3))


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """``(..., 3)`` RGB in ``[0, 1]`` -> ``(..., 3)`` HSV, each in ``[0, 1]`` (hue as a fraction of a turn;
    grey has hue and saturation 0), the convention of Python's ``colorsys.rgb_to_hsv``."""
    r, g, b = rgb.unbind(-1)
    value, argmax = rgb.max(dim=-1)
    chroma = value - rgb.min(dim=-1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.stack([(g - b) / safe, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe], dim=-1)
    hue = (hue.gather(-1, argmax.unsqueeze(-1)).squeeze(-1) / 6.0) % 1.0
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), 0.0)
    return torch.stack([hue, saturation, value], dim=-1)


def color(images: Tensor) -> Tensor:
    """The mean colour of each image in HSV: ``(N, 3)`` columns hue, saturation, value in ``[0, 1]``
    (seed ``002_696f8026b30a9c31.txt`` §3.2.2: "the average color of the entire image is computed,
    and then converted to the HSV color space, where the images are then sorted").

    The result is a lexicographic key: :func:`metric_order` sorts by hue, then saturation, then
    value. Pixel values are clamped to ``[0, 1]`` first; one channel is read as grey (R = G = B).

    Example::

        >>> red = torch.zeros(1, 3, 2, 2); red[:, 0] = 1
        >>> color(red).tolist()
        [[0.0, 1.0, 1.0]]
    """
    _check_images(images)
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"`color` needs 1 (grey) or 3 (RGB) channels; got images with {channels}.")
    mean = images.clamp(0.0, 1.0).mean(dim=(2, 3))
    return rgb_to_hsv(mean.expand(-1, 3) if channels == 1 else mean)


def edges(
    images: Tensor,
    low_threshold: float = 0.1,
    high_threshold: float = 0.2,
    kernel_size: int = 5,
    sigma: float = 1.0,
) -> Tensor:
    """Number of edge pixels of a Canny edge map, ``M_3 = Σ_i Σ_j CANNY(D)``
    (seed ``002_696f8026b30a9c31.txt`` §3.2.3), with ``kornia.filters.canny`` (Gaussian blur of
    ``kernel_size``/``sigma``, hysteresis thresholds on the gradient magnitude; RGB is converted to
    grey first). Returns ``(N,)``.
    """
    _check_images(images)
    from kornia.filters import canny

    edge_map = canny(
        images,
        low_threshold=low_threshold,
        high_threshold=high_threshold,
        kernel_size=kernel_size,
        sigma=(sigma, sigma),
    )[1]
    return edge_map.sum(dim=(1, 2, 3))


def normalize_channels(features: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise each position's channel vector, LPIPS's ``ŷ^l_{hw} = y^l_{hw} / ‖y^l_{hw}‖``
    (Zhang et al. 2018, eq. 1)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def lpips_distance(features: Sequence[Tensor], reference: Sequence[Tensor]) -> Tensor:
    """LPIPS distance with unit layer weights, ``d = Σ_l mean_{h,w} ‖ŷ^l_{hw} − ŷ^l_{0,hw}‖²``
    (Zhang et al. 2018, eq. 1 with w_l = 1), between each of ``features`` (N, C_l, H_l, W_l) and the
    single ``reference`` (1, C_l, H_l, W_l). Returns ``(N,)``."""
    total = None
    for layer, ref in zip(features, reference, strict=True):
        diff = (normalize_channels(layer) - normalize_channels(ref)).pow(2).sum(dim=1).mean(dim=(1, 2))
        total = diff if total is None else total + diff
    return total


FeatureExtractor = Callable[[Tensor], "Tensor | Sequence[Tensor]"]
"""``images -> feature map (N, C, H, W)`` or a sequence of them (one per tapped layer)."""


class AlexNetFeatures(nn.Module):
    """The five ReLU outputs of torchvision's AlexNet ``features`` (the layers LPIPS taps), with one
    channel repeated to three and images smaller than ``PERCEPTUAL_MIN_SIDE`` upsampled."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features.eval().requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if min(images.shape[-2:]) < PERCEPTUAL_MIN_SIDE:
            images = nn.functional.interpolate(
                images, size=(PERCEPTUAL_MIN_SIDE, PERCEPTUAL_MIN_SIDE), mode="bilinear", align_corners=False
            )
        taps = []
        for index, layer in enumerate(self.features[: ALEXNET_RELU_LAYERS[-1] + 1]):
            images = layer(images)
            if index in ALEXNET_RELU_LAYERS:
                taps.append(images)
        return taps


def pretrained_alexnet_features() -> AlexNetFeatures:
    """torchvision's ImageNet AlexNet from the local torch hub cache, never downloaded.

    Raises:
        FileNotFoundError: the weights file is not in ``torch.hub.get_dir()/checkpoints``; the
            message names the file, where to put it, and the ``extractor=`` alternative.
    """
    from torchvision.models import AlexNet_Weights, alexnet

    weights = AlexNet_Weights.IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The perceptual metric's default feature extractor needs torchvision's pretrained AlexNet "
            f"weights at {path}, and nothing is downloaded at run time. Copy the file {weights.url} there "
            "(or set TORCH_HOME to a folder whose hub/checkpoints holds it), or pass your own "
            "`extractor=` (any callable images -> feature map or list of feature maps)."
        )
    model = alexnet()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return AlexNetFeatures(model.features)


class PerceptualDistance:
    """Distance of each image to the dataset's average image in a CNN's feature space
    (seed ``002_696f8026b30a9c31.txt`` §3.2.4), LPIPS-style (:func:`lpips_distance`: channel-unit-
    normalised features of each tapped layer, squared difference, spatial mean, summed over layers;
    unit layer weights, since LPIPS's learned ones are not available offline).

    The average image is set by :meth:`with_reference` (the sampler passes the dataset's mean
    image); called without one, the batch's own mean image is the reference.

    Args:
        extractor: ``images -> feature map or list of feature maps``; ``None`` loads torchvision's
            pretrained AlexNet (the seed's backend) from the local cache on first use (see
            :func:`pretrained_alexnet_features`).
        reference: ``(C, H, W)`` average image, or ``None``.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        >>> metric = PerceptualDistance(extractor=net).with_reference(torch.zeros(1, 8, 8))
        >>> metric(torch.rand(5, 1, 8, 8)).shape
        torch.Size([5])
    """

    name = "perceptual"
    needs_reference = True

    def __init__(self, extractor: FeatureExtractor | None = None, reference: Tensor | None = None) -> None:
        if extractor is not None and not callable(extractor):
            raise TypeError(
                f"`extractor` must be a callable images -> feature maps or None; got {type(extractor).__name__}."
            )
        self.extractor = extractor
        self.reference = reference

    def with_reference(self, reference: Tensor) -> PerceptualDistance:
        """A copy that measures distances to ``reference`` (the ``(C, H, W)`` average image)."""
        return PerceptualDistance(self.extractor, reference)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        _check_images(images)
        if self.extractor is None:
            self.extractor = pretrained_alexnet_features()
        if isinstance(self.extractor, nn.Module):
            self.extractor.to(images.device)
        reference = images.mean(dim=0) if self.reference is None else self.reference
        features = _as_list(self.extractor(images))
        ref_features = _as_list(self.extractor(reference.to(images).unsqueeze(0)))
        return lpips_distance(features, ref_features)


def _as_list(features: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [features] if isinstance(features, Tensor) else list(features)


def perceptual(
    images: Tensor, reference: Tensor | None = None, extractor: FeatureExtractor | None = None
) -> Tensor:
    """:class:`PerceptualDistance` as a function: LPIPS-style distance of each image to ``reference``
    (default: the batch's mean image) in ``extractor``'s feature space. Returns ``(N,)``."""
    return PerceptualDistance(extractor, reference)(images)


METRICS: dict[str, Callable[[], Metric]] = {
    "intensity": lambda: intensity,
    "color": lambda: color,
    "edges": lambda: edges,
    "perceptual": PerceptualDistance,
}
"""The seed's four metrics by name (a factory each, so the perceptual one gets a fresh extractor)."""


def resolve_metric(metric: str | Metric) -> Metric:
    """A metric by name (one of :data:`METRICS`) or the callable itself."""
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(
                f"`metric` must be one of {', '.join(map(repr, METRICS))} or a callable images -> scores; "
                f"got {metric!r}."
            )
        return METRICS[metric]()
    if not callable(metric):
        raise TypeError(
            f"`metric` must be a name ({', '.join(METRICS)}) or a callable images -> scores; "
            f"got {type(metric).__name__}."
        )
    return metric


def metric_name(metric: str | Metric) -> str:
    """A short name for ``metric``: its string, ``.name`` or ``__name__``, else its class name."""
    if isinstance(metric, str):
        return metric
    return getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__


def metric_order(scores: Tensor, descending: bool = False) -> Tensor:
    """Indices that sort ``scores``: ``(N,)`` by value, ``(N, m)`` lexicographically (column 0 first,
    ties broken by column 1, …), ascending or ``descending``; ties keep the original order.

    Example::

        >>> metric_order(torch.tensor([[0.5, 1.0], [0.1, 0.0], [0.5, 0.2]])).tolist()
        [1, 2, 0]
    """
    if scores.ndim == 1:
        scores = scores.unsqueeze(1)
    if scores.ndim != 2:
        raise ValueError(f"`scores` must be (N,) or (N, m); got shape {tuple(scores.shape)}.")
    order = torch.arange(scores.shape[0], device=scores.device)
    for column in reversed(range(scores.shape[1])):  # stable sorts, least significant key first
        keys = scores[order, column]
        order = order[torch.sort(keys, descending=descending, stable=True).indices]
    return order


def primary_score(scores: Tensor) -> Tensor:
    """The score shown on a heatmap axis: the score itself, or column 0 of a lexicographic key."""
    return scores if scores.ndim == 1 else scores[:, 0]
