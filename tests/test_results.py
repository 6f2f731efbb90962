"""Reading run folders back: generic CSV/NPY readers, the per-callback files, and resumed runs."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_tricks import (
    BatchSizeScheduler,
    FisherSpectrum,
    GradientFlow,
    MinibatchHeatmap,
    RandomGradient,
)
from lightning_tricks.callbacks._base import RUN_FILE, run_directory
from lightning_tricks.plotting import plot_gradient_flow
from lightning_tricks.results import (
    fisher_columns,
    load_batch_size,
    load_fisher_history,
    load_fisher_spectrum,
    load_gradient_flow,
    load_minibatch_heatmap,
    load_random_gradient,
    load_run,
    load_scalars,
    read_array,
    read_table,
    run_chain,
    scalar_series,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_run_file(run_dir: Path, namespace: str, resumed_from: str | None) -> None:
    entry = {"class": "X", "hyperparameters": {}}
    if resumed_from is not None:
        entry["resumed_from"] = resumed_from
    write(run_dir / RUN_FILE, json.dumps({"callbacks": {namespace: entry}}))


def test_read_table_parses_numbers_and_keeps_text(tmp_path):
    path = write(tmp_path / "t.csv", "step,name,value,empty\n3,conv1,0.25,\n\n4,fc,nan,\n")  # a blank line
    rows = read_table(path)
    assert rows[0] == {"step": 3, "name": "conv1", "value": 0.25, "empty": None}
    assert rows[1]["step"] == 4 and math.isnan(rows[1]["value"])


def test_read_array_round_trips_and_refuses_pickles(tmp_path):
    array = np.arange(6.0).reshape(2, 3)
    np.save(tmp_path / "a.npy", array)
    np.testing.assert_array_equal(read_array(tmp_path / "a.npy"), array)
    np.save(tmp_path / "o.npy", np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError):
        read_array(tmp_path / "o.npy")


def test_a_resumed_random_gradient_run_reads_back_as_the_uninterrupted_one(
    tmp_path, trainer_for, tiny_module
):
    full = RandomGradient(seed=4)
    trainer_for([full], max_epochs=2, default_root_dir=tmp_path / "full").fit(tiny_module(samples=12))

    first = RandomGradient(seed=4)
    trainer = trainer_for([first], max_epochs=1)
    trainer.fit(tiny_module(samples=12))
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = RandomGradient(seed=4)
    second = trainer_for([resumed], max_epochs=2)
    second.fit(tiny_module(samples=12), ckpt_path=tmp_path / "epoch1.ckpt")

    earlier, later = Path(run_directory(trainer)), Path(run_directory(second))
    assert earlier != later and run_chain(later) == [earlier, later]
    assert load_random_gradient(later) == full.history
    assert load_random_gradient(later, follow_resumes=False) == resumed.history
    everything = load_run(later)
    assert everything["random_gradient"] == full.history and everything["folders"] == [earlier, later]
    assert everything["callbacks"]["random_gradient"]["resumed_from"] == str(earlier)


def mse_loss(module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(module.net(x), y)


def test_resumed_fisher_and_batch_size_runs_read_back_as_the_uninterrupted_one(
    tmp_path, trainer_for, tiny_module
):
    """Checkpoints hold no history: the full series comes back from the chain of run folders."""

    def callbacks() -> list:
        return [FisherSpectrum(every_n_steps=2), BatchSizeScheduler(schedule={0: 4, 1: 2}), GradientFlow()]

    full = callbacks()
    trainer_for(full, max_epochs=2, default_root_dir=tmp_path / "full").fit(tiny_module(samples=16))

    first = trainer_for(callbacks(), max_epochs=1)
    first.fit(tiny_module(samples=16))
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    second = trainer_for(resumed := callbacks(), max_epochs=2)
    second.fit(tiny_module(samples=16), ckpt_path=tmp_path / "epoch1.ckpt")

    later = Path(run_directory(second))
    history = load_fisher_history(later)
    assert [row["step"] for row in history] == [row["step"] for row in full[0].history] == [0, 2, 4, 6, 8, 10]
    for ours, reference in zip(history, full[0].history):
        assert ours["L"] == pytest.approx(reference["L"], rel=1e-12)
    assert [row["epoch"] for row in load_fisher_spectrum(later)] == [0, 1]
    assert (
        [row["size"] for row in load_batch_size(later)] == [row["size"] for row in full[1].history] == [4, 2]
    )
    assert resumed[0].history == full[0].history[2:]
    flow = load_gradient_flow(later)
    assert flow.epochs == [0, 1] and flow.layer_names == full[2].flows[0].layer_names
    np.testing.assert_array_equal(flow.matrix, full[2].flows[0].matrix)


def test_minibatch_heatmap_reads_back(tmp_path, trainer_for, tiny_module):
    heatmap = MinibatchHeatmap(metric=lambda features: features.sum(dim=1), loss_fn=mse_loss, progress=False)
    trainer = trainer_for([heatmap], max_epochs=2)
    trainer.fit(tiny_module(samples=16))
    folder = run_directory(trainer)
    records = load_minibatch_heatmap(folder)
    assert load_run(folder)["heatmap"] == records
    assert [(row["epoch"], row["batch"]) for row in records] == [(e, k) for e in (0, 1) for k in range(4)]
    assert [row["distance"] for row in records] == pytest.approx(
        [r["distance"] for r in heatmap.history], rel=1e-12
    )


def test_rows_a_resumed_fit_redid_are_taken_from_the_later_folder(tmp_path):
    """The first fit ran to step 5 but was resumed from the checkpoint of step 3."""
    first, second = tmp_path / "logs" / "version_0", tmp_path / "logs" / "version_1"
    write(first / "random_gradient.csv", "step,backward,r\n" + "".join(f"{s},{s},0.{s}\n" for s in range(6)))
    write(second / "random_gradient.csv", "step,backward,r\n3,3,0.9\n4,4,0.9\n")
    write_run_file(first, "random_gradient", None)
    write_run_file(second, "random_gradient", "logs/version_0")  # relative to another directory
    records = load_random_gradient(second)
    assert [(row["step"], row["r"]) for row in records] == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.9), (4, 0.9)]


def test_a_missing_earlier_folder_names_the_path_and_the_way_out(tmp_path):
    run = tmp_path / "version_1"
    write(run / "random_gradient.csv", "step,backward,r\n0,0,0.5\n")
    write_run_file(run, "random_gradient", str(tmp_path / "elsewhere" / "version_0"))
    with pytest.raises(FileNotFoundError, match="follow_resumes=False"):
        load_random_gradient(run)
    assert load_random_gradient(run, follow_resumes=False) == [{"step": 0, "backward": 0, "r": 0.5}]
    with pytest.raises(FileNotFoundError, match="run_dir"):
        run_chain(tmp_path / "nowhere")


def test_gradient_flow_joins_epochs_and_layers_across_resumes_and_feeds_the_plot(tmp_path):
    """The format of GradientFlow's ``grad_flow.csv``: one row (epoch, optimizer, layer, mean_abs)."""
    first, second = tmp_path / "version_0", tmp_path / "version_1"
    header = "epoch,optimizer,layer,mean_abs\n"
    write(
        first / "grad_flow.csv", header + "0,0,conv1,1e-3\n0,0,fc,0.5\n1,0,conv1,2e-3\n1,0,fc,0.25\n0,1,d,7\n"
    )
    write(
        second / "grad_flow.csv",
        header + "1,0,conv1,3e-3\n1,0,fc,0.5\n1,0,head,1.0\n2,0,conv1,4e-3\n2,0,fc,0.5\n2,0,head,2.0\n",
    )
    write_run_file(second, "grad_flow", str(first))
    table = load_gradient_flow(second)
    assert table.layer_names == ["conv1", "fc", "head"] and table.epochs == [0, 1, 2]
    np.testing.assert_array_equal(table.matrix, [[1e-3, 3e-3, 4e-3], [0.5, 0.5, 0.5], [math.nan, 1.0, 2.0]])
    assert plot_gradient_flow(*table).axes, "the table feeds the plot"
    assert load_gradient_flow(first, optimizer=1).layer_names == ["d"]
    with pytest.raises(FileNotFoundError, match="optimizer 2"):
        load_gradient_flow(second, optimizer=2)


