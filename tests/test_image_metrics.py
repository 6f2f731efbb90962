"""Image metrics (seed 002 §3.2) and metric-sorted fixed batches, against direct computations."""

from __future__ import annotations

import colorsys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.image_metrics import (
    PerceptualDistance,
    color,
    edges,
    intensity,
    metric_order,
    perceptual,
    pretrained_alexnet_features,
    resolve_metric,
)
from lightning_tricks.samplers import MetricSortedBatchSampler, score_dataset, sorted_loader

SIDE = 16


pytestmark = pytest.mark.usefixtures("single_thread")


def hand_made(channels: int = 3) -> torch.Tensor:
    """A black, a white and a vertically striped (4-pixel black/white bands) image."""
    black = torch.zeros(channels, SIDE, SIDE)
    white = torch.ones(channels, SIDE, SIDE)
    striped = torch.zeros(channels, SIDE, SIDE)
    for start in range(4, SIDE, 8):
        striped[:, :, start : start + 4] = 1.0
    return torch.stack([black, white, striped])


@pytest.mark.parametrize("channels", [1, 3])
def test_intensity_is_the_sum_of_all_channels_and_pixels(channels):
    images = hand_made(channels)
    white_pixels = SIDE * SIDE * channels
    assert intensity(images).tolist() == [0.0, float(white_pixels), white_pixels / 2]
    random = torch.rand(3, channels, 5, 7, dtype=torch.float64)
    direct = [sum(float(v) for v in image.flatten()) for image in random]
    assert intensity(random).tolist() == pytest.approx(direct, rel=1e-12)


def test_color_is_the_mean_colour_in_hsv_as_colorsys_computes_it():
    images = hand_made(3)
    expected = [
        colorsys.rgb_to_hsv(0, 0, 0),
        colorsys.rgb_to_hsv(1, 1, 1),
        colorsys.rgb_to_hsv(0.5, 0.5, 0.5),
    ]
    assert color(images).flatten().tolist() == pytest.approx([v for e in expected for v in e], abs=1e-7)
    generator = torch.Generator().manual_seed(0)
    random = torch.rand(64, 3, 4, 4, generator=generator, dtype=torch.float64)
    random[:4] = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float64)[
        :, :, None, None
    ]
    ours = color(random)
    for image, hsv in zip(random, ours):
        r, g, b = image.mean(dim=(1, 2)).tolist()
        assert hsv.tolist() == pytest.approx(list(colorsys.rgb_to_hsv(r, g, b)), abs=1e-12)


def test_color_reads_one_channel_as_grey_and_clamps_to_unit_range():
    grey = torch.full((1, 1, 2, 2), 0.25)
    assert color(grey)[0].tolist() == pytest.approx([0.0, 0.0, 0.25])
    assert color(torch.full((1, 3, 2, 2), 2.0))[0].tolist() == pytest.approx([0.0, 0.0, 1.0])


@pytest.mark.parametrize("channels", [1, 3])
def test_edges_counts_one_pixel_per_row_per_stripe_boundary(channels):
    """Canny thins each black/white boundary to a one-pixel line: 3 interior boundaries × 16 rows."""
    counts = edges(hand_made(channels))
    boundaries = 3
    assert counts.tolist() == [0.0, 0.0, float(boundaries * SIDE)]


def tiny_extractor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2), nn.ReLU())


@torch.no_grad()
def test_perceptual_distance_matches_a_direct_lpips_computation():
    extractor = tiny_extractor()
    images = torch.rand(6, 3, 12, 12, dtype=torch.float64)
    extractor = extractor.double()
    reference = images.mean(dim=0)
    taps = [extractor[:2], extractor]  # two layers: after the first ReLU and after the second

    def layered(x):
        return [tap(x) for tap in taps]

    ours = perceptual(images, extractor=layered)
    for image, score in zip(images, ours):
        total = 0.0
        for tap in taps:
            a, b = tap(image[None])[0], tap(reference[None])[0]
            for h in range(a.shape[1]):
                for w in range(a.shape[2]):
                    na = a[:, h, w] / (a[:, h, w].norm() + 1e-10)
                    nb = b[:, h, w] / (b[:, h, w].norm() + 1e-10)
                    total += float(((na - nb) ** 2).sum()) / (a.shape[1] * a.shape[2])
        assert float(score) == pytest.approx(total, rel=1e-9)


def test_perceptual_distance_of_the_reference_to_itself_is_zero():
    metric = PerceptualDistance(extractor=tiny_extractor()).with_reference(torch.ones(3, 8, 8))
    scores = metric(torch.stack([torch.ones(3, 8, 8), torch.rand(3, 8, 8)]))
    assert abs(float(scores[0])) < 1e-10 and scores[1] > 1e-3


def test_default_extractor_without_local_weights_says_how_to_provide_them(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="extractor=") as error:
        pretrained_alexnet_features()
    assert str(tmp_path / "checkpoints") in str(error.value)


