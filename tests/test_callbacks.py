"""MaskOverlays writes what the model predicts, on the epochs it is told to."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tensorboard_events import read_overlays

from tf_bus.training.callbacks import MaskOverlays


def tiny_segmenter():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    return model


@pytest.mark.parametrize("every, epochs, expected", [(1, 3, [0, 1, 2]), (2, 3, [0, 2]), (5, 3, [0])])
def test_overlays_hold_image_truth_and_the_models_prediction(every, epochs, expected, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(6, 16, 16, 1)).astype("float32")
    masks = (images > 0.5).astype("float32")
    model = tiny_segmenter()
    snapshots = {}

    class Snapshot(keras.callbacks.Callback):  # the model's own prediction after each epoch
        def on_epoch_end(self, epoch, logs=None):
            snapshots[epoch] = np.asarray(self.model(images[:3], training=False))

    overlays = MaskOverlays(images[:3], masks[:3], str(tmp_path), every=every)
    model.fit(images, masks, epochs=epochs, batch_size=2, verbose=0, callbacks=[Snapshot(), overlays])
    written = read_overlays(tmp_path)
    assert sorted(written) == expected
    for epoch, strip in written.items():
        assert strip.shape == (3, 16, 48, 1)
        np.testing.assert_allclose(strip[:, :, :16], images[:3], atol=1 / 255)
        np.testing.assert_array_equal(strip[:, :, 16:32], masks[:3])
        np.testing.assert_allclose(strip[:, :, 32:], snapshots[epoch], atol=1 / 255)



class _Killed(Exception):
    pass


def _fit_with_backup(backup, epochs, stop_after=None):
    """A tiny model trained through tf-bus's BackupAndRestore; a run "killed" after epoch
    ``stop_after`` (1-based) keeps its backup, as a killed process does. Returns the
    epochs this fit ran and, per finished epoch, the backup folder's files."""
    from tf_bus.training.distribute import backup_and_restore

    files = []

    class Kill(keras.callbacks.Callback):  # after the backup: it sees what a kill would leave
        def on_epoch_end(self, epoch, logs=None):
            files.append(sorted(p.name for p in backup.iterdir()))
            if epoch + 1 == stop_after:
                raise _Killed

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(4, 16, 16, 1)).astype("float32")
    ran = []
    record = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: ran.append(epoch))
    try:
        tiny_segmenter().fit(images, (images > 0.5).astype("float32"), epochs=epochs, batch_size=2, verbose=0,
                             callbacks=[backup_and_restore(backup, "default"), Kill(), record])
    except _Killed:
        pass
    return ran, files


def test_backup_files_are_whole_and_leave_no_temporary_files(tmp_path):
    import json

    backup = tmp_path / "backup"
    ran, files = _fit_with_backup(backup, 5, stop_after=2)
    assert ran == [0, 1]
    assert files == [["latest.weights.h5", "training_metadata.json"],
                     ["latest.weights.h5", "latest.weights.h5.bkp", "training_metadata.json", "training_metadata.json.bkp"]]
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2
    assert json.loads((backup / "training_metadata.json.bkp").read_text())["epoch"] == 1
    ran, _ = _fit_with_backup(backup, 5)
    assert ran == [2, 3, 4]
    assert [p.name for p in tmp_path.iterdir()] == []  # a finished run removes its backup, leaving nothing


@pytest.mark.parametrize("metadata", ["", '{"epoch": ', '{"batch": 0}', "[]"],
                         ids=["empty", "cut_mid_write", "no_epoch", "not_an_object"])
def test_unreadable_backup_metadata_falls_back_to_the_previous_backup(metadata, tmp_path):
    """A process killed while Keras's own callback wrote training_metadata.json left it
    empty: the run resumes from the previous backup (the epoch before) instead of dying
    inside fit on a JSONDecodeError."""
    backup = tmp_path / "backup"
    _fit_with_backup(backup, 5, stop_after=2)  # backups after epochs 1 and 2 (.bkp holds epoch 1)
    (backup / "training_metadata.json").write_text(metadata)
    ran, _ = _fit_with_backup(backup, 4)
    assert ran == [1, 2, 3]  # epoch 1 (0-based) again, from the previous backup


def test_unreadable_backup_without_a_previous_one_names_the_folder(tmp_path):
    from tf_bus.data.busi import TfBusError

    backup = tmp_path / "backup"
    _fit_with_backup(backup, 3, stop_after=1)
    (backup / "training_metadata.json").write_text("")
    with pytest.raises(TfBusError, match=r"backup in .*backup cannot be read .*training_metadata.json.*delete that folder"):
        _fit_with_backup(backup, 3)


@pytest.mark.parametrize("name", ["last.keras", "head.weights.h5"])
def test_save_atomic_keeps_the_suffix_and_never_leaves_a_partial_file(name, tmp_path):
    """``save_atomic`` hands Keras a temporary path with the suffix it insists on; a save
    that fails mid-way (a kill, a full disk) leaves the previous file whole and no temporary."""
    from tf_bus.io import save_atomic

    model = tiny_segmenter()
    path = tmp_path / name
    save = model.save if name.endswith(".keras") else model.save_weights
    save_atomic(path, save)
    before = path.read_bytes()
    seen = []

    def fails_mid_write(tmp):
        seen.append(tmp)
        save(tmp)  # a whole file at the temporary path, then the "kill"
        with open(tmp, "r+b") as f:
            f.truncate(10)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomic(path, fails_mid_write)
    assert seen[0].endswith(name.split(".", 1)[1]) and seen[0] != str(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
