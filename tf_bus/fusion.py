"""Lesion-aware classification (after evaluation, stage 7b): `tf-bus fuse SEG_CV CLF_CV --out DIR`.

A from-scratch ResNet on 400-odd BUSI training images classifies about 6 cases in 10
correctly, while the outline and echo of the lesion the U-Net finds tell benign from
malignant well and, through the U-Net's confidence, lesion from normal. This stage stacks
the two (Wolpert's stacked generalisation): gradient-boosted trees take the ResNet's class
probabilities and the ``tf_bus.descriptors`` of the U-Net's mask, and give new class
probabilities.

Stacking needs the models' outputs on cases they were not trained on, so it reads two
cross-validations (`--folds K` of both trainers, on the same data with the same folds):
every case was scored by the U-Net and the ResNet that held it out. Fold k's U-Net predicts
its test cases again (with the CV's flip TTA; the mask at the threshold that fold chose on
validation) and their descriptors are measured. The trees are scored the same way: for each
fold, trees fitted on the other folds' cases predict that fold's. So every reported case was
predicted by trees that never saw it, from features of models that never saw it (as in any
stacking, the models behind the trees' training rows did train on it). Last, trees are
fitted on every case: the model to apply to new cases (``fusion_model.json``).

The lesion-only U-Net (the trainer's default) marks something on nearly every normal image,
so normals are the fusion's weakest class. ``presence_cv`` adds a second U-Net
cross-validation on the same folds, trained on every image (`--no-lesion-only`): its
confidence that the image holds a lesion at all (``PRESENCE_DESCRIPTORS``) joins the
features.

DIR after a run::

    descriptors.csv          per case: name, fold, label, the ResNet's probabilities, descriptors
    cross_validation.json    the fused probabilities per case, pooled and per-fold metrics in
                             the classifier cross-validation's schema (so `tf-bus compare
                             CLF_CV DIR` pairs them), plus the ResNet alone, the descriptors
                             alone, and the paired comparison with the ResNet
    fusion_model.json        the trees fitted on every case (``BoostedTrees``: plain JSON)
    confusion_matrix.png, roc.png, importance.png
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tf_bus.config import CLASS_NAMES
from tf_bus.data.busi import TfBusError
from tf_bus.descriptors import DESCRIPTOR_NAMES, DESCRIPTORS, lesion_descriptors
from tf_bus.io import write_bytes_atomic, write_json_atomic

#: What a second U-Net cross-validation, trained on every image (`--no-lesion-only`), adds
#: with ``fuse(presence_cv=...)``: how sure that U-Net is that the image holds a lesion at all.
#: The lesion-only U-Net marks something on nearly every normal image; this one leaves about
#: half of them empty (README, "Lesion-aware classification").
PRESENCE_DESCRIPTORS: tuple[str, ...] = ("max_probability", "top_probability", "mask_fraction", "area")
PRESENCE_NAMES: tuple[str, ...] = tuple(f"presence_{n}" for n in PRESENCE_DESCRIPTORS)
_PRESENCE_COLUMNS = [DESCRIPTOR_NAMES.index(n) for n in PRESENCE_DESCRIPTORS]

#: The fused model's inputs: the ResNet's log-probabilities, the descriptors, then (with a
#: presence U-Net) the presence descriptors.
FEATURE_NAMES: tuple[str, ...] = (*(f"log_p_{c}" for c in CLASS_NAMES), *DESCRIPTOR_NAMES, *PRESENCE_NAMES)


@dataclass
class BoostedTrees:
    """Multi-class gradient-boosted regression trees as plain data (no pickle), so that the
    fitted model is read back, checked and applied anywhere.

    ``raw[c] = baseline[c] + learning_rate * sum_i tree_i,c(x)`` and the probabilities are
    the softmax of ``raw``, as scikit-learn's ``GradientBoostingClassifier`` (log-loss)
    computes them. Each tree is a dict of node arrays: ``feature`` and ``threshold`` (go left
    if ``x[feature] <= threshold``), ``left`` and ``right`` (child indices, -1 at a leaf) and
    ``value`` (the leaf's output).
    """

    feature_names: list[str]
    class_names: list[str]
    learning_rate: float
    baseline: list[float]
    trees: list[list[dict[str, list]]]  # [stage][class]

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, *, feature_names, class_names, trees: int = 200, depth: int = 2,
            learning_rate: float = 0.05, seed: int = 0) -> "BoostedTrees":
        """Fits scikit-learn's ``GradientBoostingClassifier`` and keeps its trees.
        Every class must occur in ``y``."""
        from sklearn.ensemble import GradientBoostingClassifier

        missing = sorted(set(range(len(class_names))) - set(np.unique(y).tolist()))
        if missing:
            raise TfBusError(f"no {', '.join(class_names[m] for m in missing)} case to fit the fusion on; every "
                             "class must occur in the training folds.")
        model = GradientBoostingClassifier(n_estimators=trees, max_depth=depth, learning_rate=learning_rate,
                                           random_state=seed).fit(x, y)
        stages = [[{"feature": t.tree_.feature.tolist(), "threshold": t.tree_.threshold.tolist(),
                    "left": t.tree_.children_left.tolist(), "right": t.tree_.children_right.tolist(),
                    "value": t.tree_.value[:, 0, 0].tolist()} for t in stage] for stage in model.estimators_]
        fitted = cls(list(feature_names), list(class_names), float(learning_rate), [0.0] * len(class_names), stages)
        # The trees' constant start (scikit-learn's prior log-odds), read off its public decision_function.
        fitted.baseline = (model.decision_function(x[:1])[0] - fitted.raw_scores(x[:1])[0]).tolist()
        return fitted

    def raw_scores(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise TfBusError(f"the fusion model takes {len(self.feature_names)} features per case "
                             f"({', '.join(self.feature_names)}); received an array of shape {x.shape}.")
        raw = np.tile(np.asarray(self.baseline, np.float64), (len(x), 1))
        rows = np.arange(len(x))
        for stage in self.trees:
            for c, tree in enumerate(stage):
                feature, threshold = np.asarray(tree["feature"]), np.asarray(tree["threshold"])
                left, right, value = np.asarray(tree["left"]), np.asarray(tree["right"]), np.asarray(tree["value"])
                node = np.zeros(len(x), int)
                while True:
                    inner = left[node] >= 0
                    if not inner.any():
                        break
                    go_left = x[rows, np.where(inner, feature[node], 0)] <= threshold[node]
                    node = np.where(inner, np.where(go_left, left[node], right[node]), node)
                raw[:, c] += self.learning_rate * value[node]
        return raw

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        raw = self.raw_scores(x)
        e = np.exp(raw - raw.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def tf_predict_proba(self, x):
        """``predict_proba`` as TensorFlow ops (for a SavedModel): every tree walked at once
        by gathers, one step per level. ``x``: float64 (N, features)."""
        import tensorflow as tf

        trees = [tree for stage in self.trees for tree in stage]  # stage-major, then class
        nodes = max(len(t["feature"]) for t in trees)

        def table(key, fill, dtype):
            return tf.constant([t[key] + [fill] * (nodes - len(t[key])) for t in trees], dtype)

        left, right = table("left", -1, tf.int32), table("right", -1, tf.int32)
        feature = tf.maximum(table("feature", 0, tf.int32), 0)  # leaves (-2) never read x
        threshold, value = table("threshold", 0.0, tf.float64), table("value", 0.0, tf.float64)

        def depth(tree, node=0):
            return 0 if tree["left"][node] < 0 else 1 + max(depth(tree, tree["left"][node]),
                                                            depth(tree, tree["right"][node]))

        x = tf.cast(x, tf.float64)
        node = tf.zeros([tf.shape(x)[0], len(trees)], tf.int32)  # (N, trees)
        for _ in range(max(depth(t) for t in trees)):
            at = tf.transpose(node)  # (trees, N)
            go_left = tf.gather(x, tf.transpose(tf.gather(feature, at, batch_dims=1)), batch_dims=1) <= \
                tf.transpose(tf.gather(threshold, at, batch_dims=1))
            l, r = tf.transpose(tf.gather(left, at, batch_dims=1)), tf.transpose(tf.gather(right, at, batch_dims=1))
            node = tf.where(l >= 0, tf.where(go_left, l, r), node)
        leaves = tf.transpose(tf.gather(value, tf.transpose(node), batch_dims=1))  # (N, trees)
        classes = len(self.class_names)
        raw = tf.constant(self.baseline, tf.float64) + self.learning_rate * tf.reduce_sum(
            tf.reshape(leaves, [-1, len(self.trees), classes]), axis=1)
        return tf.nn.softmax(raw, axis=-1)

    def importances(self) -> dict[str, float]:
        """How often each feature splits a node, as a share of all splits."""
        counts = np.zeros(len(self.feature_names))
        for stage in self.trees:
            for tree in stage:
                for f, left in zip(tree["feature"], tree["left"]):
                    if left >= 0:
                        counts[f] += 1
        return dict(zip(self.feature_names, (counts / max(counts.sum(), 1)).tolist()))

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(Path(path), asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BoostedTrees":
        p = Path(path)
        try:
            return cls(**json.loads(p.read_text()))
        except FileNotFoundError:
            raise TfBusError(f"{p}: no such fusion model; `tf-bus fuse` writes DIR/fusion_model.json.") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise TfBusError(f"{p}: not a fusion model written by `tf-bus fuse` ({e}).") from None


def _load_cv(path, kind: str) -> tuple[Path, dict[str, Any]]:
    folder = Path(path).expanduser().resolve()
    file = folder / "cross_validation.json"
    if not file.is_file():
        raise TfBusError(f"{folder}: no cross_validation.json; pass the --out folder of `tf-bus train-{kind} "
                         f"--folds K` after it finished.")
    try:
        result = json.loads(file.read_text())
        settings, rows = result["settings"], result["per_image"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise TfBusError(f"{file}: not a tf-bus cross-validation (no settings or per_image).") from None
    if settings.get("kind") != kind:
        raise TfBusError(f"{file}: is a {settings.get('kind')} cross-validation; pass a {kind}'s here "
                         f"(`tf-bus fuse SEGMENTER_CV CLASSIFIER_CV`).")
    return folder, result


def _check_folds(seg: dict, clf: dict, seg_file: Path, clf_file: Path) -> None:
    seg_fold = {r["name"]: r["fold"] for r in seg["per_image"]}
    for r in clf["per_image"]:
        if r["name"] not in seg_fold:
            raise TfBusError(f"case {r['name']!r} of {clf_file} is not in {seg_file}: the two cross-validations "
                             "scored different data. Run both with the same --data.")
        if seg_fold[r["name"]] != r["fold"]:
            raise TfBusError(f"case {r['name']!r} is in fold {r['fold']} of {clf_file} but fold "
                             f"{seg_fold[r['name']]} of {seg_file}: stacking needs the same folds. Run both "
                             "trainers with the same --data, --folds and --fold-validation.")


def measure_descriptors(seg_cv, clf_rows: dict[str, dict], *, data=None) -> list[dict[str, Any]]:
    """Per case of the classifier CV: name, fold, label, the ResNet's probabilities and the
    descriptors of the mask from the U-Net fold that held the case out."""
    from PIL import Image

    from tf_bus.evaluation import predict_split

    seg_dir, seg = seg_cv
    settings = seg["settings"]
    data = Path(data or settings["data"]).expanduser()
    if not data.is_dir():
        raise TfBusError(f"{data}: the segmenter cross-validation's data is not there; pass --data with the "
                         "release it was trained on.")
    thresholds = {f["fold"]: f["threshold"] for f in seg["folds"]}
    rows = []
    for fold in sorted(thresholds):
        fold_dir = seg_dir / f"fold_{fold}"
        for name, image_path, prob, _ in predict_split(fold_dir, data, "test", tta=settings.get("tta", True),
                                                       splits_file=fold_dir / "splits.json"):
            if name not in clf_rows:
                continue
            with Image.open(image_path) as im:
                image = np.asarray(im.convert("L"), np.float64) / 255.0
            r = clf_rows[name]
            rows.append({"name": name, "fold": fold, "label": r["label"], "probabilities": r["probabilities"],
                         "descriptors": lesion_descriptors(image, prob, thresholds[fold]).tolist()})
    missing = sorted(set(clf_rows) - {r["name"] for r in rows})
    if missing:
        raise TfBusError(f"{seg_dir}: its folds did not predict {len(missing)} case(s) of the classifier CV "
                         f"(first: {missing[0]!r}); the data at {data} differs from what the CVs scored.")
    return rows


def feature_columns(trees: "BoostedTrees", source) -> list[int]:
    """Where each of ``trees``' inputs sits in ``FEATURE_NAMES``: a fusion fitted before
    descriptors were added takes its own columns of the features measured now.

    Raises:
        TfBusError: ``trees`` takes a feature this version does not measure.
    """
    unknown = [n for n in trees.feature_names if n not in FEATURE_NAMES]
    if unknown:
        raise TfBusError(f"{source}: the fusion model takes {', '.join(unknown)}, which this tf-bus does not "
                         "measure; run `tf-bus fuse` again to refit it.")
    return [FEATURE_NAMES.index(n) for n in trees.feature_names]


def features(probabilities, descriptors, presence=None) -> np.ndarray:
    """The fusion model's inputs (``FEATURE_NAMES``, the presence columns only when given) from
    (N, 3) probabilities, (N, D) descriptors and (N, P) presence descriptors."""
    x = np.c_[np.log(np.clip(np.asarray(probabilities, np.float64), 1e-6, 1.0)), np.asarray(descriptors, np.float64)]
    return x if presence is None else np.c_[x, np.asarray(presence, np.float64)]


def _out_of_fold(x, y, folds, **fit) -> np.ndarray:
    prob = np.zeros((len(y), len(CLASS_NAMES)))
    for k in np.unique(folds):
        test = folds == k
        model = BoostedTrees.fit(x[~test], y[~test], feature_names=[f"x{i}" for i in range(x.shape[1])],
                                 class_names=list(CLASS_NAMES), **fit)
        prob[test] = model.predict_proba(x[test])
    return prob


def _write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    presence = PRESENCE_NAMES if "presence" in rows[0] else ()
    w.writerow(["name", "fold", "label", "class", *(f"p_{c}" for c in CLASS_NAMES), *DESCRIPTOR_NAMES, *presence])
    for r in rows:
        w.writerow([r["name"], r["fold"], r["label"], CLASS_NAMES[r["label"]],
                    *(f"{p:.6g}" for p in r["probabilities"]),
                    *(f"{d:.6g}" for d in r["descriptors"] + r.get("presence", []))])
    write_bytes_atomic(path, buf.getvalue().encode())


def _importance_plot(importance: dict[str, float], path: Path) -> None:
    from tf_bus.plots import save_png, subplots

    names = sorted(importance, key=importance.get)
    fig, ax = subplots(figsize=(6, 5))
    ax.barh(names, [importance[n] for n in names], color="tab:blue")
    ax.set_xlabel("share of the trees' splits")
    ax.set_title("what the fused classifier uses")
    save_png(fig, path)


def fuse(segmenter_cv, classifier_cv, out_dir, *, presence_cv=None, data=None, trees: int = 200, depth: int = 2,
         learning_rate: float = 0.05, seed: int = 0, resamples: int = 10000) -> dict[str, Any]:
    """Stacks a U-Net and a ResNet cross-validation (module docstring); writes ``out_dir``.

    Args:
        segmenter_cv, classifier_cv: the --out folders of `train-segmenter --folds K` and
            `train-classifier --folds K` on the same data (same folds).
        presence_cv: optionally a second U-Net cross-validation on the same folds, trained on
            every image (`train-segmenter --no-lesion-only --folds K`): the
            ``PRESENCE_DESCRIPTORS`` of its held-out masks join the features.
        data: the release the CVs were trained on, if it moved since.
        trees, depth, learning_rate, seed: the gradient-boosted trees.
        resamples: bootstrap resamples of the paired comparison with the ResNet.

    Returns:
        What ``cross_validation.json`` holds.
    """
    from tf_bus.comparison import compare_classifiers
    from tf_bus.evaluation import _classification_plots, classification_metrics

    if trees < 1 or depth < 1 or not learning_rate > 0 or resamples < 100:
        raise TfBusError(f"trees and depth must be >= 1, learning_rate > 0 and resamples >= 100. Received: "
                         f"trees={trees}, depth={depth}, learning_rate={learning_rate}, resamples={resamples}")
    seg_dir, seg = _load_cv(segmenter_cv, "segmenter")
    clf_dir, clf = _load_cv(classifier_cv, "classifier")
    _check_folds(seg, clf, seg_dir / "cross_validation.json", clf_dir / "cross_validation.json")
    pres = None
    if presence_cv is not None:
        pres_dir, pres = _load_cv(presence_cv, "segmenter")
        if pres["settings"].get("config", {}).get("lesion_only", False):
            raise TfBusError(f"{pres_dir}: this U-Net cross-validation was trained on lesion images only; the "
                             "presence U-Net must also learn to leave normal images empty. Train it with "
                             "`tf-bus train-segmenter --no-lesion-only --folds K` on the same data.")
        _check_folds(pres, clf, pres_dir / "cross_validation.json", clf_dir / "cross_validation.json")
    clf_rows = {r["name"]: r for r in clf["per_image"]}
    rows = measure_descriptors((seg_dir, seg), clf_rows, data=data)
    if pres is not None:
        measured = {r["name"]: r["descriptors"] for r in measure_descriptors((pres_dir, pres), clf_rows, data=data)}
        for r in rows:
            r["presence"] = [measured[r["name"]][i] for i in _PRESENCE_COLUMNS]
    rows.sort(key=lambda r: (r["fold"], r["name"]))
    y = np.array([r["label"] for r in rows])
    folds = np.array([r["fold"] for r in rows])
    resnet = np.array([r["probabilities"] for r in rows], np.float64)
    desc = np.array([r["descriptors"] + r.get("presence", []) for r in rows], np.float64)  # the U-Nets' features
    feature_names = list(FEATURE_NAMES if pres is not None else FEATURE_NAMES[:-len(PRESENCE_NAMES)])
    fit = dict(trees=trees, depth=depth, learning_rate=learning_rate, seed=seed)
    fused = _out_of_fold(features(resnet, desc), y, folds, **fit)
    descriptors_only = _out_of_fold(desc, y, folds, **fit)

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, out / "descriptors.csv")
    per_image = [{"name": r["name"], "label": r["label"], "probabilities": p.tolist(), "fold": r["fold"]}
                 for r, p in zip(rows, fused)]
    by_fold = []
    for k in np.unique(folds):
        m = classification_metrics(y[folds == k], fused[folds == k])
        by_fold.append({"fold": int(k), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                        "macro_roc_auc_ovr": m["macro_roc_auc_ovr"], "cases": int((folds == k).sum())})
    model = BoostedTrees.fit(features(resnet, desc), y, feature_names=feature_names, class_names=list(CLASS_NAMES),
                             **fit)
    model.save(out / "fusion_model.json")
    pooled = classification_metrics(y, fused)
    names = [r["name"] for r in rows]
    summary = {
        "pooled": pooled,
        "folds": by_fold,
        "fold_mean": {m: float(np.mean([f[m] for f in by_fold])) for m in ("accuracy", "macro_f1")},
        "fold_std": {m: float(np.std([f[m] for f in by_fold], ddof=1)) if len(by_fold) > 1 else None
                     for m in ("accuracy", "macro_f1")},
        "per_image": per_image,
        "resnet_alone": classification_metrics(y, resnet),
        "descriptors_alone": classification_metrics(y, descriptors_only),
        "against_resnet": compare_classifiers({r["name"]: r for r in rows}, {r["name"]: r for r in per_image}, names,
                                              resamples=resamples, seed=seed, class_names=list(CLASS_NAMES)),
        "importance": model.importances(),
        "settings": {"kind": "fusion", "segmenter_cv": str(seg_dir), "classifier_cv": str(clf_dir),
                     "data": str(Path(data or seg["settings"]["data"]).expanduser()),
                     "thresholds": {f["fold"]: f["threshold"] for f in seg["folds"]},
                     "presence_cv": str(pres_dir) if pres is not None else None,
                     "presence_thresholds": {f["fold"]: f["threshold"] for f in pres["folds"]} if pres is not None
                     else None,
                     "descriptors": DESCRIPTORS, "features": feature_names, **fit},
    }
    _classification_plots(y, fused, pooled, out)
    _importance_plot(summary["importance"], out / "importance.png")
    write_json_atomic(out / "cross_validation.json", summary)
    return summary


def _fold_probabilities(model, contents: list, channels: int, image_size, scale: str, tta: bool,
                        dtype, batch: int = 32) -> list[np.ndarray]:
    """A model's outputs for encoded images, decoded, resized and scaled as its loader does;
    with ``tta`` averaged with the mirror images' (mirrored back), in ``dtype`` as the
    evaluate commands average them. ``batch`` images at a time."""
    import tensorflow as tf

    from tf_bus.data.pipeline import decode_image, resize_image

    outputs = []
    for start in range(0, len(contents), batch):
        x = tf.stack([resize_image(decode_image(c, channels), channels, tuple(image_size))
                      for c in contents[start:start + batch]])
        x = tf.cast(x, tf.float32) / (255.0 if scale == "unit" else 1.0)
        out = np.asarray(model.predict_on_batch(x), dtype)
        if tta:
            flipped = np.asarray(model.predict_on_batch(tf.reverse(x, [2])), dtype)
            out = (out + (flipped[:, :, ::-1] if out.ndim == 4 else flipped)) / 2.0
        outputs += list(out)
    return outputs


@dataclass
class PresenceUNet:
    """Fold k's presence U-Net (trained on every image), when the fusion has one; ``tta`` is
    its cross-validation's setting, which its held-out masks were predicted with."""

    unet: Any
    channels: int
    size: tuple[int, int]
    threshold: float
    tta: bool


@dataclass
class FoldModels:
    """Fold k of a fusion: its U-Net (inputs, threshold) and its ResNet."""

    fold: int
    threshold: float
    unet: Any
    unet_channels: int
    unet_size: tuple[int, int]
    resnet: Any
    resnet_channels: int
    resnet_size: tuple[int, int]
    presence: PresenceUNet | None = None


@dataclass
class FusedModels:
    """What a `tf-bus fuse` result needs to classify new images: the trees, the folds'
    models and the cross-validations' TTA settings (``load_fused``)."""

    trees: BoostedTrees
    folds: list[FoldModels]
    segmenter_tta: bool
    classifier_tta: bool
    source: str
    columns: list[int]  # the trees' inputs among FEATURE_NAMES (``feature_columns``)


def load_fused(fused_dir) -> FusedModels:
    """Reads a `tf-bus fuse` result and loads its cross-validations' fold models.

    Raises:
        TfBusError: not a fuse result, or the cross-validations it was fused from moved.
    """
    import keras

    import tf_bus.models  # noqa: F401  (registers the custom objects the .keras files name)
    from tf_bus.config import ClassifierConfig
    from tf_bus.training.common import read_run_record
    from tf_bus.training.segmentation import load_best_model, load_run_config

    fused_dir = Path(fused_dir).expanduser().resolve()
    file = fused_dir / "cross_validation.json"
    try:
        settings = json.loads(file.read_text())["settings"]
        seg_dir, clf_dir = Path(settings["segmenter_cv"]), Path(settings["classifier_cv"])
        thresholds = {int(k): float(v) for k, v in settings["thresholds"].items()}
        pres_dir = Path(settings["presence_cv"]) if settings.get("presence_cv") else None
        pres_thresholds = {int(k): float(v) for k, v in (settings.get("presence_thresholds") or {}).items()}
    except FileNotFoundError:
        raise TfBusError(f"{fused_dir}: no cross_validation.json; pass the --out folder of `tf-bus fuse`.") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise TfBusError(f"{file}: not written by `tf-bus fuse` (no fusion settings).") from None
    for cv in (seg_dir, clf_dir, *([pres_dir] if pres_dir else [])):
        if not (cv / "cross_validation.json").is_file():
            raise TfBusError(f"{cv}: the cross-validation {file} was fused from is gone; the fused classifier needs "
                             "its fold models. Run `tf-bus fuse` again on where the cross-validations are now.")
    trees = BoostedTrees.load(fused_dir / "fusion_model.json")
    columns = feature_columns(trees, fused_dir / "fusion_model.json")
    if pres_dir is None and set(trees.feature_names) & set(PRESENCE_NAMES):
        raise TfBusError(f"{fused_dir}: its fusion model takes presence descriptors but cross_validation.json names no "
                         "presence cross-validation; run `tf-bus fuse ... --presence-cv` again.")
    pres_tta = pres_dir is not None and bool(
        json.loads((pres_dir / "cross_validation.json").read_text())["settings"].get("tta", True))
    folds = []
    for fold, threshold in sorted(thresholds.items()):
        seg_run, clf_run = seg_dir / f"fold_{fold}", clf_dir / f"fold_{fold}"
        seg_cfg, _ = load_run_config(seg_run)
        clf_cfg = ClassifierConfig.from_dict(read_run_record(clf_run, expected="classifier")[1]["config"])
        weights = clf_run / "best.keras" if (clf_run / "best.keras").exists() else clf_run / "last.keras"
        presence = None
        if pres_dir is not None:
            pres_run = pres_dir / f"fold_{fold}"
            pres_cfg, _ = load_run_config(pres_run)
            presence = PresenceUNet(load_best_model(pres_run, compile=False), pres_cfg.channels,
                                    tuple(pres_cfg.image_size), pres_thresholds[fold], pres_tta)
        folds.append(FoldModels(fold, threshold, load_best_model(seg_run, compile=False), seg_cfg.channels,
                                tuple(seg_cfg.image_size), keras.saving.load_model(weights, compile=False),
                                clf_cfg.channels, tuple(clf_cfg.image_size), presence))
    seg_tta = json.loads((seg_dir / "cross_validation.json").read_text())["settings"].get("tta", True)
    clf_tta = json.loads((clf_dir / "cross_validation.json").read_text())["settings"].get("tta", True)
    return FusedModels(trees, folds, bool(seg_tta), bool(clf_tta), str(fused_dir), columns)


def predict_fused(fused_dir, images: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """Classifies image files with a `tf-bus fuse` result: for each fold k, U-Net k's mask
    (its threshold, the CV's TTA) is described, ResNet k's probabilities are taken, and
    ``fusion_model.json``'s trees give fused probabilities; the folds' fused probabilities
    are averaged. Each fold's inputs look like the held-out outputs the trees were fitted
    on, which an average of the folds' outputs would not.

    Returns:
        Per image: ``image``, ``class``, ``probabilities`` (by class name) and ``folds``
        (each fold's ResNet probabilities, descriptors, presence descriptors if the fusion
        has a presence U-Net, and fused probabilities).
    """
    import tensorflow as tf
    from PIL import Image

    from tf_bus.data.pipeline import decode_image

    contents, grey = [], []
    for path in images:
        path = Path(path).expanduser()
        if not path.is_file():
            raise TfBusError(f"{path}: no such image file.")
        try:
            contents.append(tf.constant(path.read_bytes()))
            decode_image(contents[-1], 1)
            with Image.open(path) as im:
                grey.append(np.asarray(im.convert("L"), np.float64) / 255.0)
        except (tf.errors.OpError, OSError) as e:
            raise TfBusError(f"{path}: cannot be read as an image ({type(e).__name__}); pass PNG, JPEG or BMP "
                             "files.") from None
    fused = load_fused(fused_dir)  # after the images: a bad file is named without loading ten models first
    per_fold: list[list[dict[str, Any]]] = [[] for _ in images]
    for f in fused.folds:
        masks = _fold_probabilities(f.unet, contents, f.unet_channels, f.unet_size, "unit", fused.segmenter_tta,
                                    np.float32)
        resnet = _fold_probabilities(f.resnet, contents, f.resnet_channels, f.resnet_size, "raw",
                                     fused.classifier_tta, np.float64)
        presence = [None] * len(images)
        if f.presence is not None:
            presence = _fold_probabilities(f.presence.unet, contents, f.presence.channels, f.presence.size, "unit",
                                           f.presence.tta, np.float32)
        for i, (prob_map, probs, image, pres_map) in enumerate(zip(masks, resnet, grey, presence)):
            full = tf.image.resize(prob_map, image.shape, method="bilinear").numpy()[..., 0]
            desc = lesion_descriptors(image, full, f.threshold)
            row = {"fold": f.fold, "resnet": probs.tolist(), "descriptors": dict(zip(DESCRIPTOR_NAMES, desc.tolist()))}
            pres = None
            if pres_map is not None:
                full = tf.image.resize(pres_map, image.shape, method="bilinear").numpy()[..., 0]
                pres = lesion_descriptors(image, full, f.presence.threshold)[_PRESENCE_COLUMNS]
                row["presence"] = dict(zip(PRESENCE_NAMES, pres.tolist()))
            x = features(probs[None], desc[None], None if pres is None else pres[None])
            row["fused"] = fused.trees.predict_proba(x[:, fused.columns])[0].tolist()
            per_fold[i].append(row)
    out = []
    for path, folds in zip(images, per_fold):
        mean = np.mean([f["fused"] for f in folds], axis=0)
        out.append({"image": str(path), "class": CLASS_NAMES[int(np.argmax(mean))],
                    "probabilities": dict(zip(CLASS_NAMES, mean.tolist())), "folds": folds})
    return out


def _grey(contents):
    """Encoded image -> float64 (H, W) grey levels in [0, 1], as PIL's ``convert("L")``
    computes them (ITU-R 601 luma in 16-bit fixed point), which `fuse` measured on."""
    import tensorflow as tf

    rgb = tf.cast(tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False), tf.int32)
    luma = tf.bitwise.right_shift(rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768, 16)
    return tf.cast(luma, tf.float64) / 255.0


def fused_serving_function(fused: FusedModels):
    """The exported fusion's ``serving_default``: encoded images (string ``[N]``) -> the
    averaged fused ``probabilities``, ``class_ids``, ``class_names``, and per fold
    ``fold_probabilities``, ``resnet_probabilities``, ``lesion_descriptors`` (and
    ``presence_descriptors`` with a presence U-Net): what ``predict_fused`` computes, as
    TensorFlow ops."""
    import tensorflow as tf

    from tf_bus.descriptors import lesion_descriptors_tf
    from tf_bus.export import decode_resize

    names = tf.constant(list(CLASS_NAMES))
    k, d = len(fused.folds), len(DESCRIPTOR_NAMES)
    presence = fused.folds[0].presence is not None
    p = len(PRESENCE_NAMES) if presence else 0

    def outputs(model, x, tta, dtype):
        out = tf.cast(model(x, training=False), dtype)
        if tta:  # mirrored inputs, their masks mirrored back (as _fold_probabilities)
            flipped = tf.cast(model(tf.reverse(x, [2]), training=False), dtype)
            out = (out + (tf.reverse(flipped, [2]) if len(out.shape) == 4 else flipped)) / 2.0
        return out

    def serve(images):
        decoded = {}  # (channels, size) -> the batch decoded and resized once for every fold that takes it

        def inputs(channels, size):
            if (channels, size) not in decoded:
                decoded[channels, size] = decode_resize(images, channels, size)[0]
            return decoded[channels, size]

        maps, pres_maps, resnet = [], [], []
        for f in fused.folds:
            maps.append(outputs(f.unet, inputs(f.unet_channels, f.unet_size) / 255.0, fused.segmenter_tta, tf.float32))
            resnet.append(outputs(f.resnet, inputs(f.resnet_channels, f.resnet_size), fused.classifier_tta, tf.float64))
            if presence:
                pres_maps.append(outputs(f.presence.unet, inputs(f.presence.channels, f.presence.size) / 255.0,
                                         f.presence.tta, tf.float32))

        def describe(args):
            grey = _grey(args[0])

            def measure(m, threshold):
                return lesion_descriptors_tf(grey, tf.image.resize(m, tf.shape(grey), method="bilinear")[..., 0],
                                             threshold)

            rows = []
            for i, f in enumerate(fused.folds):
                row = measure(args[1 + i], f.threshold)
                if presence:
                    row = tf.concat([row, tf.gather(measure(args[1 + k + i], f.presence.threshold), _PRESENCE_COLUMNS)],
                                    axis=0)
                rows.append(row)
            return tf.stack(rows)

        desc = tf.map_fn(describe, (images, *maps, *pres_maps), fn_output_signature=tf.TensorSpec([k, d + p], tf.float64))
        resnet = tf.stack(resnet, axis=1)  # (N, folds, classes)
        x = tf.gather(tf.concat([tf.math.log(tf.clip_by_value(resnet, 1e-6, 1.0)), desc], axis=-1), fused.columns,
                      axis=-1)
        per_fold = tf.reshape(fused.trees.tf_predict_proba(tf.reshape(x, [-1, x.shape[-1]])), [-1, k, len(CLASS_NAMES)])
        probabilities = tf.reduce_mean(per_fold, axis=1)
        ids = tf.argmax(probabilities, axis=-1)
        out = {"probabilities": tf.cast(probabilities, tf.float32), "class_ids": ids,
               "class_names": tf.gather(names, ids), "fold_probabilities": tf.cast(per_fold, tf.float32),
               "resnet_probabilities": tf.cast(resnet, tf.float32), "lesion_descriptors": tf.cast(desc[..., :d], tf.float32)}
        if presence:
            out["presence_descriptors"] = tf.cast(desc[..., d:], tf.float32)
        return out

    return serve


def export_fused(fused_dir, model_base_path, name: str, version: int | None = None) -> dict[str, Any]:
    """Exports a `tf-bus fuse` result as one SavedModel at ``model_base_path/name/version``:
    every fold's U-Net and ResNet, the lesion descriptors and the trees, behind a
    ``serving_default`` that takes encoded image bytes (``fused_serving_function``)."""
    import keras
    import tensorflow as tf

    from tf_bus.export import SERVING_DEFAULT, check_model_name, version_dir, write_version

    check_model_name(name)
    fused = load_fused(fused_dir)
    model_dir, version = version_dir(model_base_path, name, version)
    archive = keras.export.ExportArchive()  # no track(): see tf_bus.export.export_model
    archive.add_endpoint(SERVING_DEFAULT, fused_serving_function(fused),
                         input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    meta = {"kind": "fusion", "model_name": name, "version": version, "class_names": list(CLASS_NAMES),
            "folds": [{"fold": f.fold, "threshold": f.threshold, "segmenter_input": [*f.unet_size, f.unet_channels],
                       "classifier_input": [*f.resnet_size, f.resnet_channels],
                       **({"presence_threshold": f.presence.threshold,
                           "presence_input": [*f.presence.size, f.presence.channels]} if f.presence else {})}
                      for f in fused.folds],
            "descriptors": list(DESCRIPTOR_NAMES),
            "presence_descriptors": list(PRESENCE_NAMES) if fused.folds[0].presence else [],
            "source_run": fused.source, "signatures": [SERVING_DEFAULT]}
    return write_version(archive, model_dir, version, meta)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    lines = []
    for label, key in (("ResNet alone", "resnet_alone"), ("descriptors alone", "descriptors_alone"),
                       ("fused", "pooled")):
        m = result[key]
        lines.append(f"{label:18s} accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  "
                     f"AUC {m['macro_roc_auc_ovr']:.3f}  (n={m['n']})")
    d = result["against_resnet"]
    for metric in ("accuracy", "macro_f1"):
        lo, hi = d[metric]["ci95"]
        lines.append(f"fused - ResNet {metric}: {d[metric]['difference']:+.3f} (95% {lo:+.3f}..{hi:+.3f})")
    lines.append(f"McNemar exact p = {d['mcnemar_exact_p']:.3g}")
    return lines
