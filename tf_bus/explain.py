"""Where the classifier looks: Grad-CAM heatmaps (Selvaraju et al. 2017) for `tf-bus explain`.

For a class c with pre-softmax score y_c and the backbone's last feature maps A_k (the
input of the layer named ``pool``: 4 x 4 at 128 px, 7 x 7 at 224 px, stride 32), the map is

    L_c = ReLU(sum_k alpha_k A_k),   alpha_k = mean over (i, j) of d y_c / d A_k(i, j)

scaled to [0, 1] by its maximum (all zeros where it has none), then resized bilinearly to
the image's own size. y_c is computed from the ``probabilities`` layer's input, kernel and
bias, so the softmax does not enter the gradient. With the default head (global average
pooling, dropout, dense) Grad-CAM equals CAM (Zhou et al. 2016), ReLU(sum_k w_kc A_k) up to
a constant, which the tests check; with ``--lesion-pooling`` the gradient also runs
through the lesion head.

Each image gives ``<stem>_gradcam.png`` (the grey image with the map over it, at the
image's own size) and ``<stem>_heatmap.png`` (the map alone, 8-bit grey) and a record:
the predicted class and probabilities, the class explained, the map's peak in image
pixels, and, where a BUSI mask lies beside the image (``<stem>_mask.png``,
``_mask_1.png``, ...), whether that peak falls inside the lesion ("pointing game"), how far from the
lesion it lies (pixels, 0 inside), and the lesion's share of the image (the chance that a
point drawn at random would fall inside).
"""

from __future__ import annotations

import glob
import io
from pathlib import Path
from typing import Any

import numpy as np

from tf_bus.config import CLASS_NAMES
from tf_bus.data.busi import TfBusError