def test_fisher_history_concatenates_by_step_and_gives_columns(tmp_path):
    """The format of FisherSpectrum's ``fisher_spectrum.csv``: epoch, step, C_bar, L, lr, batch_size."""
    first, second = tmp_path / "a" / "version_0", tmp_path / "b" / "version_0"
    header = "epoch,step,C_bar,L,lr,batch_size\n"
    write(first / "fisher_spectrum.csv", header + "0,9,2.0,0.5,0.1,32\n1,19,2.5,1.0,0.1,32\n")
    write(second / "fisher_spectrum.csv", header + "1,19,2.4,1.1,0.1,64\n2,29,2.6,1.5,0.05,64\n")
    write_run_file(second, "fisher", str(first))
    records = load_fisher_spectrum(second)
    assert [(r["epoch"], r["batch_size"]) for r in records] == [(0, 32), (1, 64), (2, 64)]
    columns = fisher_columns(records)
    np.testing.assert_array_equal(columns["L"], [0.5, 1.1, 1.5])
    assert set(load_run(second)) == {"folders", "callbacks", "fisher_spectrum"}


def test_as_frame_gives_a_dataframe_when_pandas_is_installed(tmp_path):
    pandas = pytest.importorskip("pandas")
    write(tmp_path / "random_gradient.csv", "step,backward,r\n0,0,0.5\n0,1,0.25\n")
    frame = load_random_gradient(tmp_path, as_frame=True)
    assert isinstance(frame, pandas.DataFrame) and frame["r"].tolist() == [0.5, 0.25]


