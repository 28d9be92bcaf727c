"""Training: the segmenter (and, next, the classifier and tuner), callbacks, precision."""
