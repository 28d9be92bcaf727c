"""Mask overlays for `tf-bus predict`: the image in grey with the predicted lesion tinted red
and outlined."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from tf_bus.io import write_bytes_atomic


def overlay(image_bytes: bytes, mask_png: bytes) -> Image.Image:
    grey = Image.open(io.BytesIO(image_bytes)).convert("L")
    mask = Image.open(io.BytesIO(mask_png)).convert("L").resize(grey.size, Image.NEAREST)
    m = np.asarray(mask) > 127
    edge = np.asarray(mask.filter(ImageFilter.FIND_EDGES)) > 0
    rgb = np.stack([np.asarray(grey)] * 3, axis=-1).astype(np.float32)
    rgb[m] = 0.6 * rgb[m] + 0.4 * np.array([255, 0, 0])
    rgb[edge] = [255, 255, 0]
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def write_overlay(image_bytes: bytes, mask_png: bytes, out_dir: Path, stem: str) -> tuple[Path, Path]:
    mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
    write_bytes_atomic(mask_path, mask_png)
    buf = io.BytesIO()
    overlay(image_bytes, mask_png).save(buf, format="PNG")
    write_bytes_atomic(overlay_path, buf.getvalue())
    return mask_path, overlay_path
