"""Reading and validating the BUSI release (stage 1 of the pipeline).

The release layout is::

    Dataset_BUSI_with_GT/<benign|malignant|normal>/<name>.png
                                                  /<name>_mask.png
                                                  /<name>_mask_1.png ...   (optional)

A *case* is one image with all of its masks; the masks of a case are united into one
binary lesion mask. Nothing under the release directory is ever written.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tf_bus.config import CLASS_NAMES, IMAGE_EXTENSIONS

RELEASE_DIRNAME = "Dataset_BUSI_with_GT"
_MASK_RE = re.compile(r"^(?P<stem>.+?)_mask(?:_(?P<index>\d+))?$", re.IGNORECASE)
#: Files that operating systems drop into folders; never reported as problems.
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}


class TfBusError(Exception):
    """Base class of every error tf-bus reports to a user (printed without traceback)."""


class BusiDataError(TfBusError):
    """The release has problems; ``problems`` lists each with its file and fix."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        lines = [f"{len(problems)} problem(s) in the BUSI data:"]
        lines += [f"  - {p}" for p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"  ... and {len(problems) - 20} more")
        lines.append("Fix the files listed, or pass --skip-bad to leave those cases out.")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Problem:
    """One bad input: which file, what is wrong, how to fix it."""

    path: str
    kind: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} ({self.fix})"

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Case:
    """One BUSI case.

    Attributes:
        case_id: ``"<class>/<name>"``, unique within a release.
        label: class name, one of ``CLASS_NAMES``.
        image_path: absolute path of the image.
        mask_paths: absolute paths of every mask of the case (at least one).
    """

    case_id: str
    label: str
    image_path: str
    mask_paths: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.case_id.split("/", 1)[1]

    @property
    def label_index(self) -> int:
        return CLASS_NAMES.index(self.label)


@dataclass
class CaseInfo:
    """What one read of a case learns (used for validation, duplicates, EDA).

    Attributes:
        case: the case.
        height, width: image size in pixels.
        image_mode: PIL mode of the image file.
        mask_modes: PIL modes of the mask files.
        sha256: hash of the decoded grey pixels (finds exact duplicates whatever the
            file encoding).
        thumbnail: uint8 (thumb_size, thumb_size) grey thumbnail.
        lesion_fraction: share of pixels inside the united mask.
        lesion_components: number of masks the case has.
    """

    case: Case
    height: int
    width: int
    image_mode: str
    mask_modes: tuple[str, ...]
    sha256: str
    thumbnail: np.ndarray
    lesion_fraction: float
    lesion_components: int


@dataclass
class ScanResult:
    """The cases found under a release root, and the problems met on the way."""

    root: str
    cases: list[Case]
    problems: list[Problem]

    def by_id(self) -> dict[str, Case]:
        return {c.case_id: c for c in self.cases}


def find_release_root(path: str | os.PathLike) -> Path:
    """Returns the folder that holds the class folders.

    Accepts the ``Dataset_BUSI_with_GT`` folder itself or a folder that contains it.

    Raises:
        TfBusError: when no class folder is found.
    """
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise TfBusError(f"{p}: no such directory. Pass the path of {RELEASE_DIRNAME}/.")
    if not p.is_dir():
        raise TfBusError(f"{p}: is a file, not a directory. Pass the path of {RELEASE_DIRNAME}/.")
    if (p / RELEASE_DIRNAME).is_dir():
        p = p / RELEASE_DIRNAME
    if not any((p / c).is_dir() for c in CLASS_NAMES):
        raise TfBusError(
            f"{p}: not a BUSI release: none of the class folders {', '.join(CLASS_NAMES)} "
            f"is there. Pass the {RELEASE_DIRNAME}/ folder (or its parent)."
        )
    return p


