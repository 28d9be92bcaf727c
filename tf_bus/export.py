"""Export for TensorFlow Serving (stage 8): `tf-bus export`.

A trained run (segmenter or classifier), a ``--folds K`` cross-validation of either (its K
fold models averaged, as nnU-Net predicts with its folds: ``fold_ensemble``), an
``--ensemble K`` run (its K seeds averaged the same way), or a `tf-bus fuse` result (the fused classifier: ``tf_bus.fusion.export_fused``), becomes a SavedModel at
``MODELS/NAME/<version>/``, the layout ``tensorflow_model_server --model_base_path``
watches. The version is the next free integer unless given; it is written to a temporary
folder beside it and renamed, so a server polling MODELS never sees half a model, and an
existing version is never overwritten.

Signatures (built with ``keras.export.ExportArchive``, preprocessing inside):

``serving_default`` — input ``images``: ``tf.string [None]``, encoded PNG/JPEG/BMP/GIF
bytes of any size, grey or RGB (in TF Serving's REST API: ``{"b64": "..."}``).

- classifier: ``probabilities`` float ``[None, 3]`` (benign, malignant, normal),
  ``class_ids`` int64 ``[None]``, ``class_names`` string ``[None]``;
- segmenter: ``mask_probabilities`` float ``[None, H, W]`` at each input's own size (a
  batch of different sizes is zero-padded bottom/right to the largest; ``image_size``
  int32 ``[None, 2]`` gives each one's height and width), ``mask_png_bytes`` the binary
  mask at the input's size as PNG (0/255; the ``_bytes`` suffix makes TF Serving's REST
  API return it as ``{"b64": ...}``), ``lesion_area_fraction`` float ``[None]``. The mask
  is the probabilities at the threshold, post-processed as evaluation chose (``largest``:
  the largest 8-connected component, holes filled, in TensorFlow ops).

``predict_tensor`` — input ``images``: float ``[None, h, w, c]`` at the model's input size,
pixel values in [0, 255], for clients that decode and resize themselves. Outputs
``probabilities`` (classifier) or ``mask_probabilities`` ``[None, h, w]`` (segmenter).

``assets.extra/tf_bus.json`` records the kind, input size, class names, threshold,
post-processing and source run; TF Serving ignores it, `tf-bus predict` reads it.

``assets.extra/tf_serving_warmup_requests`` is TF Serving's SavedModel warmup file (a
TFRecord of ``PredictionLog``): one ``serving_default`` request with a 480x560 grey PNG,
which TF Serving and `tf-bus serve` replay at load time, before the version is AVAILABLE,
so the first client request does not pay for the lazy initialisation of the graph.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from tf_bus.config import CLASS_NAMES
from tf_bus.data.busi import TfBusError
from tf_bus.descriptors import largest_component_tf
from tf_bus.io import write_json_atomic
from tf_bus.training.common import read_run_record

SERVING_DEFAULT = "serving_default"
PREDICT_TENSOR = "predict_tensor"
WARMUP_FILE = "tf_serving_warmup_requests"  # TF Serving's name, under assets.extra/
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def check_model_name(name: str) -> str:
    """Model names become folder names and URL path parts: letters, digits, ``_-.`` only."""
    if not name or not set(name) <= _NAME_CHARS or name.startswith(".") or len(name) > 128:
        raise TfBusError(f"model name {name!r}: use 1-128 letters, digits, '_', '-' or '.' (not starting with '.').")
    return name


def read_run(run_dir: str | os.PathLike) -> tuple[str, dict[str, Any], keras.Model]:
    """(kind, config.json record, best model) of a train-segmenter or train-classifier run."""
    run_dir = Path(run_dir)
    kind, record = read_run_record(run_dir)
    import tf_bus.models  # noqa: F401  (registers the custom Keras objects)

    for name in ("best.keras", "last.keras"):
        if (run_dir / name).exists():
            return kind, record, keras.saving.load_model(run_dir / name, compile=False)
    raise TfBusError(f"{run_dir}: no best.keras or last.keras; train first.")


def _averaging_record(run_dir) -> dict[str, Any]:
    """RUN_DIR's config.json, if readable and a JSON object, else ``{}``."""
    try:
        record = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def fold_ensemble(models: list[keras.Model], name: str = "fold_ensemble") -> keras.Model:
    """One functional model whose output is the mean of ``models``' outputs (float32): the
    K fold models of a cross-validation as one predictor. The models are renamed
    ``fold_0`` ... (in memory), since one model cannot hold two layers of the same name.

    Raises:
        TfBusError: no models, or models with different input shapes.
    """
    if not models:
        raise TfBusError("fold_ensemble needs at least one model.")
    shapes = [tuple(m.input_shape[1:]) for m in models]
    if len(set(shapes)) != 1:
        raise TfBusError(f"the fold models take different inputs ({', '.join(map(str, shapes))}); a fold "
                         "ensemble needs folds trained with the same --image-size and --channels.")
    inputs = keras.Input(shapes[0], name="images")
    outputs = []
    for k, m in enumerate(models):
        m.name = f"fold_{k}"
        outputs.append(m(inputs))
    averaged = keras.layers.Average(name="fold_average", dtype="float32")(outputs) if len(outputs) > 1 else \
        keras.layers.Activation("linear", name="fold_average", dtype="float32")(outputs[0])
    return keras.Model(inputs, averaged, name=name)


