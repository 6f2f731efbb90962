"""The TensorBoard dashboard: custom-scalars layout, tag descriptions and HParams, read back from
the event files and from the HTTP data API of the ``lightning-tricks dashboard`` server (loopback only)."""

from __future__ import annotations

import json
import math
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.summary_pb2 import SummaryMetadata
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import BatchSizeScheduler, FisherSpectrum, GradientFlow, RandomGradient
from lightning_tricks.callbacks._dashboard import callback_hyperparameters, custom_scalars_layout

pytestmark = pytest.mark.usefixtures("single_thread")

R_TAG = "random_gradient/r"
SERVER_WAIT_S = 15.0
SERVER_START_S = 90.0
OUTCOME_METRICS = ["test_loss", "val_loss", "fisher/C_bar", "fisher/L"]
"""What the HParams tab must offer for ``tensorboard_run``: the module's validation loss, its test
twin, FisherSpectrum's final C̄_K and L_K."""


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
    """Two epochs of four steps with FisherSpectrum, RandomGradient and the probe, logged to
    TensorBoard; the module logs ``train_loss`` and ``val_loss``."""
    logger = TensorBoardLogger(tmp_path / "logs", name="tb")
    callbacks = [FisherSpectrum(every_n_steps=2), RandomGradient(seed=3), probe_callback("a")]
    trainer = trainer_for(callbacks, logger=logger, max_epochs=2, log_every_n_steps=2)
    trainer.fit(cli_module(tiny_module), datamodule=TinyData())
    return Path(logger.log_dir)


def cli_module(tiny_module) -> pl.LightningModule:
    """The tiny module built as LightningCLI builds one: its hparams carry ``_class_path`` and
    ``_instantiator``."""
    given = {"samples": 16, "batch_size": 4, "lr": 0.05, "_class_path": "tests.TinyRegression"}
    with _given_hyperparameters_context(given, "lightning.pytorch.cli.instantiate_module"):
        return tiny_module(samples=16)


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
    assert list(charts) == ["model", "FisherSpectrum", "RandomGradient", "ProbeCallback"]
    assert charts["RandomGradient"] == {"r, the loss multiplier of each step": [R_TAG]}
    assert charts["ProbeCallback"] == {"probe value": [probe_callback.TAG]}


def test_described_tags_carry_their_description_and_every_value(tensorboard_run, probe_callback):
    events = accumulator(tensorboard_run)
    assert events.SummaryMetadata(probe_callback.TAG).summary_description == probe_callback.DESCRIPTION
    assert "seed 000 §4" in events.SummaryMetadata(R_TAG).summary_description
    probe = [(e.step, e.value) for e in events.Scalars(probe_callback.TAG)]
    assert probe == [(step, probe_callback.value_at(step)) for step in range(8)], "first value kept"
    assert [e.step for e in events.Scalars(R_TAG)] == [0, 2, 4, 6]


def test_hparams_record_merges_module_data_and_callbacks(tensorboard_run):
    events = accumulator(tensorboard_run)
    start = hparams_records(events)["session_start_info"].session_start_info
    hparams = {
        name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
        for name, value in start.hparams.items()
    }
    assert hparams["lr"] == 0.05 and hparams["samples"] == 16, "the module's"
    assert hparams["shuffle_seed"] == 7, "the datamodule's"
    assert hparams["random_gradient/seed"] == 3 and hparams["random_gradient/schedule"] == "uniform"
    assert hparams["probe/label"] == "a"