def scan_release(path: str | os.PathLike) -> ScanResult:
    """Lists the cases of a release from file names alone (no pixel is read).

    Problems found here: unknown class folder, missing or empty class folder, stray
    non-image file, mask without image, image without mask.

    Args:
        path: the release folder or its parent.

    Returns:
        A ``ScanResult``; cases are sorted by ``case_id`` (natural number order).
    """
    root = find_release_root(path)
    problems: list[Problem] = []
    cases: list[Case] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and entry.name not in CLASS_NAMES:
            problems.append(Problem(
                str(entry), "unknown_class",
                f"unknown class folder '{entry.name}'",
                f"BUSI classes are {', '.join(CLASS_NAMES)}; rename or move the folder out",
            ))
        elif entry.is_file() and entry.name.lower() not in _IGNORED_FILES:
            problems.append(Problem(
                str(entry), "stray_file", "file outside the class folders",
                "move it out of the release folder",
            ))
    for label in CLASS_NAMES:
        folder = root / label
        if not folder.is_dir():
            problems.append(Problem(
                str(folder), "missing_class", f"class folder '{label}' is missing",
                f"restore {label}/ from the BUSI release",
            ))
            continue
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = {}
        for f in folder.iterdir():
            if f.name.startswith(".") or f.name.lower() in _IGNORED_FILES:
                continue
            if f.is_dir():
                problems.append(Problem(
                    str(f), "stray_dir", "folder inside a class folder",
                    "move it out: a class folder holds only images and masks",
                ))
                continue
            stem, ext = os.path.splitext(f.name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                problems.append(Problem(
                    str(f), "not_an_image",
                    f"not an image file (extension '{ext or '(none)'}')",
                    f"remove it; images must be one of {', '.join(IMAGE_EXTENSIONS)}",
                ))
                continue
            m = _MASK_RE.match(stem)
            if m:
                index = int(m.group("index") or 0)
                masks.setdefault(m.group("stem"), []).append((index, f))
            else:
                images[stem] = f
        if not images and not masks:
            problems.append(Problem(
                str(folder), "empty_class", f"class folder '{label}' holds no images",
                f"restore the {label} images from the BUSI release or remove the folder",
            ))
        for stem, mask_list in masks.items():
            if stem not in images:
                for _, mpath in sorted(mask_list):
                    problems.append(Problem(
                        str(mpath), "mask_without_image",
                        f"mask without image (expected {stem}.png beside it)",
                        "restore the image or remove the mask",
                    ))
        for stem, ipath in images.items():
            if stem not in masks:
                problems.append(Problem(
                    str(ipath), "image_without_mask",
                    f"image without mask (expected {stem}_mask.png beside it)",
                    "add its mask (an all-black mask for a normal image) or remove the image",
                ))
                continue
            mask_paths = tuple(str(p) for _, p in sorted(masks[stem]))
            cases.append(Case(f"{label}/{stem}", label, str(ipath), mask_paths))
    cases.sort(key=lambda c: _natural_key(c.case_id))
    return ScanResult(str(root), cases, problems)


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def image_files(paths) -> list[Path]:
    """The images that commands taking ``IMAGE...`` read: a file is itself; a folder gives
    its image files (``IMAGE_EXTENSIONS``, not recursing, in natural order) without those
    named like BUSI masks (``<name>_mask.png``, ``<name>_mask_1.png``), so a BUSI class
    folder gives its ultrasound images. Refuses, naming it, a path that does not exist and
    a folder without images."""
    files: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted((f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                            and not _MASK_RE.match(f.stem)), key=lambda f: _natural_key(f.name))
            if not found:
                raise TfBusError(f"{path}: a folder without images; it should hold "
                                 f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} files other than masks.")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise TfBusError(f"{path}: no such image file or folder.")
    return files


def _open(path: str) -> tuple[Image.Image, str]:
    """Opens and fully decodes an image file, so that truncation is found here.

    Returns the decoded image (palette images expanded to RGBA) and the file's mode.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return (im.copy() if im.mode != "P" else im.convert("RGBA")), im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _ReadError(path, str(e) or type(e).__name__) from None


class _ReadError(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def image_to_array(im: Image.Image) -> np.ndarray:
    """Converts a PIL image of any mode to uint8 RGB, shape (H, W, 3)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        a = a.astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


def mask_to_binary(im: Image.Image) -> np.ndarray:
    """Normalises a mask of any mode (1, L, LA, RGB, RGBA, P, I;16) to {0, 1}, (H, W).

    Foreground is where the grey level exceeds half the mask's maximum (so masks
    stored as {0, 1} and as {0, 255} both work); where the mask has an alpha
    channel, fully transparent pixels are background.
    """
    alpha = None
    if im.mode in ("LA", "RGBA", "PA"):
        alpha = np.asarray(im.getchannel("A"))
    if im.mode == "1":
        grey = np.asarray(im, dtype=np.uint8)
    elif im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = np.asarray(im, dtype=np.float64)
    else:
        grey = np.asarray(im.convert("L"))
    peak = float(grey.max()) if grey.size else 0.0
    out = (grey > peak / 2.0) if peak > 0 else np.zeros(grey.shape, bool)
    if alpha is not None and alpha.min() < alpha.max():
        out &= alpha > 0
    return out.astype(np.uint8)


def load_image(path: str) -> np.ndarray:
    """Reads an image file of any PIL mode as uint8 RGB, shape (H, W, 3).

    Raises:
        TfBusError: naming the file when it is unreadable or truncated.
    """
    try:
        return image_to_array(_open(path)[0])
    except _ReadError as e:
        raise TfBusError(f"{e.path}: unreadable image ({e.reason}). Replace the file.") from None


def load_mask(paths: str | tuple[str, ...] | list[str]) -> np.ndarray:
    """Reads and unites the masks of a case: uint8 {0, 1}, shape (H, W).

    Raises:
        TfBusError: naming the file when a mask is unreadable or the sizes differ.
    """
    if isinstance(paths, str):
        paths = (paths,)
    out = None
    for p in paths:
        try:
            m = mask_to_binary(_open(p)[0])
        except _ReadError as e:
            raise TfBusError(f"{e.path}: unreadable mask ({e.reason}). Replace the file.") from None
        if out is None:
            out = m
        elif m.shape != out.shape:
            raise TfBusError(
                f"{p}: mask size {m.shape[1]}x{m.shape[0]} differs from {paths[0]} "
                f"({out.shape[1]}x{out.shape[0]}). Re-export the masks at the image size."
            )
        else:
            out = np.maximum(out, m)
    assert out is not None
    return out


def _thumbnail(grey: np.ndarray, size: int) -> np.ndarray:
    im = Image.fromarray(grey).resize((size, size), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(im, np.uint8)


def inspect_case(case: Case, thumb_size: int = 32) -> CaseInfo | Problem:
    """Reads a case fully and checks it.

    Returns:
        A ``CaseInfo``, or a ``Problem`` (unreadable/truncated file, mask/image size
        mismatch) naming the file.
    """
    try:
        im, image_mode = _open(case.image_path)
    except _ReadError as e:
        return Problem(e.path, "unreadable", f"unreadable or truncated image ({e.reason})",
                       "replace the file with an intact copy from the release")
    rgb = image_to_array(im)
    h, w = rgb.shape[:2]
    union = np.zeros((h, w), np.uint8)
    modes = []
    for mp in case.mask_paths:
        try:
            mim, mode = _open(mp)
        except _ReadError as e:
            return Problem(e.path, "unreadable", f"unreadable or truncated mask ({e.reason})",
                           "replace the file with an intact copy from the release")
        modes.append(mode)
        if mim.size != (w, h):
            return Problem(
                mp, "size_mismatch",
                f"mask is {mim.size[0]}x{mim.size[1]} but its image is {w}x{h}",
                "re-export the mask at the image's size",
            )
        union = np.maximum(union, mask_to_binary(mim))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    digest = hashlib.sha256(grey.tobytes() + f"{h}x{w}".encode()).hexdigest()
    return CaseInfo(
        case=case, height=h, width=w, image_mode=image_mode, mask_modes=tuple(modes),
        sha256=digest, thumbnail=_thumbnail(grey, thumb_size),
        lesion_fraction=float(union.mean()), lesion_components=len(case.mask_paths),
    )


@dataclass
class ReadResult:
    """A fully read release: per-case information plus every problem found."""

    root: str
    infos: list[CaseInfo]
    problems: list[Problem]

    @property
    def cases(self) -> list[Case]:
        return [i.case for i in self.infos]


def read_release(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    thumb_size: int = 32,
    workers: int = 4,
) -> ReadResult:
    """Scans, reads and validates a release.

    Args:
        path: the release folder or its parent.
        skip_bad: if True, bad cases are left out and listed in ``problems``; if False,
            any problem raises.
        thumb_size: thumbnail side for duplicate detection.
        workers: threads decoding images (PIL releases the GIL while decoding).

    Raises:
        BusiDataError: listing every problem, when ``skip_bad`` is False.
    """
    scan = scan_release(path)
    problems = list(scan.problems)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda c: inspect_case(c, thumb_size), scan.cases))
    infos = [r for r in results if isinstance(r, CaseInfo)]
    problems += [r for r in results if isinstance(r, Problem)]
    if not infos and not problems:
        problems.append(Problem(scan.root, "no_cases", "no cases found",
                                "point to a BUSI release with images and masks"))
    if problems and not skip_bad:
        raise BusiDataError(problems)
    if not infos:
        raise BusiDataError(problems + [Problem(
            scan.root, "no_cases", "no usable case left", "fix the files listed")])
    return ReadResult(scan.root, infos, problems)
