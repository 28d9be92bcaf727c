"""Small BUSI-like data in the release layout, for unit tests and the no-data demo.

Images are speckled (Rayleigh) tissue texture with a brighter skin band on top and
depth attenuation; lesions are dark (hypoechoic): round and smooth for benign,
irregular with spiky margins and posterior shadowing for malignant; normal images
have none (all-zero mask). A few benign cases have two lesions, stored as
``_mask.png`` + ``_mask_1.png`` like the release. Masks are stored in the modes the
release uses (1-bit, 8-bit grey, RGB, plus RGBA and palette) so readers are exercised.
One near-duplicate frame pair is included so duplicate grouping has work to do.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from tf_bus.config import CLASS_NAMES
from tf_bus.data.busi import RELEASE_DIRNAME, TfBusError
from tf_bus.io import atomic_directory

_MASK_MODES = ("L", "1", "RGB", "RGBA", "P")


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    small = rng.random((max(2, h // scale), max(2, w // scale)))
    return np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32) / 255.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    tissue = 0.55 + 0.25 * _smooth_noise(rng, h, w, 24) - 0.35 * yy  # attenuation with depth
    skin = h // 12
    tissue[:skin] += 0.25
    speckle = rng.rayleigh(0.6, (h, w)).astype(np.float32)
    return np.clip(tissue * speckle, 0, None)


def _lesion_mask(rng: np.random.Generator, h: int, w: int, label: str, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    if label == "benign":
        ry = r * rng.uniform(0.6, 0.9)
        radius = r * ry / np.sqrt((ry * np.cos(theta)) ** 2 + (r * np.sin(theta)) ** 2)
    else:  # malignant: irregular, spiculated margin
        radius = np.full_like(theta, r)
        for k in range(2, 9):
            radius += r * rng.uniform(0.04, 0.16) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
        radius += r * 0.12 * np.maximum(0, np.sin(13 * theta + rng.uniform(0, 6.3)))
    return (np.hypot(yy - cy, xx - cx) <= radius).astype(np.uint8)


def _render(rng: np.random.Generator, h: int, w: int, label: str, lesions: int) -> tuple[np.ndarray, list[np.ndarray]]:
    img = _background(rng, h, w)
    masks = []
    for _ in range(lesions if label != "normal" else 0):
        r = rng.uniform(0.08, 0.18) * min(h, w)
        cy = rng.uniform(0.3, 0.65) * h
        cx = rng.uniform(0.25, 0.75) * w
        m = _lesion_mask(rng, h, w, label, cy, cx, r)
        darkness = 0.15 if label == "benign" else 0.3
        img = np.where(m > 0, img * darkness + 0.02 * rng.random((h, w)), img)
        if label == "malignant":  # posterior acoustic shadow below the lesion
            cols = m.any(axis=0)
            below = np.arange(h)[:, None] > (cy + r)
            img = np.where(below & cols[None, :], img * 0.55, img)
        masks.append(m)
    img8 = np.clip(img / max(float(np.percentile(img, 99.5)), 1e-6) * 255, 0, 255).astype(np.uint8)
    return img8, masks


def _save_mask(m: np.ndarray, path: Path, mode: str) -> None:
    m255 = (m * 255).astype(np.uint8)
    if mode == "1":
        Image.fromarray(m255).convert("1").save(path)
    elif mode == "RGB":
        Image.fromarray(np.repeat(m255[..., None], 3, -1)).save(path)
    elif mode == "RGBA":
        Image.fromarray(np.dstack([m255, m255, m255, np.full_like(m255, 255)])).save(path)
    elif mode == "P":
        Image.fromarray(m255).convert("P").save(path)
    else:
        Image.fromarray(m255).save(path)


def class_sizes(n: int) -> dict[str, int]:
    """BUSI's class proportions (benign 56%, malignant 27%, normal 17%), each >= 3."""
    n = max(n, 9)
    malignant = max(3, round(n * 0.27))
    normal = max(3, round(n * 0.17))
    return {"benign": n - malignant - normal, "malignant": malignant, "normal": normal}


def make_synthetic(out_dir: str | os.PathLike, n: int = 30, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Writes ``n`` synthetic cases as ``out_dir/Dataset_BUSI_with_GT/<class>/...``.

    Args:
        out_dir: output folder (created; refused if it exists unless ``overwrite``).
        n: number of cases (at least 9; split across classes as in BUSI).
        seed: random seed; the same seed gives the same files.

    Returns:
        The path of the ``Dataset_BUSI_with_GT`` folder written.
    """
    if n < 9:
        raise TfBusError(f"`--n` must be at least 9 (3 cases per class). Received: n={n}")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise TfBusError(f"{out}: already exists. Pass --overwrite to replace it.")
    rng = np.random.default_rng(seed)
    sizes = class_sizes(n)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        root = tmp / RELEASE_DIRNAME
        k_mask = 0
        for label in CLASS_NAMES:
            folder = root / label
            folder.mkdir(parents=True)
            for i in range(1, sizes[label] + 1):
                h, w = int(rng.integers(120, 200)), int(rng.integers(160, 240))
                lesions = 2 if (label == "benign" and i % 7 == 3) else 1
                img, masks = _render(rng, h, w, label, lesions)
                name = f"{label} ({i})"
                if label == "benign" and i == 2:
                    # A near-duplicate frame of case 1: same scene, a little new speckle.
                    prev = np.asarray(Image.open(folder / f"{label} (1).png"))
                    img = np.clip(prev.astype(np.int16) + rng.integers(-6, 7, prev.shape), 0, 255).astype(np.uint8)
                    masks = [np.asarray(Image.open(folder / f"{label} (1)_mask.png").convert("L")) > 127]
                    masks = [m.astype(np.uint8) for m in masks]
                    h, w = img.shape[:2]
                Image.fromarray(np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img).save(folder / f"{name}.png")
                if not masks:
                    masks = [np.zeros((h, w), np.uint8)]
                for j, m in enumerate(masks):
                    suffix = "_mask" if j == 0 else f"_mask_{j}"
                    mode = "L" if (label == "benign" and i <= 2) else _MASK_MODES[k_mask % len(_MASK_MODES)]
                    k_mask += 1
                    _save_mask(m, folder / f"{name}{suffix}.png", mode)
    return out / RELEASE_DIRNAME