def hparams_records(events: EventAccumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    """``{"experiment" | "session_start_info" | "session_end_info": record}``, the first of each
    in the run (the one TensorBoard reads)."""
    return {
        tag.removeprefix("_hparams_/"): plugin_data_pb2.HParamsPluginData.FromString(content)
        for tag, content in events.PluginTagToContent("hparams").items()
    }


def test_hparams_register_outcome_metrics_and_no_internal_columns(tensorboard_run):
    """Issue 20 finding 5: the metric columns were Lightning's placeholder ``hp_metric = -1`` and
    LightningCLI's ``_instantiator`` was a column."""
    events = accumulator(tensorboard_run)
    records = hparams_records(events)
    experiment, start = records["experiment"].experiment, records["session_start_info"].session_start_info
    assert [info.name.tag for info in experiment.metric_infos] == OUTCOME_METRICS
    hparams = {info.name for info in experiment.hparam_infos}
    assert hparams == set(start.hparams), "one column per session value"
    assert {"lr", "samples", "shuffle_seed", "fisher/every_n_steps", "random_gradient/seed"} <= hparams
    assert not [name for name in hparams if name.startswith("_") or "/_" in name]
    assert records["session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS
    assert "hp_metric" not in events.Tags()["scalars"], "no placeholder"
    assert {"val_loss", "fisher/C_bar", "fisher/L"} <= set(events.Tags()["scalars"]), "columns with values"


class Failing(pl.Callback):
    """Raises after the third training step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            raise RuntimeError("failing on purpose")


def test_a_failed_fit_still_registers_its_metrics_and_ends_as_failed(tmp_path, trainer_for, tiny_module):
    logger = TensorBoardLogger(tmp_path / "logs", name="tb")
    trainer = trainer_for([FisherSpectrum(every_n_steps=1), Failing()], logger=logger)
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer.fit(tiny_module(samples=16))
    records = hparams_records(accumulator(Path(logger.log_dir)))
    metrics = [info.name.tag for info in records["experiment"].experiment.metric_infos]
    assert metrics == ["fisher/C_bar", "fisher/L"]
    assert records["session_end_info"].session_end_info.status == api_pb2.STATUS_FAILURE


def layout_tags(layout: dict) -> set[str]:
    return {tag for charts in layout.values() for _, tags in charts.values() for tag in tags}


def chart_matches(patterns: list[str], tags) -> list[str]:
    """The tags a Custom Scalars chart draws: TensorBoard's ``re.match`` of each pattern."""
    return [tag for tag in tags if any(re.match(pattern, tag) for pattern in patterns)]


def test_layout_has_charts_only_for_what_is_attached_and_configured():
    """Issue 20 finding 6: a staged schedule had an always-empty adaptive-policy chart, and the
    model's own curves were missing."""
    staged = custom_scalars_layout([BatchSizeScheduler.staged([4, 8])])
    adaptive = custom_scalars_layout([BatchSizeScheduler.noise_adaptive(max_size=64)])
    fisher = custom_scalars_layout([FisherSpectrum()])
    assert "batch_size/noise_scale" not in layout_tags(staged)
    assert "batch_size/noise_scale" in layout_tags(adaptive)
    assert list(fisher) == ["model", "FisherSpectrum"]
    assert not [tag for tag in layout_tags(fisher) if tag.startswith("batch_size/")]
    (_, norms) = custom_scalars_layout([GradientFlow()])["GradientFlow"]["Gradient flow: norms"]
    logged = ["grad_flow/global_norm", "grad_flow/opt1/global_norm", "grad_flow/opt1/l2"]
    assert chart_matches(norms, logged) == logged[:2], "several optimisers (pix2pix) add opt<i>/"
    model = {title: tags for title, (_, tags) in staged["model"].items()}
    logged = ["train_loss", "train/loss", "train/loss_d", "train/loss_g_l1", "val_loss", "val/loss"]
    logged += ["val/acc", "val/acc_top5", "val/miou", "lr"]
    assert chart_matches(model["training loss"], logged) == ["train_loss", "train/loss", "train/loss_d"]
    assert chart_matches(model["validation loss"], logged) == ["val_loss", "val/loss"]
    assert chart_matches(model["validation accuracy"], logged) == ["val/acc", "val/acc_top5", "val/miou"]


def test_no_chart_mixes_scales_on_a_real_fit(tmp_path, trainer_for, tiny_module):
    """Issue 20 finding 6: charts put B_noise beside |G|² (and L_K beside l_k, a rank beside log10
    values) on one linear axis. Targets far from the predictions make |G|² hundreds of times B_noise."""
    logger = TensorBoardLogger(tmp_path / "logs", name="tb")
    callbacks = [
        FisherSpectrum(every_n_steps=2),
        BatchSizeScheduler.staged([2, 4]),
        GradientFlow(log_every_n_steps=1),
        RandomGradient(seed=3),
    ]
    module = tiny_module(samples=16, lr=1e-4)
    inputs, targets = module.data.tensors
    module.data = TensorDataset(inputs, targets + 100.0)
    trainer_for(callbacks, logger=logger, max_epochs=2, log_every_n_steps=1).fit(module)
    events = accumulator(Path(logger.log_dir))
    scale = {
        tag: max((abs(e.value) for e in events.Scalars(tag) if math.isfinite(e.value)), default=0.0)
        for tag in events.Tags()["scalars"]
    }
    apart = {
        frozenset((a, b))
        for a, b in combinations(scale, 2)
        if 0 < min(scale[a], scale[b]) and min(scale[a], scale[b]) * 100 < max(scale[a], scale[b])
    }
    assert frozenset(("fisher/noise_scale", "fisher/grad_sq_norm")) in apart, scale
    layout = layout_of(events)
    assert layout.category[0].title == "model"
    for category in layout.category:
        for chart in category.chart:
            drawn = chart_matches(list(chart.multiline.tag), scale)
            assert drawn or category.title == "model", f"{chart.title!r} draws nothing"
            mixed = [pair for pair in combinations(drawn, 2) if frozenset(pair) in apart]
            assert not mixed, f"{chart.title!r} mixes {[(a, scale[a], b, scale[b]) for a, b in mixed]}"
    model = {c.title: chart_matches(list(c.multiline.tag), scale) for c in layout.category[0].chart}
    assert model["training loss"] == ["train_loss"] and model["validation loss"] == ["val_loss"]


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
    layout = custom_scalars_layout([first, second])
    assert list(layout) == ["model", "ProbeCallback"]
    assert layout["ProbeCallback"] == {"probe value": ["Multiline", [probe_callback.TAG]]}
    assert custom_scalars_layout([]) == {}, "no callback charts, no layout"
    first.dashboard_layout = lambda: {"chart": "probe/value"}
    with pytest.raises(TypeError, match="dashboard_layout"):
        custom_scalars_layout([first])


def test_dashboard_command_checks_its_arguments_and_keeps_descriptions(tmp_path, capsys):
    from lightning_tricks.cli import main
    from lightning_tricks.dashboard import tensorboard_flags

    with pytest.raises(SystemExit) as exited:
        main(["dashboard", str(tmp_path / "missing")])
    assert exited.value.code == 2 and "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dashboard", str(tmp_path), "--port", "70000"])
    assert "--port must be in [0, 65535]" in capsys.readouterr().err
    assert "--load_fast=false" in tensorboard_flags(str(tmp_path)), "the fast loader drops descriptions"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "lightning-tricks dashboard LOGDIR" in " ".join(capsys.readouterr().out.split())


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