class AveragedRun(NamedTuple):
    """A ``--folds K`` or ``--ensemble K`` folder read for prediction (``read_averaged``)."""

    kind: str  # segmenter or classifier
    record: dict[str, Any]  # its config.json
    model: keras.Model  # the folds' or members' best models averaged (``fold_ensemble``)
    summary: dict[str, Any] | None  # a --folds folder's cross_validation.json; None for --ensemble
    flag: str  # --folds or --ensemble
    what: str  # cross-validation or ensemble
    part: str  # fold or member


def _averaging_folder(folder: Path, record: dict[str, Any], key: str, what: str) -> tuple[str, int, str]:
    """(kind, K, how to finish it) of a ``--folds K`` (``key`` folds) or ``--ensemble K``
    folder's config.json ``record``, refusing a record that is not one."""
    kind, count = record.get("kind"), record.get(key)
    if kind not in ("segmenter", "classifier") or not isinstance(count, int) or count < 1:
        raise TfBusError(f"{folder / 'config.json'}: kind {kind!r} and {key} {count!r} are not {what}'s; "
                         f"is this a `tf-bus train-segmenter|train-classifier --{key} K` folder?")
    return kind, count, f"run the same `tf-bus train-{kind} --{key} {count}` command again to finish it"


def read_averaged(run_dir: str | os.PathLike) -> AveragedRun | None:
    """A ``--folds K`` or ``--ensemble K`` folder's models averaged, ``None`` for any other
    folder (one run).

    Raises:
        TfBusError: the cross-validation or ensemble has not finished, or a model is missing.
    """
    import tf_bus.models  # noqa: F401  (registers the custom Keras objects)
    from tf_bus.training.common import run_finished

    run_dir = Path(run_dir)
    record = _averaging_record(run_dir)
    if "folds" in record:
        kind, folds, again = _averaging_folder(run_dir, record, "folds", "a cross-validation")
        summary_file = run_dir / "cross_validation.json"
        if not summary_file.is_file():
            raise TfBusError(f"{run_dir}: the cross-validation has not finished (no cross_validation.json); {again}.")
        models = []
        for k in range(folds):
            path = run_dir / f"fold_{k}" / "best.keras"
            if not path.is_file():
                raise TfBusError(f"{path}: missing, so the fold ensemble would lack fold {k}; {again}.")
            models.append(keras.saving.load_model(path, compile=False))
        return AveragedRun(kind, record, fold_ensemble(models), json.loads(summary_file.read_text()),
                           "--folds", "cross-validation", "fold")
    if "ensemble" in record:
        kind, members, again = _averaging_folder(run_dir, record, "ensemble", "an ensemble")
        models = []
        for k in range(members):
            path = run_dir / f"member_{k}" / "best.keras"
            if not path.is_file() or not run_finished(path.parent):
                raise TfBusError(f"{path.parent}: unfinished or missing, so the ensemble would lack member {k}; "
                                 f"{again}.")
            models.append(keras.saving.load_model(path, compile=False))
        return AveragedRun(kind, record, fold_ensemble(models, name="seed_ensemble"), None,
                           "--ensemble", "ensemble", "member")
    return None


