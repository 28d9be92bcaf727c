"""Learning-rate schedules saved with the models' optimizers."""

from __future__ import annotations

import math
import weakref

import keras


@keras.saving.register_keras_serializable(package="tf_bus")
class BudgetedCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 1% of ``peak`` over ``warmup_steps``, then cosine decay to
    ``alpha * peak``, driven by the further along of two progress measures: steps done
    over ``total_steps`` (Keras's ``CosineDecay`` with warm-up), and the share of the
    wall-time budget spent, which ``TimeBudget`` writes to ``time_progress`` every batch.
    So a run that a slow host stops at its time budget has still annealed to the
    minimum, instead of ending mid-schedule at a high learning rate ("budgeted training",
    Li et al., ICLR 2020). With no budget (``time_progress`` stays 0) it is CosineDecay.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, alpha: float = 0.01):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(1, int(total_steps))
        self.alpha = float(alpha)
        self.time_progress = keras.Variable(0.0, dtype="float32", trainable=False, name="time_progress")
        self._per_graph: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, step):
        """The learning rate at ``step``. Traced with the optimizer's step counter, it is
        built once per graph: AdamW reads the learning rate once for every variable it
        decays (222 times a ResNet50 step), which traced this schedule 222 times (about
        5 s of every ResNet50 train-step trace) and ran it 222 times a step."""
        import tensorflow as tf

        if tf.executing_eagerly() or not isinstance(step, (keras.Variable, tf.Variable)):
            return self._compute(step)
        graph = tf.compat.v1.get_default_graph()
        hit = self._per_graph.get(graph)
        if hit is not None and hit[0] is step:
            return hit[1]
        lr = self._compute(step)
        self._per_graph[graph] = (step, lr)
        return lr

    def _compute(self, step):
        from keras import ops

        step = ops.cast(step, "float32")
        warm = float(max(self.warmup_steps, 0))
        progress = ops.maximum(step / float(self.total_steps), ops.convert_to_tensor(self.time_progress))
        decay_share = ops.clip((progress * self.total_steps - warm) / max(1.0, self.total_steps - warm), 0.0, 1.0)
        cosine = self.peak * (self.alpha + (1.0 - self.alpha) * 0.5 * (1.0 + ops.cos(math.pi * decay_share)))
        if not warm:
            return cosine
        warmup = self.peak * (0.01 + 0.99 * step / warm)
        # Warm-up is by steps, unless the clock has already passed the warm-up share.
        in_warmup = ops.logical_and(step < warm, progress * self.total_steps < warm)
        return ops.where(in_warmup, warmup, cosine)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "alpha": self.alpha}