def read_address(server: subprocess.Popen, timeout: float) -> str:
    """The ``http://...`` address the dashboard prints on its stdout, read within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline and server.poll() is None:
        ready, _, _ = select.select([server.stdout], [], [], 0.5)
        if ready:
            lines.append(server.stdout.readline())
            found = re.search(r"http://\S+", lines[-1])
            if found:
                return found.group(0).rstrip("/")
    pytest.fail(f"the dashboard printed no address within {timeout} s (exit code {server.poll()}): {lines!r}")


@pytest.fixture
def tensorboard_server(tensorboard_run) -> Iterator[str]:
    """``lightning-tricks dashboard <logs> --port 0`` (a free loopback port), stopped at the end of
    the test; its address as printed. No TensorBoard flag is passed: the command must bring them."""
    command = [
        sys.executable,
        "-c",
        "import sys; from lightning_tricks.cli import main; sys.exit(main(sys.argv[1:]))",
        "dashboard",
        str(tensorboard_run.parent),
        "--port=0",
        "--host=127.0.0.1",
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = read_address(server, SERVER_START_S)
        assert address.startswith("http://127.0.0.1:")
        yield address
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        server.stdout.close()


def get_json(base: str, route: str, until=lambda body: bool(body), body: dict | None = None) -> dict:
    """GET ``base + route`` (POST ``body`` as JSON if given) as JSON, retried until the server is up
    and ``until(answer)`` holds."""
    deadline = time.monotonic() + SERVER_WAIT_S
    data = None if body is None else json.dumps(body).encode()
    answer: dict = {}
    while time.monotonic() < deadline:
        try:
            headers = {"Content-Type": "application/json"}
            request = urllib.request.Request(base + route, data=data, headers=headers)
            with urllib.request.urlopen(request, timeout=2) as response:
                answer = json.load(response)
            if until(answer):
                return answer
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    pytest.fail(f"TensorBoard did not serve {route} within {SERVER_WAIT_S} s; last answer {answer!r}")


def test_dashboard_serves_descriptions_layout_figures_and_hparams(
    tensorboard_server, tensorboard_run, probe_callback
):
    """Issue 20 finding 1: the README's plain ``tensorboard --logdir logs`` served no description;
    ``lightning-tricks dashboard`` brings the loader that does. Finding 5: the metric columns."""
    run = tensorboard_run.name
    scalars = get_json(
        tensorboard_server, "/data/plugin/scalars/tags", lambda b: probe_callback.TAG in b.get(run, {})
    )
    assert {R_TAG, probe_callback.TAG, "train_loss", "fisher/C_bar"} <= set(scalars[run])
    assert probe_callback.DESCRIPTION in scalars[run][probe_callback.TAG]["description"]
    assert "seed 000" in scalars[run][R_TAG]["description"]
    assert "seed 004 eq. 7" in scalars[run]["fisher/C_bar"]["description"]

    query = urllib.parse.urlencode({"run": run, "tag": probe_callback.TAG})
    series = get_json(tensorboard_server, f"/data/plugin/scalars/scalars?{query}")
    assert [(step, value) for _, step, value in series] == [(s, probe_callback.value_at(s)) for s in range(8)]

    layout = get_json(tensorboard_server, "/data/plugin/custom_scalars/layout")
    titles = {category["title"]: category["chart"] for category in layout["category"]}
    assert list(titles) == ["model", "FisherSpectrum", "RandomGradient", "ProbeCallback"]
    assert titles["RandomGradient"][0]["multiline"]["tag"] == [R_TAG]
    assert titles["ProbeCallback"][0]["multiline"]["tag"] == [probe_callback.TAG]

    images = get_json(tensorboard_server, "/data/plugin/images/tags")
    assert images[run][probe_callback.FIGURE]["samples"] == 1

    request = urllib.parse.urlencode({"request": json.dumps({"experimentName": ""})})
    experiment = get_json(tensorboard_server, f"/data/plugin/hparams/experiment?{request}")
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert {"lr", "shuffle_seed", "random_gradient/seed", "probe/label", "fisher/every_n_steps"} <= names
    assert not [name for name in names if name.startswith("_")]
    assert [info["name"]["tag"] for info in experiment["metricInfos"]] == OUTCOME_METRICS

    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    query = {"experimentName": "", "allowedStatuses": statuses, "startIndex": 0, "sliceSize": 10}
    groups = get_json(tensorboard_server, "/data/plugin/hparams/session_groups", body=query)["sessionGroups"]
    (session,) = [s for group in groups for s in group["sessions"]]
    assert session["status"] == "STATUS_SUCCESS"
    values = {metric["name"]["tag"]: metric["value"] for metric in session["metricValues"]}
    events = accumulator(tensorboard_run)
    final = {tag: events.Scalars(tag)[-1].value for tag in ("val_loss", "fisher/C_bar", "fisher/L")}
    assert values == pytest.approx(final), "each column holds the metric's last value"
