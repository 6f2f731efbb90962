"""SegmentationModule and its networks: shapes, the per-image loss, the poly schedule, learning on
the embedded shapes, pretrained-weight loading, and the callbacks on this task."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import LearningRates
from torchmetrics.classification import MulticlassJaccardIndex

from lightning_tricks import (
    BatchSizeScheduler,
    FisherSpectrum,
    GradientFlow,
    MinibatchHeatmap,
    RandomGradient,
)
from lightning_tricks.datamodules import ShapesSegmentationDataModule
from lightning_tricks.models import SegmentationModule, build_segmentation_net
from lightning_tricks.models.nets.dilated_resnet import DilatedResNet
from lightning_tricks.models.segmentation import per_image_cross_entropy

pytestmark = pytest.mark.usefixtures("single_thread")


TINY = dict(num_classes=4, backbone="resnet18", base_width=4)


def tiny_data(**overrides) -> ShapesSegmentationDataModule:
    options = dict(image_size=16, batch_size=4, train_size=16, val_size=8, test_size=8)
    return ShapesSegmentationDataModule(**{**options, **overrides})


@pytest.mark.parametrize("arch", ["pspnet", "fcn", "deeplabv3"])
@pytest.mark.parametrize(("backbone", "aux_loss"), [("resnet18", True), ("resnet50", False)])
def test_networks_map_images_to_full_resolution_logits(arch, backbone, aux_loss):
    torch.manual_seed(0)
    net = build_segmentation_net(arch, 5, in_channels=3, backbone=backbone, base_width=4, aux_loss=aux_loss)
    outputs = net(torch.randn(2, 3, 24, 24))
    assert set(outputs) == ({"out", "aux"} if aux_loss else {"out"})
    assert all(v.shape == (2, 5, 24, 24) for v in outputs.values())
    assert not any(isinstance(m, torch.nn.ReLU) and m.inplace for m in net.modules())


def test_backbone_has_output_stride_8_and_torchvision_parameter_names():
    from torchvision.models import resnet50

    backbone = DilatedResNet(50)
    features = backbone(torch.randn(1, 3, 64, 64))
    assert features["out"].shape == (1, 2048, 8, 8) and features["aux"].shape == (1, 1024, 8, 8)
    reference = {k: v.shape for k, v in resnet50().state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in backbone.state_dict().items()} == reference


def test_pretrained_backbone_loads_from_a_local_file_and_refuses_what_is_missing(tmp_path, monkeypatch):
    from torchvision.models import resnet18

    reference = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = SegmentationModule("pspnet", num_classes=3, backbone="resnet18", backbone_weights=str(path))
    torch.testing.assert_close(model.net.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)

    with pytest.raises(ValueError, match="base_width=64"):
        build_segmentation_net("fcn", 3, backbone="resnet18", base_width=8, backbone_weights=path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(
        FileNotFoundError, match=r"hub.*checkpoints.*resnet18-.*\.pth.*https://download\.pytorch"
    ):
        build_segmentation_net("deeplabv3", 3, backbone="resnet18", backbone_weights="IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_segmentation_net(
            "pspnet", 3, backbone="resnet18", backbone_weights=str(tmp_path / "absent.pth")
        )


def test_loss_is_the_batch_mean_of_each_images_pixel_mean():
    """Brute force: one image at a time, float64, cross-entropy over its labelled pixels only."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, 7, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 5, (4, 6, 7), generator=generator)
    target[0, :3] = 255
    target[1, :, :6] = 255
    target[3] = 255  # no labelled pixel: loss 0
    losses = per_image_cross_entropy(logits, target, 255)
    for i in range(3):
        labelled = target[i] != 255
        log_p = torch.log_softmax(logits[i], dim=0)
        picked = -log_p.gather(0, target[i].clamp(max=4)[None])[0]
        torch.testing.assert_close(losses[i], picked[labelled].mean(), rtol=1e-12, atol=0)
    assert losses[3] == 0
    assert not torch.allclose(losses[:3].mean(), F.cross_entropy(logits, target, ignore_index=255))


def test_compute_loss_adds_the_weighted_auxiliary_loss():
    torch.manual_seed(0)
    model = SegmentationModule("pspnet", aux_weight=0.4, **TINY).eval()
    images, masks = torch.randn(3, 3, 16, 16), torch.randint(0, 4, (3, 16, 16))
    outputs = model.net(images)
    expected = sum(
        w * per_image_cross_entropy(outputs[k], masks, 255).mean() for k, w in (("out", 1), ("aux", 0.4))
    )
    torch.testing.assert_close(model.compute_loss((images, masks)), expected)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_poly_schedule_by_iteration(optimizer, trainer_for):
    recorder = LearningRates()
    model = SegmentationModule("fcn", optimizer=optimizer, lr=0.02, power=0.9, aux_loss=False, **TINY)
    trainer_for([recorder], max_epochs=2, limit_val_batches=0).fit(model, datamodule=tiny_data())
    total = 2 * 4
    assert len(recorder.lrs) == total
    expected = [0.02 * (1 - k / total) ** 0.9 for k in range(total)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-12)
    assert isinstance(
        model.optimizers().optimizer, torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    )


