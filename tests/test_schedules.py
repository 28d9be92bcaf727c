"""The budget-aware cosine schedule, the clock that feeds it, and the resumable best checkpoint."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from tf_bus.models.schedules import BudgetedCosine
from tf_bus.training.callbacks import BestCheckpoint, TimeBudget, best_logged
from tf_bus.training.common import make_optimizer

PEAK = 1e-3


@pytest.mark.parametrize("warmup,steps", [(0, 0), (0, 37), (0, 100), (10, 0), (10, 5), (10, 10), (10, 55), (10, 100),
                                          (10, 250)])
def test_step_driven_is_keras_cosine_decay(warmup, steps):
    ref = keras.optimizers.schedules.CosineDecay(
        PEAK * 0.01 if warmup else PEAK, 100 - warmup, alpha=0.01,
        warmup_target=PEAK if warmup else None, warmup_steps=warmup)
    np.testing.assert_allclose(float(BudgetedCosine(PEAK, warmup, 100)(steps)), float(ref(steps)), rtol=1e-5)


@pytest.mark.parametrize("time_progress,step,expected", [
    (0.0, 55, PEAK * (0.01 + 0.99 * 0.5)),   # steps lead: half-way through the decay
    (0.55, 0, PEAK * (0.01 + 0.99 * 0.5)),   # the clock leads, past the warm-up: same point
    (0.55, 80, PEAK * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 70 / 90)))),  # steps lead again
    (1.0, 3, PEAK * 0.01),                   # budget spent: the minimum
    (0.05, 5, PEAK * (0.01 + 0.99 * 0.5)),   # inside the warm-up both ways: linear warm-up by steps
])
def test_the_further_progress_drives_the_schedule(time_progress, step, expected):
    schedule = BudgetedCosine(PEAK, 10, 100)
    schedule.time_progress.assign(time_progress)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def _tiny_fit(minutes, feed=True, epochs=1):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(make_optimizer(PEAK, "cosine", 0, 1000, 10, 0.0), "mse")
    budget = TimeBudget(minutes, feed_schedule=feed)
    x = np.ones((40, 3), np.float32)
    model.fit(x, x[:, :1], batch_size=4, epochs=epochs, verbose=0, callbacks=[budget])
    return model, budget


def test_one_schedule_graph_per_trace_trains_the_same_weights(monkeypatch):
    """AdamW reads the learning rate once per decayed variable; traced, the schedule is built
    once per graph and reused, which must not change what training does."""
    import tensorflow as tf

    step = keras.Variable(5, dtype="int64", trainable=False)
    sched = BudgetedCosine(1e-2, warmup_steps=2, total_steps=20)
    built = []
    compute = sched._compute
    monkeypatch.setattr(sched, "_compute", lambda s: built.append(1) or compute(s))

    @tf.function
    def twice():
        return sched(step), sched(step)

    a, b = twice()
    assert len(built) == 1 and float(a) == float(b) == pytest.approx(float(compute(5)))
    step.assign(15)
    assert float(twice()[0]) == pytest.approx(float(compute(15)))  # the graph reads the counter when run
    assert float(sched(3)) == pytest.approx(float(compute(3)))  # eager calls compute every time

    def train(cached: bool):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
        schedule = BudgetedCosine(1e-2, warmup_steps=1, total_steps=6)
        if not cached:
            schedule.__class__ = type("Uncached", (BudgetedCosine,), {"__call__": BudgetedCosine._compute})
        model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.1), loss="mse")
        x = np.random.default_rng(0).normal(size=(24, 4)).astype("float32")
        model.fit(x, x[:, :2], batch_size=4, epochs=1, shuffle=False, verbose=0)
        return model.get_weights()

    for w_cached, w_plain in zip(train(True), train(False)):
        np.testing.assert_array_equal(w_cached, w_plain)


@pytest.mark.parametrize("prebuilt,traces", [(False, 2), (True, 1)])
def test_build_before_fit_traces_the_training_step_once(prebuilt, traces):
    """Keras makes the optimizer's slots in the first trace, and TensorFlow then traces again;
    built up front (as both trainers do), the step is traced once."""
    from tf_bus.training.common import build_before_fit

    seen = []

    class Count(keras.layers.Layer):
        def call(self, x, training=None):
            if training:
                seen.append(1)
            return x

    model = keras.Sequential([keras.Input((4,)), Count(), keras.layers.Dense(2)])
    model.compile(make_optimizer(PEAK, "cosine", 0, 10, 3, 1e-4), "mse")
    if prebuilt:
        build_before_fit(model)
    x = np.zeros((12, 4), np.float32)
    model.fit(x, x[:, :2], batch_size=4, epochs=2, verbose=0)
    assert len(seen) == traces


@pytest.mark.parametrize("minutes,feed,expect_min", [(1e-9, True, True), (1e-9, False, False), (0, True, False)])
def test_time_budget_feeds_the_schedule(minutes, feed, expect_min):
    model, budget = _tiny_fit(minutes, feed, epochs=3)
    lr = float(model.optimizer.learning_rate)  # after 10 of 10,000 steps
    assert math.isclose(lr, PEAK * 0.01, rel_tol=1e-4) == expect_min, lr
    assert (budget.stopped_epoch == 0) == bool(minutes)  # a spent budget stops after the first epoch


def test_one_budget_spans_both_phases_and_each_phase_anneals_over_what_is_left():
    """The classifier's head and fine-tuning phases are two ``fit`` calls sharing one
    TimeBudget: the clock does not restart, and the second schedule is fed the share of
    the budget left when it started."""
    budget = TimeBudget(10.0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    x = np.ones((8, 3), np.float32)
    for phase in range(2):
        model.compile(make_optimizer(PEAK, "cosine", 0, 1000, 10, 0.0), "mse")
        model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0, callbacks=[budget])
        if phase == 0:
            first_start = budget.start
            budget.start -= 6 * 60.0  # pretend the head phase took 6 of the 10 minutes
    assert budget.start == first_start - 360.0  # the second fit kept the clock
    assert 5.9 < budget.elapsed_minutes() < 6.5 and budget.stopped_epoch is None
    assert 225.0 < budget._fit_seconds <= 240.0  # phase 2 anneals over the 4 minutes left
    progress = float(model.optimizer._learning_rate.time_progress)
    assert 0.0 <= progress < 0.05, progress  # its own schedule starts near the top, not at 60%


@pytest.mark.parametrize("rows,mode,expected", [
    ("epoch,val_f1\n0,0.5\n1,0.7\n2,0.6\n", "max", 0.7),
    ("epoch,val_f1\n0,0.5\n1,0.7\n2,0.6\n", "min", 0.5),
    ("epoch,val_f1\n0,nan\n1,0.4\n", "max", 0.4),
    ("epoch,val_f1\n", "max", None),
    (None, "max", None),
])
def test_best_logged(tmp_path, rows, mode, expected):
    path = tmp_path / "history.csv"
    if rows is not None:
        path.write_text(rows)
    assert best_logged(path, "val_f1", mode) == expected


@pytest.mark.parametrize("before_epoch, expected", [(None, 0.9), (3, 0.7), (2, 0.7), (1, 0.5), (0, None)])
def test_best_logged_before_an_epoch(tmp_path, before_epoch, expected):
    path = tmp_path / "history.csv"
    path.write_text("epoch,val_f1\n0,0.5\n1,0.7\n2,0.6\n3,0.9\n")
    assert best_logged(path, "val_f1", "max", before_epoch=before_epoch) == expected


def _killed_history(path, epochs: int) -> list[str]:
    """The history.csv a killed run left: ``epochs`` rows whose loss is 100 + epoch."""
    lines = ["epoch,loss\n"] + [f"{e},{100 + e}\n" for e in range(epochs)]
    path.write_text("".join(lines))
    return lines


@pytest.mark.parametrize("killed_rows, resumed_at", [
    (4, 4),  # the backup had every logged epoch: rows appended
    (4, 3),  # killed after epoch 3's row, before its backup: epoch 3 runs again, its old row goes
    (4, 2),  # a backup that fell back to an older copy: the rows of both re-run epochs go
])
def test_history_csv_keeps_one_row_per_finished_epoch_through_a_resume(tmp_path, killed_rows, resumed_at):
    from tf_bus.training.callbacks import HistoryCSV

    path = tmp_path / "history.csv"
    lines = _killed_history(path, killed_rows)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.ones((8, 3), np.float32)
    model.fit(x, x[:, :1], epochs=6, initial_epoch=resumed_at, verbose=0,
              callbacks=[HistoryCSV(path, append=True)])
    out = path.read_text().splitlines(keepends=True)
    assert [int(line.split(",")[0]) for line in out[1:]] == list(range(6))
    assert out[:1 + resumed_at] == lines[:1 + resumed_at]  # the header and the kept epochs, untouched
    assert all(float(line.split(",")[1]) < 100 for line in out[1 + resumed_at:])  # the re-run epochs' new rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv"]  # no temporary file left


def test_history_csv_without_append_starts_afresh(tmp_path):
    from tf_bus.training.callbacks import HistoryCSV

    path = tmp_path / "history.csv"
    _killed_history(path, 3)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(np.ones((4, 3)), np.ones((4, 1)), epochs=2, verbose=0, callbacks=[HistoryCSV(path)])
    assert [line.split(",")[0] for line in path.read_text().splitlines()] == ["epoch", "0", "1"]


def test_best_checkpoint_ignores_the_logged_rows_of_epochs_it_runs_again(tmp_path):
    """A killed run logged epoch 2 (val_f1 0.95) but its backup had only epochs 0-1; the
    resumed fit runs epoch 2 again, and only epochs 0-1 (best 0.7) count as the best so far."""
    history = tmp_path / "history.csv"
    history.write_text("epoch,val_f1\n0,0.5\n1,0.7\n2,0.95\n")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    cb = BestCheckpoint(tmp_path / "best.keras", "val_f1", "max", history=history)
    cb.set_model(model)
    cb.on_train_begin()
    cb.on_epoch_end(2, {"val_f1": 0.8})
    assert cb.best == 0.8 and (tmp_path / "best.keras").is_file()
    cb.on_epoch_end(3, {"val_f1": 0.75})  # read once per fit: 0.8 stays the best
    assert cb.best == 0.8


def test_best_checkpoint_starts_from_the_resumed_best_and_saves_what_it_is_told(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    path = tmp_path / "best.keras"
    saved = []
    cb = BestCheckpoint(path, "val_f1", "max", initial=0.7,
                        to_save=lambda m: saved.append(m) or keras.Sequential([keras.Input((3,)), m.get_layer("d")]))
    cb.set_model(model)
    cb.on_epoch_end(0, {"val_f1": 0.6})  # worse than the resumed run's best: untouched
    assert not path.exists() and not saved
    cb.on_epoch_end(1, {"val_f1": float("nan")})
    assert not path.exists()
    cb.on_epoch_end(2, {"val_f1": 0.8})
    assert path.is_file() and cb.best == 0.8 and saved == [model]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras"]  # the temporary file was renamed
    assert keras.saving.load_model(path).output_shape == (None, 2)
    with pytest.raises(ValueError, match="mode"):
        BestCheckpoint(path, "val_f1", "best")
