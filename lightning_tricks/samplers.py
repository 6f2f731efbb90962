"""Fixed mini-batches of data sorted by an image metric (seed ``002_696f8026b30a9c31.txt`` §3).

The seed fixes the order of the training set by a metric and cuts it into the same mini-batches
every epoch, so that batch ``k`` of every epoch holds the same images and a heatmap row per epoch
can be read against the metric. :func:`score_dataset` scores a dataset once (batched, with a
progress bar); :class:`MetricSortedBatchSampler` forms the batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

from .image_metrics import Metric, metric_order, primary_score

ProgressBar = Callable[[int, str], AbstractContextManager[Any]]
"""``progress(total, description)``: a context manager giving a bar with ``update(n)``."""


def images_of(batch: Any, image_key: int | str = 0) -> Tensor:
    """The images of a collated batch: the batch itself if a tensor, else ``batch[image_key]``
    (``(images, labels)`` tuples and ``{"image": ...}`` dicts alike)."""
    if isinstance(batch, Tensor):
        return batch
    try:
        images = batch[image_key]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(
            f"Cannot find the images in a batch of type {type(batch).__name__} with `image_key`={image_key!r}; "
            "set `image_key` to the position or key of the images."
        ) from error
    if not isinstance(images, Tensor):
        raise ValueError(f"`batch[{image_key!r}]` is a {type(images).__name__}, not an image tensor.")
    return images


def _batches(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable | None,
    image_key: int | str,
    device: Any,
    transform: Callable[[Tensor], Tensor] | None,
) -> Iterator[Tensor]:
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn or default_collate
    )
    for batch in loader:
        images = images_of(batch, image_key).to(device=device, dtype=torch.get_default_dtype())
        yield images if transform is None else transform(images)


@torch.no_grad()
def score_dataset(
    dataset: Dataset,
    metric: Metric,
    *,
    batch_size: int = 256,
    collate_fn: Callable | None = None,
    image_key: int | str = 0,
    device: torch.device | str | None = None,
    progress: bool | ProgressBar = True,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``metric`` of every image of ``dataset``, in dataset order, on the CPU: ``(N,)`` or ``(N, m)``.

    Images are scored ``batch_size`` at a time on ``device``, after ``transform`` (``images ->
    images``, e.g. a datamodule's ``denormalize``, so that the metric sees the images as stored rather
    than standardised; ``None``: as the dataset gives them). A metric with ``needs_reference``
    (:class:`~lightning_tricks.image_metrics.PerceptualDistance`) first gets the dataset's average
    image through ``metric.with_reference`` (a second pass). The torch RNG is forked, so random
    augmentations in the dataset draw without moving the training's random stream. ``progress``: a
    tqdm bar (``True``), none (``False``), or the bar ``progress(total, description)`` makes (e.g. the
    Trainer's, as ``MinibatchHeatmap`` passes it).
    """
    from tqdm.auto import tqdm

    device = torch.device(device or "cpu")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if getattr(metric, "needs_reference", False):
            total, count = None, 0
            for images in _batches(dataset, batch_size, collate_fn, image_key, device, transform):
                summed = images.sum(dim=0)
                total, count = (summed if total is None else total + summed), count + images.shape[0]
            metric = metric.with_reference(total / count)
        scores = []
        name = getattr(metric, "name", None) or getattr(metric, "__name__", "metric")
        description = f"scoring images by {name}"
        if callable(progress):
            bar_context = progress(len(dataset), description)
        else:
            bar_context = tqdm(total=len(dataset), desc=description, disable=not progress)
        with bar_context as bar:
            for images in _batches(dataset, batch_size, collate_fn, image_key, device, transform):
                scores.append(metric(images).detach().to("cpu", torch.float64))
                bar.update(images.shape[0])
    scores = torch.cat(scores)
    if scores.ndim not in (1, 2) or scores.shape[0] != len(dataset):
        raise ValueError(
            f"A metric must return (N,) scores or an (N, m) key per batch of N images; got shape "
            f"{tuple(scores.shape)} for {len(dataset)} images."
        )
    return scores


