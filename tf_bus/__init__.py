"""tf-bus: breast ultrasound (BUSI) lesion segmentation and classification.

Pipeline stages, in data-flow order: ``tf_bus.data`` (read the release, split, write the
layouts, tf.data loaders, synthetic data, EDA), then models, training, evaluation,
export and serving.
"""

import os as _os

__version__ = "0.1.0"

# oneDNN's CPU kernels. On Linux TensorFlow turns them on by itself only on CPUs with VNNI
# (AVX-512 or AVX), AVX-512 BF16 or AMX (DefaultOneDnnPolicy, tensorflow/core/util/port.cc);
# on a 2-core AVX2 CPU they train the default U-Net twice as fast (README,
# "oneDNN"). This takes effect only where TensorFlow is not imported yet (`tf-bus`, or a
# script that imports tf_bus first); TF_ENABLE_ONEDNN_OPTS=0 in the environment keeps them off.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
