"""tf.distribute strategies for the trainers (``--strategy``).

- ``default``: TensorFlow's default strategy (one device, no wrapping);
- ``onedevice``: ``OneDeviceStrategy`` on the first GPU, else the CPU;
- ``mirrored``: ``MirroredStrategy`` over every GPU, or over every logical CPU device when
  there is no GPU (split one CPU into N logical devices with
  ``tf.config.set_logical_device_configuration`` before TensorFlow starts, as the tests do).

``--batch-size`` is the global batch: each of R replicas gets ``batch_size / R`` rows of
it (it must divide evenly). The learning rate belongs to the global batch, so keeping the
global batch while adding replicas changes nothing; if you grow the global batch with the
replicas, scale the learning rate by the same factor (the linear scaling rule).
"""

from __future__ import annotations

from tf_bus.config import ConfigError

STRATEGIES = ("default", "onedevice", "mirrored")


def make_strategy(name: str):
    """The ``tf.distribute.Strategy`` called ``name`` (see the module docstring)."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "onedevice":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    raise ConfigError(f"`strategy` must be one of {', '.join(STRATEGIES)}. Received: strategy={name!r}")


def check_global_batch(batch_size: int, replicas: int) -> None:
    if batch_size % replicas:
        raise ConfigError(f"`batch_size` {batch_size} is the global batch and must divide evenly over the "
                          f"{replicas} replicas of the strategy; use a multiple of {replicas}.")
