"""Test SavedModels that tf-bus did not make: TF Serving's half_plus_two (y = 0.5 x + 2)
with predict, classify and regress signatures, built as TF Serving's own test model is."""

from __future__ import annotations

from pathlib import Path


def write_half_plus_two(path: Path, a: float = 0.5, b: float = 2.0) -> Path:
    import tensorflow as tf

    v1 = tf.compat.v1
    with tf.Graph().as_default():
        serialized = v1.placeholder(tf.string, [None], name="tf_example")
        feats = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
                                                 "x2": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0])})
        x = v1.placeholder(tf.float32, name="x")
        va, vb = v1.Variable(a, name="a"), v1.Variable(b, name="b")
        y = tf.add(va * x, vb, name="y")
        y_ex = tf.add(va * feats["x"], vb, name="y_ex")
        y3 = tf.add(va * feats["x2"], 3.0, name="y3")
        sigs = {
            "serving_default": v1.saved_model.predict_signature_def({"x": x}, {"y": y}),
            "classify_x_to_y": v1.saved_model.classification_signature_def(serialized, None, y_ex),
            "regress_x_to_y": v1.saved_model.regression_signature_def(serialized, y_ex),
            "regress_x2_to_y3": v1.saved_model.regression_signature_def(serialized, y3),
        }
        builder = v1.saved_model.Builder(str(path))
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map=sigs)
        builder.save()
    return path


def write_two_inputs(path: Path) -> Path:
    """Two regress signatures over two different serialized-Example inputs (TF Serving's
    "Input tensor must be the same for all Signatures" case)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    with tf.Graph().as_default():
        sigs = {}
        for name in ("a", "b"):
            serialized = v1.placeholder(tf.string, [None], name=f"examples_{name}")
            x = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]
            sigs[f"regress_{name}"] = v1.saved_model.regression_signature_def(serialized, tf.identity(x, name=f"y_{name}"))
        builder = v1.saved_model.Builder(str(path))
        with v1.Session() as sess:
            builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map=sigs)
        builder.save()
    return path