def fold_mask_settings(summary: dict[str, Any], threshold: float | None,
                        postprocess: str | None) -> tuple[float, str]:
    """A fold ensemble's threshold and post-processing, where not given: the median of the
    folds' thresholds (each chosen on its fold's validation cases) and ``largest`` only if
    most folds chose it."""
    folds = summary.get("folds") or []
    if threshold is None:
        threshold = float(np.median([f.get("threshold", 0.5) for f in folds])) if folds else 0.5
    if postprocess is None:
        largest = sum(f.get("postprocess") == "largest" for f in folds)
        postprocess = "largest" if largest > len(folds) / 2 else "none"
    return threshold, postprocess


def read_for_serving(run_dir: str | os.PathLike, threshold: float | None = None,
                     postprocess: str | None = None) -> tuple[str, keras.Model, float | None, str | None, int | None]:
    """(kind, model, threshold, post-processing, folds) that `tf-bus export` serves for a run
    folder, a ``--folds K`` or an ``--ensemble K`` folder (``folds`` is None but for ``--folds``)."""
    averaged = read_averaged(run_dir)
    if averaged:  # an ensemble's threshold.json holds the choice made at the end of its training
        kind, record, model, summary = averaged[:4]
    else:
        (kind, record, model), summary = read_run(run_dir), None
    folds = record.get("folds") if averaged else None
    if kind == "segmenter":
        threshold, postprocess = mask_settings(run_dir, record, summary, threshold, postprocess)
    return kind, model, threshold, postprocess, folds


def mask_settings(run_dir, record: dict[str, Any], summary: dict[str, Any] | None,
                  threshold: float | None = None, postprocess: str | None = None) -> tuple[float, str]:
    """A segmenter's mask threshold and post-processing, each where not given: the choice
    saved in RUN_DIR/threshold.json (``evaluate-segmenter --choose-threshold``); else, for a
    ``--folds K`` folder (``summary``: its cross_validation.json), ``fold_mask_settings``;
    else the run's configured threshold and ``none``."""
    saved = Path(run_dir) / "threshold.json"
    if saved.exists() and (threshold is None or postprocess is None):
        choice = json.loads(saved.read_text())
        threshold = float(choice["threshold"]) if threshold is None and "threshold" in choice else threshold
        postprocess = postprocess or choice.get("postprocess")
    if summary is not None:
        return fold_mask_settings(summary, threshold, postprocess)
    threshold = float(record["config"].get("threshold", 0.5)) if threshold is None else threshold
    return threshold, postprocess or "none"


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.exists() else []
    return max(versions, default=0) + 1


def decode_resize(images_bytes, channels: int, size: tuple[int, int]):
    """Encoded images (string ``[N]``) -> (float32 ``[N, h, w, channels]`` in [0, 255],
    resized as the loaders resize; int32 ``[N, 2]`` each image's own height and width)."""
    from tf_bus.data.pipeline import decode_image, resize_image

    h, w = size

    def one(b):
        img = decode_image(b, channels)
        return tf.cast(resize_image(img, channels, (h, w)), tf.float32), tf.shape(img)[:2]

    return tf.map_fn(one, images_bytes, fn_output_signature=(tf.TensorSpec([h, w, channels], tf.float32),
                                                               tf.TensorSpec([2], tf.int32)))