def grad_cam(model, images, target: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM of a ``build_classifier`` model (image -> probabilities).

    Args:
        model: the classifier; its layers ``pool`` and ``probabilities`` are used.
        images: float ``[N, H, W, C]`` at the model's input size, pixel values in [0, 255].
        target: the class to explain for every image; None: each image's predicted class.

    Returns:
        (heatmaps float32 ``[N, h, w]`` in [0, 1] at the feature maps' size,
        probabilities float32 ``[N, classes]``, the explained class of each image ``[N]``).
    """
    import keras
    import tensorflow as tf

    try:
        pool, dense = model.get_layer("pool"), model.get_layer("probabilities")
    except ValueError:
        raise TfBusError(f"model {model.name!r} has no layers named `pool` and `probabilities`; Grad-CAM here "
                         "explains tf-bus classifiers (tf_bus.models.classifier.build_classifier).") from None
    probe = keras.Model(model.input, [pool.input, dense.input, model.output], name="grad_cam_probe")
    classes = dense.units
    if target is not None and not 0 <= target < classes:
        raise TfBusError(f"target class {target} is not one of the model's classes 0..{classes - 1}.")
    images = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        features, head_in, prob = probe(images, training=False)
        tape.watch(features)
        logits = tf.matmul(tf.cast(head_in, tf.float32), tf.cast(dense.kernel, tf.float32)) \
            + tf.cast(dense.bias, tf.float32)
        explained = tf.argmax(prob, axis=-1, output_type=tf.int32) if target is None \
            else tf.fill([tf.shape(logits)[0]], target)
        score = tf.reduce_sum(tf.gather(logits, explained, axis=1, batch_dims=1))
    grads = tf.cast(tape.gradient(score, features), tf.float32)
    features = tf.cast(features, tf.float32)
    alpha = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(alpha * features, axis=-1))
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    return cam.numpy(), np.asarray(prob, np.float32), explained.numpy()


def _heatmap_at(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cam`` (h, w) resized bilinearly to ``size`` (H, W), as the input was resized
    (stretched), and scaled again so that its peak is 1 (0 everywhere if it has none)."""
    import tensorflow as tf

    heat = tf.image.resize(cam[..., None], size, method="bilinear")[..., 0].numpy().clip(0.0, None)
    return heat / heat.max() if heat.max() > 0 else heat


def _lesion_mask(image: Path, size: tuple[int, int]) -> np.ndarray | None:
    """The union of the BUSI masks beside ``image`` (``<stem>_mask.png``, ``_mask_1.png`` ...),
    or None if there are none or their size differs from the image's."""
    from PIL import Image

    stem = glob.escape(image.stem)  # a name with [ or * is matched literally
    paths = sorted(image.parent.glob(f"{stem}_mask.png")) + sorted(image.parent.glob(f"{stem}_mask_*.png"))
    union = None
    for p in paths:
        with Image.open(p) as im:
            m = np.asarray(im.convert("L")) > 127
        if m.shape != size:
            return None
        union = m if union is None else union | m
    return union


def _distance_to(mask: np.ndarray, point: tuple[int, int]) -> float:
    """Euclidean distance in pixels from ``point`` (row, column) to the nearest pixel of
    ``mask`` (0 inside it)."""
    rows, cols = np.nonzero(mask)
    return float(np.sqrt(np.min((rows - point[0]) ** 2 + (cols - point[1]) ** 2)))


def _overlay_png(grey: np.ndarray, heat: np.ndarray) -> bytes:
    """The grey image with the map in matplotlib's ``jet`` over it, weighted by the map itself
    (cold regions stay grey), as PNG bytes."""
    from matplotlib import colormaps
    from PIL import Image

    colour = colormaps["jet"](heat)[..., :3] * 255.0
    weight = (0.55 * heat)[..., None]
    rgb = (1.0 - weight) * grey[..., None].astype(np.float32) + weight * colour
    buf = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def explain_images(run_dir, images, out_dir, *, target: str = "predicted", batch_size: int = 16) -> list[dict[str, Any]]:
    """Grad-CAM of RUN_DIR's classifier (best.keras, else last.keras) on image files.

    Args:
        run_dir: a ``tf-bus train-classifier`` run folder.
        images: image files or folders of them (as ``tf-bus predict`` reads them).
        out_dir: where ``<stem>_gradcam.png`` and ``<stem>_heatmap.png`` go.
        target: ``predicted`` (each image's predicted class) or a class name.
        batch_size: images a forward pass.

    Returns:
        One record an image (see the module docstring), in input order.
    """
    import tensorflow as tf
    from PIL import Image

    from tf_bus.config import ClassifierConfig
    from tf_bus.data.busi import image_files
    from tf_bus.data.pipeline import decode_image
    from tf_bus.export import decode_resize, read_run
    from tf_bus.io import write_bytes_atomic

    if target != "predicted" and target not in CLASS_NAMES:
        raise TfBusError(f"target must be `predicted` or one of {', '.join(CLASS_NAMES)}. Received: {target!r}")
    if (Path(run_dir) / "fusion_model.json").is_file():
        raise TfBusError(f"{run_dir}: is a `tf-bus fuse` result, whose trees have no gradient; explain one of the "
                         "classifier cross-validation's folds instead (CV_DIR/fold_K).")
    kind, record, model = read_run(run_dir)
    if kind != "classifier":
        raise TfBusError(f"{run_dir}: is a train-{kind} run; Grad-CAM explains classifiers (a U-Net's mask is "
                         f"its own explanation: `tf-bus predict --run {run_dir} IMAGE...`).")
    cfg = ClassifierConfig.from_dict(record["config"])
    files = image_files(images)
    target_index = None if target == "predicted" else CLASS_NAMES.index(target)
    raw = []  # every file read and decoded once before anything is written
    for f in files:
        try:
            data = f.read_bytes()
            decode_image(tf.constant(data), 1)
        except OSError as e:
            raise TfBusError(f"{f}: cannot read it ({e.strerror})") from None
        except tf.errors.OpError:
            raise TfBusError(f"{f}: cannot be read as an image; pass PNG, JPEG or BMP files.") from None
        raw.append(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for start in range(0, len(files), batch_size):
        batch, batch_raw = files[start:start + batch_size], raw[start:start + batch_size]
        x, sizes = decode_resize(tf.constant(batch_raw, tf.string), cfg.channels, tuple(cfg.image_size))
        cams, probs, explained = grad_cam(model, x, target_index)
        for f, data, size, cam, prob, k in zip(batch, batch_raw, sizes.numpy(), cams, probs, explained):
            size = (int(size[0]), int(size[1]))
            heat = _heatmap_at(cam, size)
            grey = decode_image(tf.constant(data), 1).numpy()[..., 0]
            heat_path, overlay_path = out_dir / f"{f.stem}_heatmap.png", out_dir / f"{f.stem}_gradcam.png"
            buf = io.BytesIO()
            Image.fromarray(np.round(heat * 255).astype(np.uint8)).save(buf, format="PNG")
            write_bytes_atomic(heat_path, buf.getvalue())
            write_bytes_atomic(overlay_path, _overlay_png(grey, heat))
            row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
            lesion = _lesion_mask(f, size)
            scored = lesion is not None and bool(lesion.any()) and heat.max() > 0
            records.append({
                "image": str(f),
                "class": CLASS_NAMES[int(np.argmax(prob))],
                "probabilities": {c: round(float(p), 6) for c, p in zip(CLASS_NAMES, prob)},
                "explained": CLASS_NAMES[int(k)],
                "peak": [int(row), int(col)] if heat.max() > 0 else None,
                "peak_in_lesion": bool(lesion[row, col]) if scored else None,
                "peak_distance_to_lesion": round(_distance_to(lesion, (row, col)), 2) if scored else None,
                "lesion_area_fraction": round(float(lesion.mean()), 6) if lesion is not None else None,
                "gradcam": str(overlay_path),
                "heatmap": str(heat_path),
            })
    return records