def test_a_moved_tree_is_followed_by_folder_name(tmp_path):
    first, second = tmp_path / "old" / "version_0", tmp_path / "old" / "version_1"
    write(first / "random_gradient.csv", "step,backward,r\n0,0,0.5\n")
    write(second / "random_gradient.csv", "step,backward,r\n1,1,0.75\n")
    write_run_file(second, "random_gradient", str(first))
    shutil.move(tmp_path / "old", tmp_path / "new")
    assert [row["r"] for row in load_random_gradient(tmp_path / "new" / "version_1")] == [0.5, 0.75]


def test_a_callable_argument_is_checkpointed_by_name(tmp_path, trainer_for, tiny_module):
    """A lambda metric (or loss_fn) cannot be pickled: checkpoints store its qualified name, and a
    resume with the same function does not warn that settings changed."""
    heatmap = MinibatchHeatmap(metric=lambda features: features.sum(dim=1), loss_fn=mse_loss, progress=False)
    trainer = trainer_for([heatmap], max_epochs=1)
    trainer.fit(tiny_module(samples=16))
    trainer.save_checkpoint(tmp_path / "heatmap.ckpt")
    saved = torch.load(tmp_path / "heatmap.ckpt", weights_only=False)["callbacks"][heatmap.state_key]
    assert saved["hyperparameters"]["metric"].endswith("<lambda>")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        heatmap.load_state_dict(saved)


