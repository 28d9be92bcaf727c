"""Models: the U-Net segmenter (and its fused batch norm), the ResNet classifier, their losses, metrics, optimizer and schedules.

Importing this package registers every custom Keras object the saved ``.keras`` files
use, so ``import tf_bus.models`` before ``keras.saving.load_model(".../best.keras")``.
"""

from tf_bus.models import classifier, losses, metrics, normalization, optimizers, schedules, unet  # noqa: F401  (registration)

__all__ = ["classifier", "losses", "metrics", "normalization", "optimizers", "schedules", "unet"]
