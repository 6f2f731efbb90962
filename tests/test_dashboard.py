"""The TensorBoard dashboard: custom-scalars layout, tag descriptions and HParams, read back from
the event files and from a TensorBoard server's HTTP data API (loopback only)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.summary_pb2 import SummaryMetadata
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import RandomGradient
from lightning_tricks.callbacks._dashboard import callback_hyperparameters, custom_scalars_layout

pytestmark = pytest.mark.usefixtures("single_thread")

R_TAG = "random_gradient/r"
SERVER_WAIT_S = 15.0


class TinyData(pl.LightningDataModule):
    """A datamodule with its own hyper-parameters, to see them beside the module's."""

    def __init__(self, shuffle_seed: int = 7) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator))
        return DataLoader(data, batch_size=4)

    val_dataloader = train_dataloader


@pytest.fixture
def tensorboard_run(tmp_path, trainer_for, tiny_module, probe_callback) -> Path:
    """Two epochs of four steps with RandomGradient and the probe, logged to TensorBoard."""
    logger = TensorBoardLogger(tmp_path / "logs", name="tb")
    callbacks = [RandomGradient(seed=3), probe_callback("a")]
    trainer = trainer_for(callbacks, logger=logger, max_epochs=2, log_every_n_steps=2)
    trainer.fit(tiny_module(samples=16), datamodule=TinyData())
    return Path(logger.log_dir)


def accumulator(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0, "images": 0})
    events.Reload()
    return events


def layout_of(events: EventAccumulator) -> layout_pb2.Layout:
    (event,) = events.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def test_one_layout_per_run_gathers_every_callback(tensorboard_run, probe_callback):
    layout = layout_of(accumulator(tensorboard_run))
    charts = {
        category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
        for category in layout.category
    }
    assert charts == {
        "RandomGradient": {"r, the loss multiplier of each step": [R_TAG]},
        "ProbeCallback": {"probe value": [probe_callback.TAG]},
    }


def test_described_tags_carry_their_description_and_every_value(tensorboard_run, probe_callback):
    events = accumulator(tensorboard_run)
    assert events.SummaryMetadata(probe_callback.TAG).summary_description == probe_callback.DESCRIPTION
    assert "seed 000 §4" in events.SummaryMetadata(R_TAG).summary_description
    probe = [(e.step, e.value) for e in events.Scalars(probe_callback.TAG)]
    assert probe == [(step, probe_callback.value_at(step)) for step in range(8)], "first value kept"
    assert [e.step for e in events.Scalars(R_TAG)] == [0, 2, 4, 6]


def test_hparams_record_merges_module_data_and_callbacks(tensorboard_run):
    events = accumulator(tensorboard_run)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {
        name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
        for name, value in start.hparams.items()
    }
    assert hparams["lr"] == 0.05 and hparams["samples"] == 16, "the module's"
    assert hparams["shuffle_seed"] == 7, "the datamodule's"
    assert hparams["random_gradient/seed"] == 3 and hparams["random_gradient/schedule"] == "uniform"
    assert hparams["probe/label"] == "a"


def test_layout_and_descriptions_are_written_once_for_a_run_with_two_fits(tmp_path, trainer_for, tiny_module):
    logger = TensorBoardLogger(tmp_path / "logs", name="tb")
    trainer = trainer_for([RandomGradient(seed=0)], logger=logger, max_epochs=1)
    module = tiny_module(samples=8)
    trainer.fit(module)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module)
    assert len(accumulator(Path(logger.log_dir)).Tensors("custom_scalars__config__")) == 1


def test_other_loggers_get_the_callbacks_hyperparameters(tmp_path, trainer_for, tiny_module):
    logger = CSVLogger(tmp_path / "logs", name="csv")
    trainer_for([RandomGradient(seed=5, schedule="constant")], logger=logger).fit(tiny_module(samples=8))
    saved = (Path(logger.log_dir) / "hparams.yaml").read_text()
    assert "random_gradient/seed: 5" in saved and "random_gradient/schedule: constant" in saved


def test_helpers_merge_callbacks_and_reject_a_malformed_layout(probe_callback):
    first, second = probe_callback("a"), probe_callback("b")
    assert callback_hyperparameters([first, second]) == {"probe/label": "a", "probe_1/label": "b"}
    assert custom_scalars_layout([first, second]) == {
        "ProbeCallback": {"probe value": ["Multiline", [probe_callback.TAG]]}
    }
    first.dashboard_layout = lambda: {"chart": "probe/value"}
    with pytest.raises(TypeError, match="dashboard_layout"):
        custom_scalars_layout([first])


def test_description_metadata_matches_tensorboards_scalar_plugin():
    """The first-value metadata is what TensorBoard's data_compat makes of a described simple_value."""
    from tensorboard import data_compat
    from tensorboard.compat.proto.summary_pb2 import Summary

    value = Summary.Value(tag="t", simple_value=1.0, metadata=SummaryMetadata(summary_description="d"))
    migrated = data_compat.migrate_value(value)
    assert migrated.metadata.plugin_data.plugin_name == "scalars"
    assert migrated.metadata.summary_description == "d"


# ---------------------------------------------------------------------------------------------
# A TensorBoard server on a loopback port
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tensorboard_server(tensorboard_run) -> Iterator[str]:
    """``tensorboard --logdir <run>`` on 127.0.0.1, stopped at the end of the test."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        f"--logdir={tensorboard_run.parent}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--load_fast=false",
        "--reload_interval=1",
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def get_json(base: str, route: str, until=lambda body: bool(body)) -> dict:
    """GET ``base + route`` as JSON, retried until the server is up and ``until(body)`` holds."""
    deadline = time.monotonic() + SERVER_WAIT_S
    body: dict = {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + route, timeout=2) as response:
                body = json.load(response)
            if until(body):
                return body
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    pytest.fail(f"TensorBoard did not serve {route} within {SERVER_WAIT_S} s; last answer {body!r}")


def test_tensorboard_serves_scalars_descriptions_layout_figures_and_hparams(
    tensorboard_server, tensorboard_run, probe_callback
):
    run = tensorboard_run.name
    scalars = get_json(
        tensorboard_server, "/data/plugin/scalars/tags", lambda b: probe_callback.TAG in b.get(run, {})
    )
    assert {R_TAG, probe_callback.TAG, "train_loss"} <= set(scalars[run])
    assert probe_callback.DESCRIPTION in scalars[run][probe_callback.TAG]["description"]
    assert "seed 000" in scalars[run][R_TAG]["description"]

    query = urllib.parse.urlencode({"run": run, "tag": probe_callback.TAG})
    series = get_json(tensorboard_server, f"/data/plugin/scalars/scalars?{query}")
    assert [(step, value) for _, step, value in series] == [(s, probe_callback.value_at(s)) for s in range(8)]

    layout = get_json(tensorboard_server, "/data/plugin/custom_scalars/layout")
    titles = {category["title"]: category["chart"] for category in layout["category"]}
    assert titles["RandomGradient"][0]["multiline"]["tag"] == [R_TAG]
    assert titles["ProbeCallback"][0]["multiline"]["tag"] == [probe_callback.TAG]

    images = get_json(tensorboard_server, "/data/plugin/images/tags")
    assert images[run][probe_callback.FIGURE]["samples"] == 1

    request = urllib.parse.urlencode({"request": json.dumps({"experimentName": ""})})
    experiment = get_json(tensorboard_server, f"/data/plugin/hparams/experiment?{request}")
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert {"lr", "shuffle_seed", "random_gradient/seed", "probe/label"} <= names