def _signatures(kind: str, model: keras.Model, threshold: float, postprocess: str = "none"):
    _, h, w, c = model.input_shape
    scale = 1.0 if kind == "classifier" else 1.0 / 255.0  # the classifier preprocesses raw pixels itself

    def prepare(images_bytes):
        return decode_resize(images_bytes, c, (h, w))

    bytes_spec = [tf.TensorSpec([None], tf.string, name="images")]
    tensor_spec = [tf.TensorSpec([None, h, w, c], tf.float32, name="images")]

    # One traced forward pass that both signatures call: the model's graph is built and
    # stored once (tracing a ResNet50 costs seconds, and so does loading each copy).
    @tf.function(input_signature=tensor_spec)
    def forward(images):
        return tf.cast(model(images * scale, training=False), tf.float32)

    if kind == "classifier":
        names = tf.constant(list(CLASS_NAMES))

        def serve(images):
            x, _ = prepare(images)
            p = forward(x)
            ids = tf.argmax(p, axis=-1)
            return {"probabilities": p, "class_ids": ids, "class_names": tf.gather(names, ids)}

        def tensor(images):
            return {"probabilities": forward(images)}

        return serve, tensor, bytes_spec, tensor_spec

    def serve(images):
        x, sizes = prepare(images)
        prob = forward(x)  # (B, h, w, 1)
        max_h, max_w = tf.reduce_max(sizes[:, 0]), tf.reduce_max(sizes[:, 1])

        def back(args):
            p, size = args
            full = tf.image.resize(p, size, method="bilinear")  # at the input's own size
            marked = full >= threshold
            if postprocess == "largest":  # as evaluate-segmenter --postprocess largest
                marked = largest_component_tf(marked[..., 0])[..., None]
            binary = tf.cast(marked, tf.uint8)
            png = tf.io.encode_png(binary * 255)
            area = tf.reduce_mean(tf.cast(binary, tf.float32))
            padded = tf.image.pad_to_bounding_box(full, 0, 0, max_h, max_w)[..., 0]
            return padded, png, area

        padded, pngs, areas = tf.map_fn(back, (prob, sizes), fn_output_signature=(
            tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.float32)))
        return {"mask_probabilities": padded, "mask_png_bytes": pngs, "lesion_area_fraction": areas,
                "image_size": sizes}

    def tensor(images):
        return {"mask_probabilities": forward(images)[..., 0]}

    return serve, tensor, bytes_spec, tensor_spec


def export_run(
    run_dir: str | os.PathLike,
    model_base_path: str | os.PathLike,
    name: str,
    version: int | None = None,
    *,
    threshold: float | None = None,
    postprocess: str | None = None,
) -> dict[str, Any]:
    """Exports RUN_DIR's best model to ``model_base_path/name/version`` (see the module
    docstring) and returns what was written. The segmenter's threshold defaults to
    RUN_DIR/threshold.json (from ``evaluate-segmenter --choose-threshold``), else the run's;
    its mask post-processing (``none`` or ``largest``) to threshold.json's, else ``none``.
    A ``--folds K`` folder exports the mean of its K fold models (``fold_ensemble``), with
    the median of the folds' thresholds and the post-processing most folds chose.

    Raises:
        TfBusError: not a run folder, an unfinished cross-validation, a bad model name, or
            ``version`` already exists.
    """
    check_model_name(name)
    if (Path(run_dir) / "fusion_model.json").is_file():  # a `tf-bus fuse` result
        if threshold is not None or postprocess is not None:
            raise TfBusError(f"{run_dir} is a fused classifier: its U-Nets keep their folds' thresholds; leave out "
                             "--threshold and --postprocess.")
        from tf_bus.fusion import export_fused

        return export_fused(run_dir, model_base_path, name, version)
    kind, model, threshold, postprocess, folds = read_for_serving(run_dir, threshold, postprocess)
    members = _averaging_record(run_dir).get("ensemble")
    return export_model(model, kind, model_base_path, name, version, threshold=threshold, postprocess=postprocess,
                        source_run=str(Path(run_dir).resolve()), folds=folds, ensemble=members)


def local_predictor(run_dir: str | os.PathLike) -> tuple[str, Callable[[list[bytes]], dict[str, np.ndarray]]]:
    """(kind, predict) for RUN_DIR without a server: ``predict(encoded_images)`` runs the very
    ``serving_default`` function that ``export_run(run_dir, ...)`` would serve (same decoding,
    resizing, threshold and post-processing) in this process and returns its outputs as
    NumPy arrays, as TF Serving would answer them."""
    if (Path(run_dir) / "fusion_model.json").is_file():
        raise TfBusError(f"{run_dir}: is a `tf-bus fuse` result; classify images with `tf-bus fuse-predict "
                         f"{run_dir} IMAGE...`.")
    kind, model, threshold, postprocess, _ = read_for_serving(run_dir)
    serve, _, bytes_spec, _ = _signatures(kind, model, threshold if threshold is not None else 0.5,
                                          postprocess or "none")
    serve = tf.function(serve, input_signature=bytes_spec)

    def predict(images: list[bytes]) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in serve(tf.constant(images, tf.string)).items()}

    return kind, predict


