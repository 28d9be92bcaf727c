"""Models: the U-Net segmenter (and, next, the ResNet classifier), losses and metrics."""
