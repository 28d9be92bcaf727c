"""Training the ResNet classifier (stage 6b of the pipeline): `tf-bus train-classifier`.

With pre-trained weights (``imagenet`` or a local file) training has two phases, as the
Keras fine-tuning guide does it: the head alone for ``head_epochs`` with the backbone
frozen, then the top ``fine_tune_stages`` residual stages at ``fine_tune_learning_rate``
(BatchNorm stays frozen). From scratch, every layer trains from the start.

RUN_DIR holds the same files as a segmenter run (config.json, best.keras on the validation
cross-entropy or macro-F1 (``monitor``), last.keras, history.csv/json, logs/, backup/ while unfinished) plus
``head.weights.h5`` once the head phase is done, so a resumed run skips it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from tf_bus.config import CLASS_NAMES, CLASSIFIER_MONITORS, ClassifierConfig, LoaderConfig
from tf_bus.io import save_atomic, write_json_atomic
from tf_bus.models.classifier import build_classifier, inference_model, set_trainable_stages
from tf_bus.training.callbacks import BestCheckpoint, EMAWeights, HistoryCSV, TimeBudget
from tf_bus.training.common import (build_before_fit, check_run_dir, leaves_no_empty_run_dir, make_optimizer,
                                    op_determinism, ordered, software_record)
from tf_bus.training.precision import precision_policy


def loader_config(config: ClassifierConfig, **overrides) -> LoaderConfig:
    """The loader settings a classifier run uses: raw [0, 255] pixels (the model preprocesses);
    the element order fixed where it must be (``ordered``)."""
    base = dict(image_size=config.image_size, channels=config.channels, scale="raw",
                batch_size=config.batch_size, seed=config.seed, augmentation=config.augmentation,
                deterministic=ordered(config))
    return LoaderConfig(**{**base, **overrides})


def _one_hot(ds: tf.data.Dataset) -> tf.data.Dataset:
    """(image, label) -> (image, one-hot); with masks, (image, (label, mask, known)) ->
    the lesion-head training model's ({"image", "lesion_mask", "mask_known"}, one-hot)."""
    def fn(x, y):
        if isinstance(y, tuple):
            label, mask, known = y
            return {"image": x, "lesion_mask": mask, "mask_known": known}, tf.one_hot(label, len(CLASS_NAMES))
        return x, tf.one_hot(y, len(CLASS_NAMES))

    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def mixup(ds: tf.data.Dataset, alpha: float, seed: int) -> tf.data.Dataset:
    """Mixup (Zhang et al. 2018) on batches of ``_one_hot``'s output: row i becomes
    ``lam_i * row_i + (1 - lam_i) * row_j`` for a random pairing j within the batch and
    ``lam_i ~ Beta(alpha, alpha)``, for the image, the one-hot label and the lesion mask
    alike; a mixed mask is known only where both masks are. Seeded and stateless, so every
    worker of a multi-worker run mixes a global batch the same way."""
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(6)

    def mix(batch, seed):
        x, y = batch
        n = tf.shape(y)[0]
        g1 = tf.random.stateless_gamma([n], seed[0:2], alpha)
        g2 = tf.random.stateless_gamma([n], seed[2:4], alpha)
        lam = g1 / tf.maximum(g1 + g2, 1e-12)
        perm = tf.argsort(tf.random.stateless_uniform([n], seed[4:6]))

        def blend(t):
            lam_t = tf.reshape(tf.cast(lam, t.dtype), [-1] + [1] * (len(t.shape) - 1))
            return lam_t * t + (1.0 - lam_t) * tf.gather(t, perm)

        if isinstance(x, dict):
            x = {"image": blend(x["image"]), "lesion_mask": blend(x["lesion_mask"]),
                 "mask_known": x["mask_known"] * tf.gather(x["mask_known"], perm)}
        else:
            x = blend(x)
        return x, blend(y)

    return tf.data.Dataset.zip((ds, seeds)).map(mix, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def build_training_model(config: ClassifierConfig) -> keras.Model:
    """The model `fit` trains for ``config``: the classifier, or with ``mask_loss_weight``
    the lesion-head training model (see ``build_classifier``)."""
    return build_classifier(config.backbone, config.weights, config.image_size, config.channels, config.dropout,
                            mask_loss_weight=config.mask_loss_weight, bn_momentum=config.bn_momentum,
                            lesion_pooling=config.lesion_pooling)


@dataclass
class ClassifierData:
    """The datasets of a classifier run, shared by `train_classifier` and the tuner."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    steps: int
    balance: str
    class_weight: dict[int, float] | None


def classifier_data(data: str | os.PathLike, config: ClassifierConfig,
                    splits_file: str | os.PathLike | None = None, *, replicas: int = 1) -> ClassifierData:
    """One-hot train/validation datasets for ``config`` with its class balancing resolved
    (``layout`` on a raw release becomes ``class_weights``). With several ``replicas`` the
    last partial training batch is dropped (no replica may get an empty batch); under
    ``multiworker`` the order is deterministic and each worker keeps its rows of every
    global batch (``shard_by_data``)."""
    from tf_bus.training.distribute import shard_by_data, validation_batching

    from tf_bus.data.pipeline import class_weights, classification_dataset, detect_layout, list_classification, list_release

    kind, root = detect_layout(data, "classification")
    balance = config.balance
    if balance == "layout" and kind == "release":
        balance = "class_weights"
    include_aug = balance == "layout"
    if kind == "classification":
        n_train = len(list_classification(root, "train", include_augmented=include_aug)[0])
        n_val = len(list_classification(root, "validation")[0])
    else:
        n_train = len(list_release(root, "train", splits_file=splits_file)[0])
        n_val = len(list_release(root, "validation", splits_file=splits_file)[0])
    val_batch, val_drop = validation_batching(config.batch_size, n_val, replicas)
    masks = config.mask_loss_weight > 0
    train_ds = _one_hot(classification_dataset(
        data, "train", loader_config(config, augment=config.augment, drop_remainder=replicas > 1), training=True,
        splits_file=splits_file,
        balanced=balance == "sampling", include_augmented=include_aug, with_masks=masks))
    if config.mixup > 0:
        train_ds = mixup(train_ds, config.mixup, config.seed + 1)  # + 1: not the augmentation's stream
    val_ds = _one_hot(classification_dataset(data, "validation",
                                             loader_config(config, batch_size=val_batch,
                                                           drop_remainder=val_drop),
                                             training=False, splits_file=splits_file, with_masks=masks))
    if config.strategy == "multiworker":
        train_ds, val_ds = shard_by_data(train_ds), shard_by_data(val_ds)
    weights = class_weights(data, "train", splits_file=splits_file) if balance == "class_weights" else None
    return ClassifierData(train_ds, val_ds, math.ceil(n_train / config.batch_size), balance, weights)


def compile_classifier(model: keras.Model, config: ClassifierConfig, lr: float, epochs: int, steps: int,
                       *, build: bool = True) -> None:
    """Compiles ``model`` for ``fit`` with every variable of the step created up front (see
    ``build_before_fit``; ``build=False`` skips that, for a compile that a later one replaces);
    call it in the strategy scope."""
    n = len(CLASS_NAMES)
    f1 = keras.metrics.F1Score(average="macro", name="f1")
    if hasattr(f1, "_build"):  # F1Score makes its variables in its first update otherwise (a second trace)
        f1._build((None, n), (None, n))
    model.compile(
        optimizer=make_optimizer(lr, config.schedule, config.warmup_epochs, epochs, steps, config.weight_decay,
                                 config.ema),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                 keras.metrics.CategoricalCrossentropy(name="ce"),
                 f1,
                 keras.metrics.AUC(multi_label=True, num_labels=n, name="auc")],
        jit_compile=False,
    )
    if build:
        build_before_fit(model)


@leaves_no_empty_run_dir
def train_classifier(
    data: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: ClassifierConfig | None = None,
    *,
    splits_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    verbose: int | str = "auto",
) -> dict[str, Any]:
    """Trains the classifier and writes RUN_DIR (see the module docstring).

    Args:
        data: a `tf-bus prepare` output, its classification layout, or the raw release.
        run_dir: output folder; an unfinished run there is resumed.
        config: the run's settings.
        splits_file: with a raw release, the split to use (default: computed).
        overwrite: replace a finished run in ``run_dir``.
        verbose: Keras ``fit`` verbosity.

    Returns:
        A summary (best validation macro-F1 and accuracy, epochs, wall time, images/s).
    """
    from tf_bus.training.distribute import (backup_and_restore, check_global_batch, chief_decides, make_strategy,
                                            worker_failures, worker_run_dir)

    config = config or ClassifierConfig()
    # First: a multi-worker strategy must exist before TensorFlow runs any op.
    strategy = make_strategy(config.strategy)
    check_global_batch(config.batch_size, strategy.num_replicas_in_sync)
    run_dir = worker_run_dir(Path(run_dir).expanduser().resolve(), config.strategy)
    record = {"config": json.loads(json.dumps(config.to_dict())), "data": str(Path(data).expanduser().resolve()),
              "splits_file": str(splits_file) if splits_file else None}
    resuming = check_run_dir(run_dir, record, overwrite, outputs=(
        "best.keras", "last.keras", "history.csv", "history.json", "head.weights.h5"), config_class=ClassifierConfig)
    run_dir.mkdir(parents=True, exist_ok=True)
    with precision_policy(config.precision) as policy:
        keras.utils.set_random_seed(config.seed)
        # Built before any data is read, so a bad --weights fails fast.
        with strategy.scope():
            model = build_training_model(config)

        data_ = classifier_data(data, config, splits_file, replicas=strategy.num_replicas_in_sync)
        train_ds, val_ds, steps, balance = data_.train, data_.validation, data_.steps, data_.balance
        weights_by_class = data_.class_weight
        write_json_atomic(run_dir / "config.json", {
            **record, "precision": policy, "replicas": strategy.num_replicas_in_sync, "balance_used": balance,
            **software_record(model),
        })

        budget = TimeBudget.for_config(config)
        logs = run_dir / "logs"
        # The diagnostics' probe batch (under multiworker: this worker's rows of the first batch).
        sample = next(iter(val_ds)) if config.diagnostics else None

        mode = CLASSIFIER_MONITORS[config.monitor]

        def callbacks(backup: str) -> list[keras.callbacks.Callback]:
            # With --ema: the backup and the callbacks that stop training before EMAWeights, the
            # checkpoint after it (see EMAWeights).
            # The epoch's row goes to history.csv before the backup counts the epoch as done (HistoryCSV).
            cbs: list[keras.callbacks.Callback] = [HistoryCSV(run_dir / "history.csv", append=True),
                                                    backup_and_restore(run_dir / backup, config.strategy), budget]
            if config.early_stopping_patience:
                cbs.append(keras.callbacks.EarlyStopping(monitor=config.monitor, mode=mode,
                                                         patience=config.early_stopping_patience))
            if config.ema:
                cbs.append(EMAWeights())
            cbs += [
                # Starts from the best epoch logged so far: a resumed run's, or the head phase's.
                BestCheckpoint(run_dir / "best.keras", config.monitor, mode, to_save=inference_model,
                               history=run_dir / "history.csv"),
                keras.callbacks.TensorBoard(str(logs), profile_batch=config.profile_batches or 0),
            ]
            if config.diagnostics:
                from tf_bus.training.diagnostics import TrainingDiagnostics

                cbs.append(TrainingDiagnostics(run_dir, sample))
            if config.schedule == "plateau":
                cbs.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3))
            return cbs

        fit_kw = dict(validation_data=val_ds, class_weight=weights_by_class, verbose=verbose, shuffle=False,
                      steps_per_epoch=steps if balance == "sampling" else None)
        history: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        pretrained = config.weights is not None
        head_epochs = min(config.head_epochs, config.epochs) if pretrained else 0
        head_file = run_dir / "head.weights.h5"
        # Under multiworker the chief's files decide (a worker killed between the chief's write
        # and its own must not train the head again); the fine-tuning phase's backup then
        # gives every worker the chief's weights.
        head_done = chief_decides(head_file.exists(), config.strategy)
        with worker_failures(config.strategy), op_determinism(config.deterministic):
            if head_epochs and not head_done:
                set_trainable_stages(model, 0)
                with strategy.scope():
                    compile_classifier(model, config, config.learning_rate, head_epochs, steps)
                h = model.fit(train_ds, epochs=head_epochs, callbacks=callbacks("backup_head"), **fit_kw)
                for k, v in h.history.items():
                    history.setdefault(k, []).extend(float(x) for x in v)
                save_atomic(head_file, model.save_weights)  # its presence marks the head phase done
            elif head_file.exists():
                model.load_weights(head_file)
            if not budget.stopped_epoch and head_epochs < config.epochs:
                set_trainable_stages(model, config.fine_tune_stages if pretrained else None)
                lr = config.fine_tune_learning_rate if pretrained else config.learning_rate
                with strategy.scope():
                    compile_classifier(model, config, lr, config.epochs - head_epochs, steps)
                h = model.fit(train_ds, initial_epoch=head_epochs, epochs=config.epochs,
                              callbacks=callbacks("backup"), **fit_kw)
                for k, v in h.history.items():
                    history.setdefault(k, []).extend(float(x) for x in v)
        save_atomic(run_dir / "last.keras", inference_model(model).save)
    wall = time.perf_counter() - t0
    epochs_run = len(history.get("loss", []))
    summary = {
        "monitor": config.monitor,
        "best_val_ce": min(history["val_ce"]) if history.get("val_ce") else None,
        "best_val_f1": max(history["val_f1"]) if history.get("val_f1") else None,
        "best_val_accuracy": max(history["val_accuracy"]) if history.get("val_accuracy") else None,
        "epochs_run_in_this_fit": epochs_run,
        "head_epochs": head_epochs,
        "resumed": resuming,
        "stopped_by_time_budget": budget.stopped_epoch is not None,
        "wall_seconds": round(wall, 1),
        "train_images_per_second": round(epochs_run * steps * config.batch_size / wall, 2) if epochs_run else None,
        "precision": policy,
        "balance": balance,
    }
    write_json_atomic(run_dir / "history.json", {"summary": summary, "history": history})
    return summary