def export_model(
    model: keras.Model,
    kind: str,
    model_base_path: str | os.PathLike,
    name: str,
    version: int | None = None,
    *,
    threshold: float | None = None,
    postprocess: str | None = None,
    source_run: str | None = None,
    folds: int | None = None,
    ensemble: int | None = None,
) -> dict[str, Any]:
    """Exports an in-memory ``segmenter`` or ``classifier`` model (see ``export_run``);
    ``folds`` / ``ensemble``: how many fold models (a cross-validation's) or seed members
    (an ``--ensemble K`` run's) it averages, recorded in tf_bus.json."""
    from tf_bus.evaluation import POSTPROCESSING

    check_model_name(name)
    if kind not in ("segmenter", "classifier"):
        raise TfBusError(f"kind must be segmenter or classifier. Received: {kind!r}")
    if postprocess is not None and (kind != "segmenter" or postprocess not in POSTPROCESSING):
        raise TfBusError(f"--postprocess applies to segmenters and must be one of {', '.join(POSTPROCESSING)}. "
                         f"Received: {postprocess!r} for a {kind}")
    postprocess = postprocess or "none"
    if kind == "segmenter" and threshold is None:
        threshold = 0.5
    model_dir, version = version_dir(model_base_path, name, version)
    serve, tensor, bytes_spec, tensor_spec = _signatures(kind, model, threshold if threshold is not None else 0.5,
                                                         postprocess)
    archive = keras.export.ExportArchive()
    # No archive.track(model): add_endpoint tracks the variables the endpoints use, and
    # track() would store every weight a second time (keras-team/keras#23553: twice the
    # SavedModel's size and twice the variable memory in TF Serving).
    archive.add_endpoint(SERVING_DEFAULT, serve, input_signature=bytes_spec)
    archive.add_endpoint(PREDICT_TENSOR, tensor, input_signature=tensor_spec)
    _, h, w, c = model.input_shape
    meta = {"kind": kind, "model_name": name, "version": version, "input_size": [h, w], "channels": c,
            "class_names": list(CLASS_NAMES) if kind == "classifier" else None,
            "threshold": threshold if kind == "segmenter" else None,
            "postprocess": postprocess if kind == "segmenter" else None,
            "source_run": source_run, "folds": folds, "ensemble": ensemble, "signatures": [SERVING_DEFAULT, PREDICT_TENSOR]}
    return write_version(archive, model_dir, version, meta)


def version_dir(model_base_path, name: str, version: int | None) -> tuple[Path, int]:
    """(``model_base_path/name``, created; the version to write: ``version``, else the next
    free one). Refuses a version that exists: versions are never overwritten."""
    if version is not None and version < 1:
        raise TfBusError(f"--version must be a positive integer (TF Serving's version folders). Received: {version}")
    model_dir = Path(model_base_path).expanduser().resolve() / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version or next_version(model_dir)
    if (model_dir / str(version)).exists():
        raise TfBusError(f"{model_dir / str(version)}: version {version} exists already; versions are never "
                         "overwritten. Leave out --version to take the next free one.")
    return model_dir, version


def warmup_image() -> bytes:
    """A BUSI-sized (480x560) grey PNG: a smooth pattern, a few KB."""
    import io

    from PIL import Image

    y, x = np.mgrid[0:480, 0:560]
    buf = io.BytesIO()
    Image.fromarray(((x // 4 + y // 4) % 256).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_warmup_requests(path: Path, model_name: str) -> Path:
    """TF Serving's warmup file: one PredictionLog, a ``serving_default`` PredictRequest of
    one encoded image (the input every tf-bus export's ``serving_default`` takes)."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = model_name, SERVING_DEFAULT
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([warmup_image()], dtype=tf.string))
    record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(record.SerializeToString())
    return path


def write_version(archive, model_dir: Path, version: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Writes ``archive`` (a ``keras.export.ExportArchive``), ``assets.extra/tf_bus.json``
    and the warmup requests to a temporary folder beside ``model_dir/version`` and renames
    it there."""
    final = model_dir / str(version)
    tmp = model_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"  # not numeric: TF Serving ignores it
    try:
        tf_log = tf.get_logger()
        level = tf_log.level
        tf_log.setLevel("WARNING")  # tf.saved_model.save logs "Assets written to <tmp path>" at INFO
        try:
            archive.write_out(str(tmp), verbose=False)
        finally:
            tf_log.setLevel(level)
        write_json_atomic(tmp / "assets.extra" / "tf_bus.json", meta)
        write_warmup_requests(tmp / "assets.extra" / WARMUP_FILE, meta["model_name"])
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {**meta, "path": str(final)}