def test_metric_order_is_lexicographic_and_stable():
    keys = torch.tensor(
        [[0.5, 0.1, 0.0], [0.1, 0.9, 0.3], [0.5, 0.1, -1.0], [0.1, 0.2, 0.0], [0.5, 0.1, 0.0]]
    )
    expected = sorted(range(len(keys)), key=lambda i: tuple(keys[i].tolist()))
    assert metric_order(keys).tolist() == expected
    descending = sorted(range(len(keys)), key=lambda i: tuple(keys[i].tolist()), reverse=True)
    ours = metric_order(keys, descending=True).tolist()
    assert [tuple(keys[i].tolist()) for i in ours] == [tuple(keys[i].tolist()) for i in descending]


def test_unknown_metric_names_the_choices():
    with pytest.raises(ValueError, match="'intensity'.*'perceptual'.*got 'hue'"):
        resolve_metric("hue")
    with pytest.raises(TypeError, match="metric"):
        resolve_metric(3)


def test_score_dataset_batches_match_one_pass_and_leave_the_rng_alone():
    images = torch.rand(37, 3, 8, 8)
    dataset = TensorDataset(images, torch.zeros(37))
    state = torch.get_rng_state()
    scores = score_dataset(dataset, intensity, batch_size=5, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.allclose(scores, intensity(images).double())


def test_score_dataset_reports_progress_to_the_bar_it_is_given():
    """``progress=`` a bar factory (e.g. the Trainer's): one bar of the dataset's length, titled by
    the metric, advanced by each scored batch to the end, closed after."""
    bars = []

    class Bar:
        def __init__(self, total, description):
            self.total, self.description, self.updates, self.closed = total, description, [], False
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.closed = True

        def update(self, n):
            self.updates.append(n)

    score_dataset(TensorDataset(torch.rand(37, 3, 8, 8)), intensity, batch_size=5, progress=Bar)
    assert [(bar.total, bar.description, bar.updates, bar.closed) for bar in bars] == [
        (37, "scoring images by intensity", [5] * 7 + [2], True)
    ]


def test_score_dataset_gives_the_perceptual_metric_the_dataset_average_image():
    images = torch.rand(20, 3, 8, 8, dtype=torch.float32)
    metric = PerceptualDistance(extractor=tiny_extractor())
    scores = score_dataset(TensorDataset(images), metric, batch_size=6, progress=False)
    direct = perceptual(images, reference=images.mean(dim=0), extractor=tiny_extractor())
    assert torch.allclose(scores, direct.double(), rtol=1e-5, atol=1e-7)


def test_sorted_batches_are_the_same_every_epoch_and_follow_the_metric():
    scores = torch.tensor([5.0, 3.0, 9.0, 1.0, 7.0, 2.0, 8.0])
    sampler = MetricSortedBatchSampler(scores, batch_size=3)
    assert list(sampler) == [[3, 5, 1], [0, 4, 6], [2]] == list(sampler)
    assert sampler.batch_values.tolist() == pytest.approx([2.0, 20 / 3, 9.0])
    assert list(MetricSortedBatchSampler(scores, 3, descending=True)) == [[2, 6, 4], [0, 1, 5], [3]]
    assert list(MetricSortedBatchSampler(scores, 3, drop_last=True)) == [[3, 5, 1], [0, 4, 6]]
    loader = sorted_loader(DataLoader(TensorDataset(scores), batch_size=3, shuffle=True), sampler)
    assert [batch[0].tolist() for batch in loader] == [[1.0, 2.0, 3.0], [5.0, 7.0, 8.0], [9.0]]


def test_processes_share_each_global_batch():
    scores = torch.arange(11.0).flip(0)
    single = MetricSortedBatchSampler(scores, batch_size=4)
    ranks = [MetricSortedBatchSampler(scores, 2, num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 3
    for k, batch in enumerate(single):
        assert ranks[0].batches[k] + ranks[1].batches[k] == batch
    assert ranks[0].fingerprint() == ranks[1].fingerprint() == single.fingerprint()
    # a last global batch smaller than the number of processes is dropped (a process would get none)
    assert len(MetricSortedBatchSampler(torch.arange(9.0), 4, num_replicas=2, rank=1)) == 1  # 8 + 1
    assert len(MetricSortedBatchSampler(torch.arange(10.0), 4, num_replicas=2, rank=1)) == 2  # 8 + 2


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        MetricSortedBatchSampler(torch.ones(3), 0)
    with pytest.raises(ValueError, match="rank"):
        MetricSortedBatchSampler(torch.ones(3), 1, num_replicas=2, rank=2)


def test_score_dataset_scores_the_transformed_images():
    """With ``transform`` (a datamodule's ``denormalize``) the metric sees the images as stored: colour
    of standardised tensors, undone, equals colorsys on the raw mean colours."""
    generator = torch.Generator().manual_seed(1)
    raw = torch.rand(10, 3, 4, 4, generator=generator)
    mean, std = torch.tensor([0.4, 0.5, 0.6])[:, None, None], torch.tensor([0.2, 0.3, 0.25])[:, None, None]
    data = TensorDataset((raw - mean) / std, torch.zeros(10))
    scores = score_dataset(data, color, batch_size=4, progress=False, transform=lambda x: x * std + mean)
    expected = [colorsys.rgb_to_hsv(*image.double().mean(dim=(1, 2)).tolist()) for image in raw]
    assert scores.tolist() == [pytest.approx(list(hsv), abs=1e-5) for hsv in expected]
    as_given = score_dataset(data, color, batch_size=4, progress=False)
    assert not torch.allclose(as_given, scores), "standardised tensors give other colours"
