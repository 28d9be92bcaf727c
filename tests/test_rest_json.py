"""TF Serving's JSON tensor encoding (util/json_tensor.cc), table-driven, without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from tf_bus.serving.core import ServingError
from tf_bus.serving.rest import outputs_json, predict_inputs, to_array


@pytest.mark.parametrize("outputs,fmt,expected", [
    ({"y": np.array([2.5, 3.0], np.float32)}, "row", '{"predictions":[2.5,3.0]}'),
    ({"y": np.array([[0.1, 1e-5]], np.float32)}, "row", '{"predictions":[[0.1,0.00001]]}'),
    ({"y": np.array([np.nan, np.inf, -np.inf], np.float32)}, "columnar", '{"outputs":[NaN,Infinity,-Infinity]}'),
    ({"a": np.array([1, 2], np.int64), "b": np.array([True, False])}, "row",
     '{"predictions":[{"a":1,"b":true},{"a":2,"b":false}]}'),
    ({"a": np.array([1, 2], np.int32), "b": np.array([[1.5], [2.5]], np.float32)}, "columnar",
     '{"outputs":{"a":[1,2],"b":[[1.5],[2.5]]}}'),
    ({"name": np.array([b"benign"], dtype=object), "png_bytes": np.array([b"\x89PNG"], dtype=object)}, "row",
     '{"predictions":[{"name":"benign","png_bytes":{"b64":"iVBORw=="}}]}'),
])
def test_outputs_json(outputs, fmt, expected):
    assert outputs_json(outputs, fmt) == expected


def test_float32_values_round_trip_exactly():
    a = np.random.default_rng(0).random(1000).astype(np.float32)
    back = np.asarray(json.loads(outputs_json({"y": a}, "columnar"))["outputs"], np.float32)
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize("doc,dtypes,expected,fmt", [
    ({"instances": [[1.0, 2.0], [3.0, 4.0]]}, {"x": tf.float32}, {"x": np.array([[1, 2], [3, 4]], np.float32)}, "row"),
    ({"instances": [{"b64": "aGk="}]}, {"s": tf.string}, {"s": np.array([b"hi"], dtype=object)}, "row"),
    ({"inputs": {"a": [1, 2], "b": ["x"]}}, {"a": tf.int64, "b": tf.string},
     {"a": np.array([1, 2]), "b": np.array([b"x"], dtype=object)}, "columnar"),
    ({"inputs": 3.5}, {"x": tf.float32}, {"x": np.array(3.5, np.float32)}, "columnar"),
])
def test_predict_inputs(doc, dtypes, expected, fmt):
    got, got_fmt = predict_inputs(doc, dtypes)
    assert got_fmt == fmt and set(got) == set(expected)
    for k in expected:
        assert got[k].shape == expected[k].shape and got[k].tolist() == expected[k].tolist()


@pytest.mark.parametrize("value,dtype,message", [
    ("x", tf.float32, 'JSON Value: "x" Type: String is not of expected type: float'),
    (1.5, tf.int32, "is not of expected type: int32"),
    (True, tf.float32, "Type: True is not of expected type: float"),
    ([1, [2]], tf.float32, "Encountered list at unexpected level: 1 expected < 1"),
    ([[1], 2], tf.float32, "found at incorrect level: 2 in the JSON DOM. Expected at level: 2"),
    ([[1, 2], [3]], tf.float32, "Encountered list at unexpected size: 1 at level: 1 expected size: 2"),
    ({"b64": "***"}, tf.string, "Unable to base64 decode"),
    ({"b64": "aGk=", "x": 1}, tf.string, "not formatted correctly for base64 data"),
    (2**40, tf.int32, "is not of expected type: int32"),
])
def test_bad_values(value, dtype, message):
    with pytest.raises(ServingError) as info:
        to_array(value, dtype)
    assert message in info.value.message
