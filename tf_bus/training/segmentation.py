"""Training the U-Net (stage 6 of the pipeline): `tf-bus train-segmenter`.

RUN_DIR after a run::

    config.json      the SegmenterConfig used, the data path, versions
    best.keras       the U-Net with the best validation Dice (a plain UNet, also with --deep-supervision)
    last.keras       the model at the last epoch
    history.csv      per-epoch metrics (HistoryCSV; one row per finished epoch, appended on resume)
    history.json     the same, plus wall time and images/s
    logs/            TensorBoard: scalars, overlays, profiler trace (--profile-batches)
    backup/          BackupAndRestore state while a run is unfinished

Starting again with the same RUN_DIR after a kill resumes from the last finished epoch.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_bus.config import LoaderConfig, SegmenterConfig
from tf_bus.data.busi import TfBusError
from tf_bus.io import save_atomic, write_json_atomic
from tf_bus.models.losses import get_loss
from tf_bus.models.metrics import DiceScore, IoUScore
from tf_bus.models.unet import DeepSupervision, UNet
from tf_bus.training.callbacks import BestCheckpoint, EMAWeights, HistoryCSV, MaskOverlays, TimeBudget
from tf_bus.training.common import (build_before_fit, check_run_dir, leaves_no_empty_run_dir, make_optimizer,
                                    op_determinism, ordered, read_run_record, software_record)
from tf_bus.training.precision import precision_policy


def loader_config(config: SegmenterConfig, **overrides) -> LoaderConfig:
    """The loader settings a segmenter run uses (one place, for training and evaluation).
    The element order is fixed where it must be (``ordered``)."""
    base = dict(image_size=config.image_size, channels=config.channels, scale="unit",
                batch_size=config.batch_size, seed=config.seed, augmentation=config.augmentation,
                deterministic=ordered(config))
    return LoaderConfig(**{**base, **overrides})


def copy_paste(ds: tf.data.Dataset, probability: float, seed: int, *, max_shift: float = 0.25,
               sigma: float = 1.0) -> tf.data.Dataset:
    """Copy-paste augmentation (Ghiasi et al., "Simple Copy-Paste is a Strong Data
    Augmentation Method for Instance Segmentation", CVPR 2021) on batches of
    ``(images, masks)``: with ``probability``, row i receives the lesion of another row j of
    its batch, flipped left-right at random and shifted by up to ``max_shift`` of the image
    size each way (whole pixels), blended in with the pasted mask blurred by a Gaussian of
    ``sigma`` pixels (so no hard seam marks the paste); row i's mask becomes the union of its
    own and the pasted one. A row paired with itself, or with a row without lesion, is
    unchanged where nothing lands. Seeded and stateless, like ``mixup``, so every worker of a
    multi-worker run pastes a global batch the same way."""
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(8)
    radius = max(1, int(np.ceil(2 * sigma)))
    g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    g /= g.sum()
    kernel = tf.constant(np.outer(g, g)[:, :, None, None], tf.float32)

    def paste(batch, seed):
        images, masks = batch
        shape = tf.shape(images)
        n, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        s = tf.reshape(seed, [4, 2])
        chosen = tf.random.stateless_uniform([n], s[0]) < probability
        partner = tf.argsort(tf.random.stateless_uniform([n], s[1]))
        shift = tf.round(tf.random.stateless_uniform([n, 2], s[2], -max_shift, max_shift) * tf.stack([h, w]))
        flip = tf.random.stateless_uniform([n], s[3]) < 0.5
        # Output pixel (x, y) reads the partner at (x_in, y_in): x_in = x - dx, or mirrored
        # (w - 1) - (x - dx); y_in = y - dy.
        a0 = tf.where(flip, -1.0, 1.0)
        a2 = tf.where(flip, w - 1.0 + shift[:, 1], -shift[:, 1])
        zeros, ones = tf.zeros([n]), tf.ones([n])
        transforms = tf.stack([a0, zeros, a2, zeros, ones, -shift[:, 0], zeros, zeros], axis=1)

        def moved(t, interpolation):
            return tf.raw_ops.ImageProjectiveTransformV3(
                images=tf.gather(t, partner), transforms=transforms, output_shape=shape[1:3],
                interpolation=interpolation, fill_mode="CONSTANT", fill_value=0.0)

        pasted_mask = moved(masks, "NEAREST") * tf.cast(chosen, masks.dtype)[:, None, None, None]
        alpha = tf.nn.depthwise_conv2d(pasted_mask, kernel, [1, 1, 1, 1], "SAME")
        images = alpha * moved(images, "NEAREST") + (1.0 - alpha) * images
        return images, tf.maximum(masks, pasted_mask)

    return tf.data.Dataset.zip((ds, seeds)).map(paste, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def build_segmenter(config: SegmenterConfig, replicas: int = 1) -> UNet:
    """The run's U-Net; with several replicas its batch norm is synchronised across them."""
    return UNet(image_size=config.image_size, channels=config.channels, depth=config.depth,
                base_filters=config.base_filters, batch_norm=config.batch_norm, dropout=config.dropout,
                upsampling=config.upsampling, padding=config.padding, sync_batch_norm=replicas > 1,
                attention_gates=config.attention_gates, transformer_blocks=config.transformer_blocks,
                transformer_heads=config.transformer_heads, name="unet")


def training_model(config: SegmenterConfig, unet: UNet) -> keras.Model:
    """The model ``fit`` trains: the U-Net, or with ``deep_supervision`` the U-Net wrapped
    with its auxiliary heads (``DeepSupervision``)."""
    return DeepSupervision(unet, config.deep_supervision, name="unet_deep_supervision") if config.deep_supervision \
        else unet


@leaves_no_empty_run_dir
def train_segmenter(
    data: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: SegmenterConfig | None = None,
    *,
    splits_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    verbose: int | str = "auto",
) -> dict[str, Any]:
    """Trains a U-Net and writes RUN_DIR (see the module docstring).

    Args:
        data: a `tf-bus prepare` output, the segmentation layout, or the raw release.
        run_dir: output folder; an unfinished run there is resumed.
        config: the run's settings.
        splits_file: with a raw release, the split to use (default: computed).
        overwrite: replace a finished run in ``run_dir``.
        verbose: Keras ``fit`` verbosity (1: progress bar).

    Returns:
        A summary dict (best validation Dice and its epoch, epochs run, wall time, training
        images and images/s, precision), also saved in ``history.json``.
    """
    from tf_bus.data.pipeline import count_segmentation_examples, segmentation_dataset

    from tf_bus.training.distribute import (backup_and_restore, check_global_batch, make_strategy, shard_by_data,
                                            validation_batching, worker_failures, worker_run_dir)

    config = config or SegmenterConfig()
    # First: a multi-worker strategy must exist before TensorFlow runs any op.
    strategy = make_strategy(config.strategy)
    check_global_batch(config.batch_size, strategy.num_replicas_in_sync)
    run_dir = worker_run_dir(Path(run_dir).expanduser().resolve(), config.strategy)
    record = {"config": json.loads(json.dumps(config.to_dict())), "data": str(Path(data).expanduser().resolve()),
              "splits_file": str(splits_file) if splits_file else None}
    resuming = check_run_dir(run_dir, record, overwrite, config_class=SegmenterConfig)
    run_dir.mkdir(parents=True, exist_ok=True)
    with precision_policy(config.precision) as policy:
        keras.utils.set_random_seed(config.seed)

        # Several replicas: no replica may get an empty last batch (BatchNorm's moments of no rows are NaN).
        distributed = dict(drop_remainder=strategy.num_replicas_in_sync > 1, lesion_only=config.lesion_only)
        train_ds = segmentation_dataset(data, "train", loader_config(config, augment=config.augment, **distributed),
                                        training=True, splits_file=splits_file)
        if config.copy_paste > 0:
            train_ds = copy_paste(train_ds, config.copy_paste, config.seed + 1)  # + 1: not the augmentation's stream
        n_val = count_segmentation_examples(data, "validation", splits_file=splits_file, lesion_only=config.lesion_only)
        val_batch, val_drop = validation_batching(config.batch_size, n_val, strategy.num_replicas_in_sync)
        val_ds = segmentation_dataset(data, "validation",
                                      loader_config(config, lesion_only=config.lesion_only, batch_size=val_batch,
                                                    drop_remainder=val_drop),
                                      training=False, splits_file=splits_file)
        steps = int(train_ds.cardinality())
        n_train = count_segmentation_examples(data, "train", splits_file=splits_file, lesion_only=config.lesion_only)
        val_images, val_masks = next(iter(val_ds))
        if config.strategy == "multiworker":
            train_ds, val_ds = shard_by_data(train_ds), shard_by_data(val_ds)
        with strategy.scope():  # model, optimizer and metrics live on the strategy's devices
            unet = build_segmenter(config, strategy.num_replicas_in_sync)
            model = training_model(config, unet)
            model.compile(optimizer=make_optimizer(config.learning_rate, config.schedule, config.warmup_epochs,
                                                    config.epochs, steps, config.weight_decay, config.ema), loss=get_loss(config.loss),
                          metrics=[DiceScore(config.threshold), IoUScore(config.threshold)], jit_compile=False)
            build_before_fit(model)
        write_json_atomic(run_dir / "config.json", {
            **record, "precision": policy, "replicas": strategy.num_replicas_in_sync,
            **software_record(unet),
        })
        logs = run_dir / "logs"
        budget = TimeBudget.for_config(config)
        # Order matters with --ema: the backup and the callbacks that stop training come before
        # EMAWeights, the checkpoint and the overlays after it (see EMAWeights).
        # The epoch's row goes to history.csv before the backup counts the epoch as done (HistoryCSV).
        callbacks: list[keras.callbacks.Callback] = [
            HistoryCSV(run_dir / "history.csv", append=resuming),
            backup_and_restore(run_dir / "backup", config.strategy), budget]
        if config.early_stopping_patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_dice", mode="max",
                                                           patience=config.early_stopping_patience))
        if config.ema:
            callbacks.append(EMAWeights())
        callbacks += [
            BestCheckpoint(run_dir / "best.keras", "val_dice", "max", to_save=lambda _: unet,
                           history=run_dir / "history.csv"),
            keras.callbacks.TensorBoard(str(logs), profile_batch=config.profile_batches or 0,
                                        update_freq="epoch"),
            MaskOverlays(val_images.numpy()[:4], val_masks.numpy()[:4], str(logs)),
        ]
        if config.diagnostics:
            from tf_bus.training.diagnostics import TrainingDiagnostics

            callbacks.append(TrainingDiagnostics(run_dir, (val_images[:8], val_masks[:8])))
        if config.schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=5,
                                                               min_lr=config.learning_rate * 0.01))
        t0 = time.perf_counter()
        with worker_failures(config.strategy), op_determinism(config.deterministic):
            history = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, callbacks=callbacks,
                                verbose=verbose, shuffle=False)  # the dataset shuffles itself
        save_atomic(run_dir / "last.keras", unet.save)
    wall = time.perf_counter() - t0
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    epochs_run = len(hist.get("loss", []))
    best_epoch = int(np.argmax(hist["val_dice"])) if hist.get("val_dice") else None
    summary = {
        "best_val_dice": max(hist["val_dice"]) if hist.get("val_dice") else None,
        "best_epoch_in_this_fit": None if best_epoch is None else best_epoch + 1,
        "epochs_run_in_this_fit": epochs_run,
        "resumed": resuming,
        "stopped_by_time_budget": budget.stopped_epoch is not None,
        "wall_seconds": round(wall, 1),
        "train_images": n_train,
        "train_images_per_second": round(epochs_run * n_train / wall, 2) if wall > 0 and epochs_run else None,
        "precision": policy,
    }
    write_json_atomic(run_dir / "history.json", {"summary": summary, "history": hist})
    return summary


def load_run_config(run_dir: str | os.PathLike) -> tuple[SegmenterConfig, dict[str, Any]]:
    """The SegmenterConfig (and the whole record) saved in RUN_DIR/config.json."""
    _, record = read_run_record(run_dir, expected="segmenter")
    return SegmenterConfig.from_dict(record["config"]), record


def load_best_model(run_dir: str | os.PathLike, compile: bool = True) -> keras.Model:
    p = Path(run_dir) / "best.keras"
    if not p.exists():
        p = Path(run_dir) / "last.keras"
    if not p.exists():
        raise TfBusError(f"{run_dir}: no best.keras or last.keras; train first (tf-bus train-segmenter).")
    return keras.saving.load_model(p, compile=compile)
