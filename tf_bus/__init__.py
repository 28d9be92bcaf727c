"""tf-bus: breast ultrasound (BUSI) lesion segmentation and classification.

Pipeline stages, in data-flow order: ``tf_bus.data`` (read the release, split, write the
layouts, tf.data loaders, synthetic data, EDA), then models, training, evaluation,
export and serving.
"""

__version__ = "0.1.0"
