"""Training diagnostics: the rules of SageMaker Debugger as one Keras callback.

``TrainingDiagnostics`` watches a run and writes ``diagnostics.json`` (every rule, whether
it fired, when and why, plus the gradient-norm history), ``diagnostics.md`` (a short
summary) and ``gradient_norms.png`` into the run folder. Rules:

- ``vanishing_gradient``: some layer's gradient norm stays below ``vanishing_threshold``
  for ``vanishing_checks`` consecutive checks;
- ``exploding_gradient``: the global gradient norm exceeds ``exploding_threshold`` or is
  not finite, or the training loss is not finite (training stops at once, with a message);
- ``overfit``: validation loss rises while training loss falls for ``overfit_epochs``
  epochs in a row;
- ``poor_weight_initialization``: before training, on a sample batch, the activation
  variance collapses or explodes across depth (last/first ratio outside
  ``[1/variance_ratio, variance_ratio]``), or more than ``dead_relu_fraction`` of a
  ReLU layer's units never fire;
- ``loss_not_decreasing``: the training loss has not improved by ``min_delta``
  (relative) over ``stall_epochs`` epochs.

Gradients are measured on a fixed sample batch every ``every_n_steps`` steps (Keras'
``fit`` does not hand gradients to callbacks), so the cost is one extra forward and
backward pass per check.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tf_bus.io import write_bytes_atomic, write_json_atomic
from tf_bus.models.unet import DeepSupervision

RULES = ("vanishing_gradient", "exploding_gradient", "overfit", "poor_weight_initialization", "loss_not_decreasing")


class TrainingDiagnostics(keras.callbacks.Callback):
    """Watches training for the Debugger rules (see the module docstring)."""

    def __init__(self, out_dir, sample_batch=None, *, every_n_steps: int = 50, vanishing_threshold: float = 1e-7,
                 vanishing_checks: int = 3, exploding_threshold: float = 1e4, overfit_epochs: int = 3,
                 stall_epochs: int = 5, min_delta: float = 1e-3, variance_ratio: float = 1e3,
                 dead_relu_fraction: float = 0.5, stop_on_nonfinite: bool = True):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.sample_batch = sample_batch
        self.every_n_steps = every_n_steps
        self.vanishing_threshold, self.vanishing_checks = vanishing_threshold, vanishing_checks
        self.exploding_threshold = exploding_threshold
        self.overfit_epochs, self.stall_epochs, self.min_delta = overfit_epochs, stall_epochs, min_delta
        self.variance_ratio, self.dead_relu_fraction = variance_ratio, dead_relu_fraction
        self.stop_on_nonfinite = stop_on_nonfinite
        self.rules: dict[str, dict[str, Any]] = {r: {"triggered": False, "details": None, "at": None} for r in RULES}
        self.grad_history: list[dict[str, Any]] = []
        self._low_streak: dict[str, int] = {}
        self._epoch_logs: list[dict[str, float]] = []
        self._step = 0
        self._plotted_checks = 0  # gradient checks drawn in gradient_norms.png so far
        self.stop_message: str | None = None

    # ------------------------------------------------------------------ helpers
    def _fire(self, rule: str, details: Any, at: str) -> None:
        if not self.rules[rule]["triggered"]:
            self.rules[rule].update(triggered=True, details=details, at=at)

    def _gradient_norms(self) -> dict[str, float]:
        """Per-kernel gradient norms on the sample batch. Under ``mixed_float16`` the loss is
        scaled by the optimizer's current loss scale before differentiating and the norms
        divided by it, as training does, so that small float16 gradients are not reported as
        vanished; where that scale overflows (the dynamic scale has not come down yet), the
        unscaled gradients are taken instead."""
        optimizer = getattr(self.model, "optimizer", None)
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            current = getattr(optimizer, "dynamic_scale", None)  # made when the optimizer is built
            scale = float(keras.ops.convert_to_numpy(current)) if current is not None else float(optimizer.initial_scale)
            norms = self._scaled_gradient_norms(scale)
            if all(math.isfinite(n) for n in norms.values()):
                return norms
        return self._scaled_gradient_norms(1.0)

    def _scaled_gradient_norms(self, scale: float) -> dict[str, float]:
        import tensorflow as tf

        x, y = self.sample_batch
        model = self.model
        with tf.GradientTape() as tape:
            if isinstance(model, DeepSupervision):  # the loss it trains on, auxiliary outputs included
                loss, _ = model.supervised_loss(x, y)
            else:
                loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
            loss = loss * scale
        vars_ = [v for v in model.trainable_variables if len(v.shape) >= 2]  # kernels, not biases/BN
        grads = tape.gradient(loss, [v.value if hasattr(v, "value") else v for v in vars_])
        return {v.path: float(tf.norm(tf.cast(g, tf.float32))) / scale for v, g in zip(vars_, grads) if g is not None}

    def _check_gradients(self, at: str) -> None:
        norms = self._gradient_norms()
        if not norms:
            return
        total = math.sqrt(sum(n * n for n in norms.values())) if all(math.isfinite(n) for n in norms.values()) else math.inf
        self.grad_history.append({"step": self._step, "global_norm": total, "min_layer_norm": min(norms.values()),
                                  "layers": norms})
        if not math.isfinite(total) or total > self.exploding_threshold:
            self._fire("exploding_gradient", {"global_norm": total, "threshold": self.exploding_threshold}, at)
        low = []
        for name, n in norms.items():
            self._low_streak[name] = self._low_streak.get(name, 0) + 1 if n < self.vanishing_threshold else 0
            if self._low_streak[name] >= self.vanishing_checks:
                low.append(name)
        if low:
            self._fire("vanishing_gradient", {"layers": low[:20], "threshold": self.vanishing_threshold,
                                              "checks": self.vanishing_checks}, at)

    def _check_initialisation(self) -> None:
        network = self.model.unet if isinstance(self.model, DeepSupervision) else self.model
        relu_layers = [l for l in network.layers
                       if getattr(getattr(l, "activation", None), "__name__", "") == "relu"
                       or isinstance(l, keras.layers.ReLU)]
        if len(relu_layers) < 1:
            return
        try:
            inputs = network.inputs
            probe = keras.Model(inputs[0] if len(inputs) == 1 else inputs, [l.output for l in relu_layers])
        except Exception:  # not a functional graph: the rule does not apply
            return
        outs = probe(self.sample_batch[0], training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        variances = [float(np.var(np.asarray(o, np.float32))) for o in outs]
        dead = {}
        for layer, o in zip(relu_layers, outs):
            a = np.asarray(o, np.float32).reshape(-1, np.asarray(o).shape[-1])
            share = float(np.mean(a.max(axis=0) <= 0.0))
            if share > self.dead_relu_fraction:
                dead[layer.name] = share
        first, last = variances[0], variances[-1]
        ratio = last / first if first > 0 else math.inf
        details = {"activation_variance_first": first, "activation_variance_last": last, "ratio": ratio,
                   "dead_relu_layers": dead}
        if len(variances) > 1 and (ratio < 1 / self.variance_ratio or ratio > self.variance_ratio):
            self._fire("poor_weight_initialization", {**details, "reason": "activation variance collapses or "
                                                      "explodes across depth"}, "start")
        elif dead:
            self._fire("poor_weight_initialization", {**details, "reason": "dead ReLUs"}, "start")
        self.rules["poor_weight_initialization"].setdefault("measured", details)

    # ------------------------------------------------------------------ Keras hooks
    def on_train_begin(self, logs=None):
        if self.sample_batch is not None:
            self._check_initialisation()
            self._check_gradients("start")

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._fire("exploding_gradient", {"loss": float(loss), "reason": "non-finite training loss"},
                       f"step {self._step}")
            if self.stop_on_nonfinite and not self.stop_message:
                self.stop_message = (f"training stopped at step {self._step}: the loss became {float(loss)}. "
                                     "Lower the learning rate, check the inputs for NaN/inf, or clip gradients.")
                print(f"\ntf-bus diagnostics: {self.stop_message}")
                self.model.stop_training = True
            return
        if self.sample_batch is not None and self._step % self.every_n_steps == 0:
            self._check_gradients(f"step {self._step}")

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items() if np.isscalar(v)}
        self._epoch_logs.append(logs)
        hist = self._epoch_logs
        k = self.overfit_epochs
        if len(hist) > k and all("val_loss" in h for h in hist[-k - 1:]):
            seq = hist[-k - 1:]
            if all(b["val_loss"] > a["val_loss"] and b["loss"] < a["loss"] for a, b in zip(seq, seq[1:])):
                self._fire("overfit", {"val_loss": [h["val_loss"] for h in seq], "loss": [h["loss"] for h in seq]},
                           f"epoch {epoch}")
        s = self.stall_epochs
        if len(hist) > s and "loss" in hist[-1]:
            before = min(h["loss"] for h in hist[:-s])
            recent = min(h["loss"] for h in hist[-s:])
            if not recent < before - self.min_delta * abs(before):
                self._fire("loss_not_decreasing", {"best_before": before, f"best_last_{s}_epochs": recent,
                                                   "min_delta": self.min_delta}, f"epoch {epoch}")
        self.write()

    def on_train_end(self, logs=None):
        self.write()

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        return {"rules": self.rules, "stop_message": self.stop_message, "gradient_checks": len(self.grad_history),
                "gradient_history": [{k: v for k, v in h.items() if k != "layers"} for h in self.grad_history],
                "last_layer_norms": self.grad_history[-1]["layers"] if self.grad_history else {}}

    def write(self) -> None:
        rep = self.report()
        write_json_atomic(self.out_dir / "diagnostics.json", json.loads(json.dumps(rep, default=float)))
        lines = ["# Training diagnostics", "", "| rule | fired | when | details |", "|---|---|---|---|"]
        for name, r in self.rules.items():
            details = json.dumps(r["details"], default=float)[:160] if r["details"] else ""
            lines.append(f"| {name} | {'**yes**' if r['triggered'] else 'no'} | {r['at'] or ''} | {details} |")
        if self.stop_message:
            lines += ["", f"Stopped: {self.stop_message}"]
        if self.grad_history:
            lines += ["", "![gradient norms](gradient_norms.png)"]
            if len(self.grad_history) != self._plotted_checks:  # redraw only with new checks (0.14 s a plot)
                self._plot()
                self._plotted_checks = len(self.grad_history)
        write_bytes_atomic(self.out_dir / "diagnostics.md", ("\n".join(lines) + "\n").encode())

    def _plot(self) -> None:
        from tf_bus.plots import save_png, subplots

        steps = [h["step"] for h in self.grad_history]
        fig, ax = subplots(figsize=(6, 3.2))
        ax.semilogy(steps, [max(h["global_norm"], 1e-30) for h in self.grad_history], label="global norm")
        ax.semilogy(steps, [max(h["min_layer_norm"], 1e-30) for h in self.grad_history], label="smallest layer norm")
        ax.axhline(self.vanishing_threshold, color="grey", ls="--", lw=0.8, label="vanishing threshold")
        ax.set_xlabel("step")
        ax.set_ylabel("gradient norm (sample batch)")
        ax.legend(fontsize=7)
        save_png(fig, self.out_dir / "gradient_norms.png", dpi=90)