class MetricSortedBatchSampler(Sampler[list[int]]):
    """The same mini-batches every epoch, cut from the data sorted by a metric (seed
    ``002_696f8026b30a9c31.txt`` §3: "the whole training dataset with fixed order can be divided into
    multiple mini-batches").

    Global batch ``k`` holds the sorted positions ``order[k·B : (k+1)·B]`` with ``B = batch_size ×
    num_replicas``; each of ``num_replicas`` processes takes its contiguous share of it (``rank``), so
    ``K = ⌈N / B⌉`` batches per epoch on every process and the global batch is the one a single
    process with ``batch_size × num_replicas`` would form. ``drop_last`` drops a short last batch
    (a last batch with fewer samples than processes is always dropped, since some process would get
    none). The batch sampler of a ``DataLoader``: ``DataLoader(dataset, batch_sampler=sampler)``.

    Args:
        scores: one score ``(N,)`` or lexicographic key ``(N, m)`` per sample, in dataset order.
        batch_size: samples per batch on each process, ``>= 1``.
        descending: largest scores first.
        drop_last: drop a last batch shorter than ``B``.
        num_replicas: processes sharing each global batch.
        rank: this process's index in ``[0, num_replicas)``.

    Example::

        >>> sampler = MetricSortedBatchSampler(torch.tensor([3.0, 1.0, 2.0, 0.0]), batch_size=2)
        >>> list(sampler), sampler.batch_values.tolist()
        ([[3, 1], [2, 0]], [0.5, 2.5])
    """

    def __init__(
        self,
        scores: Tensor,
        batch_size: int,
        descending: bool = False,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1; got {batch_size!r}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in [0, num_replicas={num_replicas}); got {rank!r}.")
        scores = torch.as_tensor(scores).detach().cpu()
        if scores.ndim not in (1, 2) or scores.shape[0] == 0:
            raise ValueError(
                f"`scores` must be a non-empty (N,) or (N, m) tensor; got {tuple(scores.shape)}."
            )
        self.scores = scores
        self.batch_size, self.descending, self.drop_last = batch_size, descending, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.order = metric_order(scores, descending)
        self.global_batches = self._cut(self.order, batch_size * num_replicas)
        self.batches = [chunk.tensor_split(num_replicas)[rank].tolist() for chunk in self.global_batches]

    def _cut(self, order: Tensor, size: int) -> list[Tensor]:
        chunks = list(order.split(size))
        if chunks and (len(chunks[-1]) < self.num_replicas or (self.drop_last and len(chunks[-1]) < size)):
            chunks.pop()
        return chunks

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(batch) for batch in self.batches])

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def batch_sizes(self) -> list[int]:
        """Samples of each of this process's batches."""
        return [len(batch) for batch in self.batches]

    @property
    def global_batch_sizes(self) -> list[int]:
        """Samples of each global batch (all processes together)."""
        return [len(chunk) for chunk in self.global_batches]

    @property
    def batch_values(self) -> Tensor:
        """Each global batch's mean score (column 0 of a lexicographic key), ``(K,)`` float64."""
        values = primary_score(self.scores).to(torch.float64)
        return torch.stack([values[chunk].mean() for chunk in self.global_batches])

    def fingerprint(self) -> tuple[int, int, int]:
        """``(N, K, hash of the global batches)``: equal for two samplers forming the same batches."""
        flat = torch.cat(self.global_batches) if self.global_batches else torch.empty(0, dtype=torch.long)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.long)
        sizes = torch.tensor(self.global_batch_sizes, dtype=torch.long)
        digest = int((flat * weights).sum()) * 1_000_003 + int(
            (sizes * torch.arange(1, len(sizes) + 1)).sum()
        )
        return len(self.order), len(self.batches), digest


def sorted_loader(loader: DataLoader, sampler: MetricSortedBatchSampler) -> DataLoader:
    """A plain ``DataLoader`` over ``loader``'s dataset, with its collate/worker settings and
    ``sampler`` as its batch sampler (a ``DataLoader`` subclass is not re-created)."""
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, batch_sampler=sampler, **options)