def test_miou_rises_well_above_chance_on_shapes(trainer_for):
    """PSPNet (ResNet-18, width 8) on 64×64 shapes: six epochs take mIoU far above the score of
    predicting the most frequent class (background) everywhere."""
    L.seed_everything(0)
    data = ShapesSegmentationDataModule(
        image_size=64, batch_size=16, train_size=256, val_size=64, test_size=64
    )
    model = SegmentationModule(
        "pspnet", num_classes=4, backbone="resnet18", base_width=8, lr=0.1, weight_decay=1e-4
    )
    trainer = trainer_for(max_epochs=6)
    trainer.fit(model, datamodule=data)
    miou = trainer.callback_metrics["val/miou"].item()
    masks = torch.cat([m for _, m in data.val_dataloader()])
    all_background = MulticlassJaccardIndex(4, average="macro")(torch.zeros_like(masks), masks).item()
    assert all_background < 0.25 and miou > all_background + 0.2, (miou, all_background)
    assert trainer.callback_metrics["val/pixel_acc"] > 0.9


def test_bad_arguments_name_the_argument():
    for kwargs, name in [
        ({"arch": "unet"}, "arch"),
        ({"backbone": "resnet152"}, "backbone"),
        ({"optimizer": "adamw"}, "optimizer"),
        ({"lr": 0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"power": -1}, "power"),
        ({"aux_weight": -0.1}, "aux_weight"),
        ({"ignore_index": 2}, "ignore_index"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            SegmentationModule(**{**TINY, **kwargs})


# ----------------------------------------------------------------------------- callbacks on this task


def assert_finite(values) -> None:
    values = [float(torch.as_tensor(v).detach()) for v in values]
    assert values and all(math.isfinite(v) for v in values), values


def test_random_gradient_scales_the_segmentation_gradient(trainer_for):
    callback = RandomGradient(seed=0)
    model = SegmentationModule("pspnet", **TINY)
    trainer_for([callback], max_steps=3, limit_val_batches=0).fit(model, datamodule=tiny_data())
    assert len(callback.history) == 3 and all(0 <= h["r"] <= 1 for h in callback.history)
    assert_finite(p.sum() for p in model.parameters())


def test_gradient_flow_on_segmentation(trainer_for):
    callback = GradientFlow()
    model = SegmentationModule("deeplabv3", **TINY)
    trainer_for([callback], max_epochs=1, limit_val_batches=0).fit(model, datamodule=tiny_data())
    flow = callback.flows[0]
    matrix = flow.matrix
    assert matrix.shape == (len(flow.layer_names), 1) and matrix.shape[0] > 10
    assert_finite(matrix.ravel())


def test_fisher_spectrum_on_segmentation_treats_an_image_as_a_sample(trainer_for):
    callback = FisherSpectrum()
    model = SegmentationModule("pspnet", **TINY)
    trainer_for([callback], max_steps=2, limit_val_batches=0).fit(model, datamodule=tiny_data())
    assert [record["batch_size"] for record in callback.history] == [4, 4]
    assert_finite(record[key] for record in callback.history for key in ("c_k", "l_k", "trace", "lambda_max"))
    assert all(record["trace"] > 0 for record in callback.history)


def test_batch_size_scheduler_changes_the_datamodules_batch_size(trainer_for):
    scheduler = BatchSizeScheduler(sizes=[4, 8])
    data = tiny_data(train_size=32)
    model = SegmentationModule("fcn", **TINY)
    trainer_for([scheduler], max_epochs=2, limit_val_batches=0).fit(model, datamodule=data)
    assert [record["size"] for record in scheduler.history] == [4, 8] and data.batch_size == 8
    assert_finite(record["lr"] for record in scheduler.history)


@pytest.mark.parametrize("metric", ["intensity", "edges"])
def test_minibatch_heatmap_on_segmentation(trainer_for, metric):
    """The seed-002 heatmap on the segmentation task: the module's compute_loss at the epoch-start
    parameters, batches sorted by an image metric of the scenes."""
    heatmap = MinibatchHeatmap(metric=metric, progress=False)
    model = SegmentationModule("pspnet", **TINY)
    trainer_for([heatmap], max_epochs=2, limit_val_batches=0).fit(model, datamodule=tiny_data())
    assert heatmap.matrix.shape == (2, 4)
    assert_finite(heatmap.matrix.ravel())
    assert (np.diff(heatmap.batch_values) >= 0).all(), "batch ranks follow the metric order"