class LossRecorder(Callback):
    """The loss of every training step as the module returned it, with the step and epoch."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append((trainer.global_step - 1, trainer.current_epoch, float(outputs["loss"])))


@pytest.mark.parametrize("kind", ["tensorboard", "csv"])
def test_scalars_read_back_what_the_module_logged(kind, tmp_path, trainer_for, tiny_module, make_logger):
    recorder = LossRecorder()
    logger = make_logger(kind, tmp_path / "logs")
    trainer = trainer_for([recorder], max_epochs=2, logger=logger, log_every_n_steps=1)
    trainer.fit(tiny_module(samples=12))
    records = load_scalars(logger.log_dir)
    loss = [(row["step"], row["epoch"], row["value"]) for row in records if row["tag"] == "train_loss"]
    assert [(step, epoch) for step, epoch, _ in loss] == [(step, epoch) for step, epoch, _ in recorder.rows]
    np.testing.assert_allclose([v for *_, v in loss], [v for *_, v in recorder.rows], rtol=1e-6)
    steps, values = scalar_series(records, "val_loss", by="epoch")
    assert steps.tolist() == [0.0, 1.0] and np.isfinite(values).all()
    assert all(row["tag"] != "epoch" for row in records)
    assert load_run(logger.log_dir)["scalars"] == records


def test_scalars_a_resumed_fit_redid_are_taken_from_the_later_folder(tmp_path):
    """The first fit logged to step 5 but was resumed at step 3; the resumed one logs ``hp`` at step 0."""
    first, second = tmp_path / "logs" / "version_0", tmp_path / "logs" / "version_1"
    write(
        first / "metrics.csv",
        "epoch,step,loss,hp\n0,0,,1.0\n" + "".join(f"{s // 3},{s},{s}.0,\n" for s in range(6)),
    )
    write(second / "metrics.csv", "epoch,step,loss,hp\n1,0,,2.0\n1,3,30.0,\n1,4,40.0,\n")
    write_run_file(first, "random_gradient", None)
    write_run_file(second, "random_gradient", str(first))
    records = load_scalars(second)
    assert scalar_series(records, "loss")[1].tolist() == [0.0, 1.0, 2.0, 30.0, 40.0]
    assert scalar_series(records, "loss", by="epoch")[0].tolist() == [0, 0, 0, 1, 1]
    assert scalar_series(records, "hp")[1].tolist() == [2.0]
    assert [row["value"] for row in load_scalars(second, follow_resumes=False)] == [2.0, 30.0, 40.0]


def test_scalar_series_names_what_is_there(tmp_path):
    records = [{"tag": "val/acc", "step": 3, "epoch": None, "value": 0.5}]
    assert [a.tolist() for a in scalar_series(records, "val/acc")] == [[3.0], [0.5]]
    assert np.isnan(scalar_series(records, "val/acc", by="epoch")[0]).all()
    with pytest.raises(KeyError, match=r"val/acc"):
        scalar_series(records, "val/loss")
    with pytest.raises(ValueError, match="`by`"):
        scalar_series(records, "val/acc", by="time")


# -- resumes write every record once (issue 19, finding 11: the files) ----------------------------

RESUMED_TABLES = ("fisher_history.csv", "fisher_spectrum.csv", "random_gradient.csv", "grad_flow.csv")


def table_callbacks() -> list:
    return [FisherSpectrum(every_n_steps=1), RandomGradient(seed=4), GradientFlow()]


class DigitsMLP(L.LightningModule):
    """64 → 16 → tanh → 10 on 8×8 digits, plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.net(images.flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def fit_with_logger(trainer_for) -> Callable[..., Path]:
    """``fit_with_logger(save_dir, version, callbacks, max_steps, ckpt_path=None)``: ``max_steps``
    steps of :class:`DigitsMLP` on digits (1,438 images in batches of 200: 8 steps an epoch), logged
    by a CSVLogger into ``save_dir/run/version_<version>``, checkpointing as Lightning does by
    default; the project's datamodule resumes exactly, mid-epoch too. Returns the run folder."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_tricks.datamodules import DigitsDataModule

    def fit(save_dir: Path, version: int, callbacks: list, max_steps: int, ckpt_path=None) -> Path:
        L.seed_everything(7, verbose=False)
        logger = CSVLogger(save_dir, name="run", version=version)
        steps = dict(max_steps=max_steps, max_epochs=-1)
        trainer = trainer_for(callbacks, logger=logger, enable_checkpointing=True, **steps)
        datamodule = DigitsDataModule(image_size=8, batch_size=200, val_size=0)
        trainer.fit(DigitsMLP(), datamodule=datamodule, ckpt_path=ckpt_path)
        return Path(run_directory(trainer))

    return fit


@pytest.mark.parametrize("into", ["same version", "new version"])
def test_a_resumed_fit_continues_its_tables_without_duplicates(tmp_path, into, fit_with_logger):
    """Uninterrupted: 18 steps (8 an epoch). Interrupted: stopped after step 12, resumed from the
    mid-epoch checkpoint of step 10 into the same logger version (the files must be continued:
    before, steps 10–11 were written twice) or into a new one (``results`` joins the chain). Every
    table, and what ``results`` reads back, equals the uninterrupted run's, row for row, bit for bit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = fit_with_logger(tmp_path / "full", 0, table_callbacks(), 18)
    saver = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    first = fit_with_logger(tmp_path / "parts", 0, [*table_callbacks(), saver], 12)
    (checkpoint,) = (tmp_path / "ckpt").glob("*-step=10.ckpt")
    version = 0 if into == "same version" else 1
    later = fit_with_logger(tmp_path / "parts", version, table_callbacks(), 18, checkpoint)
    assert (later == first) == (into == "same version")
    if into == "same version":
        for name in RESUMED_TABLES:
            assert (later / name).read_text() == (full / name).read_text(), name
    loaded, reference = load_run(later), load_run(full)
    for name in ("fisher_history", "fisher_spectrum", "random_gradient"):
        assert loaded[name] == reference[name], name
    assert len(loaded["fisher_history"]) == 18
    np.testing.assert_array_equal(loaded["grad_flow"].matrix, reference["grad_flow"].matrix)


def test_rows_an_older_version_wrote_twice_into_one_file_are_read_once_as_last_written(tmp_path):
    """Before the writers continued their tables, a resume into the same folder appended steps
    10–11 again after 0–11 (and the scalars twice): the last write per step wins."""
    rows = [(s, s, f"0.{s}") for s in range(12)] + [(s, s, f"1.{s}") for s in range(10, 18)]
    lines = "".join(f"{a},{b},{c}\n" for a, b, c in rows)
    write(tmp_path / "random_gradient.csv", "step,backward,r\n" + lines)
    records = load_random_gradient(tmp_path)
    expected = [(s, float(f"0.{s}")) for s in range(10)] + [(s, float(f"1.{s}")) for s in range(10, 18)]
    assert [(row["step"], row["r"]) for row in records] == expected
    header = "step,epoch,lr,c_k\n"
    lines = "0,0,0.1,1\n4,0,0.1,2\n8,1,0.1,3\n8,1,0.1,4\n12,1,0.1,5\n"
    write(tmp_path / "fisher_history.csv", header + lines)
    assert [(r["step"], r["c_k"]) for r in load_fisher_history(tmp_path)] == [(0, 1), (4, 2), (8, 4), (12, 5)]
    write(tmp_path / "metrics.csv", "step,loss,acc\n0,1.0,\n1,0.5,\n1,,0.25\n1,0.4,\n2,0.3,\n")
    scalars = load_scalars(tmp_path)
    assert [(r["tag"], r["step"], r["value"]) for r in scalars] == [
        ("loss", 0, 1.0),
        ("acc", 1, 0.25),
        ("loss", 1, 0.4),
        ("loss", 2, 0.3),
    ]


# -- cut or hand-edited files (issue 19, finding 12) -----------------------------------------------


def test_a_csv_row_cut_mid_write_is_left_out_with_a_warning_naming_file_and_line(tmp_path):
    path = write(tmp_path / "random_gradient.csv", "step,backward,r\n0,0,0.5\n1,1,0.12")  # 0.1234 cut
    with pytest.warns(UserWarning, match=r"random_gradient\.csv, line 3: .*cut mid-write"):
        assert read_table(path) == [{"step": 0, "backward": 0, "r": 0.5}]
    with pytest.warns(UserWarning, match="line 3"):
        assert load_random_gradient(tmp_path) == [{"step": 0, "backward": 0, "r": 0.5}]


def test_a_csv_row_with_missing_or_extra_cells_names_file_and_line(tmp_path):
    for body in ("0,0,0.5\n1,1\n2,2,0.5\n", "0,0,0.5\n1,1,0.5,9\n"):
        path = write(tmp_path / "t.csv", "step,backward,r\n" + body)
        with pytest.raises(ValueError, match=r"t\.csv, line 3: .* cells where the header has 3"):
            read_table(path)


def test_a_cut_run_file_names_the_file_and_the_line(tmp_path):
    write(tmp_path / "random_gradient.csv", "step,backward,r\n0,0,0.5\n")
    write(tmp_path / RUN_FILE, '{\n  "callbacks": {\n    "random_gradient": {"class": "RandomGr')
    for read in (load_run, run_chain, load_random_gradient):
        with pytest.raises(ValueError, match=rf"{RUN_FILE}, line 3, column \d+: not valid JSON"):
            read(tmp_path)
    write(tmp_path / RUN_FILE, "[1, 2]")
    with pytest.raises(ValueError, match=rf"{RUN_FILE}: expected a JSON object"):
        load_run(tmp_path)


def test_a_cut_array_names_the_file(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(100.0))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:300])
    with pytest.raises(ValueError, match=r"cut\.npy"):
        read_array(tmp_path / "cut.npy")
