"""Reading and validating the release: mask/image modes, every bad-input case."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tf_bus.data.busi import (
    BusiDataError,
    TfBusError,
    find_release_root,
    image_to_array,
    load_mask,
    mask_to_binary,
    read_release,
    scan_release,
)
from conftest import tree_digest

_M = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)  # expected {0,1} mask

# (mode, how to build the PIL mask from _M)
MASK_CASES = [
    ("1", lambda m: Image.fromarray(m * 255).convert("1")),
    ("L 0/255", lambda m: Image.fromarray(m * 255)),
    ("L 0/1", lambda m: Image.fromarray(m)),
    ("LA", lambda m: Image.fromarray(np.dstack([m * 255, np.full_like(m, 255)]), "LA")),
    ("RGB", lambda m: Image.fromarray(np.dstack([m * 255] * 3))),
    ("RGB red lesion", lambda m: Image.fromarray(np.dstack([m * 255, m * 0, m * 0]))),
    ("RGBA", lambda m: Image.fromarray(np.dstack([m * 255] * 3 + [np.full_like(m, 255)]))),
    ("RGBA alpha-only", lambda m: Image.fromarray(np.dstack([np.full_like(m, 255)] * 3 + [m * 255]))),
    ("P", lambda m: Image.fromarray(m * 255).convert("P")),
    ("I;16", lambda m: Image.fromarray(m.astype(np.uint16) * 65535)),
]


@pytest.mark.parametrize("name,build", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_mask_modes_normalise_to_binary(name, build, tmp_path):
    path = tmp_path / "m.png"
    build(_M).save(path)
    with Image.open(path) as im:
        got = mask_to_binary(im)
    np.testing.assert_array_equal(got, _M)


def test_all_zero_mask_stays_zero():
    assert mask_to_binary(Image.new("L", (4, 3))).sum() == 0


IMAGE_MODES = ["L", "RGB", "RGBA", "P", "LA", "CMYK", "I;16", "1"]


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_images_of_any_mode_become_uint8_rgb(mode):
    base = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8) * 5)
    im = base.convert(mode) if mode != "I;16" else Image.fromarray((np.arange(48).reshape(6, 8) * 1000).astype(np.uint16))
    a = image_to_array(im)
    assert a.shape == (6, 8, 3) and a.dtype == np.uint8
    assert a.max() > a.min()


def test_masks_of_a_case_are_united(tmp_path):
    a = np.zeros((4, 4), np.uint8); a[0, 0] = 255
    b = np.zeros((4, 4), np.uint8); b[3, 3] = 255
    Image.fromarray(a).save(tmp_path / "x_mask.png")
    Image.fromarray(b).convert("1").save(tmp_path / "x_mask_1.png")
    m = load_mask((str(tmp_path / "x_mask.png"), str(tmp_path / "x_mask_1.png")))
    assert m.sum() == 2 and m[0, 0] == 1 and m[3, 3] == 1


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "Dataset_BUSI_with_GT"
    shutil.copytree(src, dst)
    return dst


def _break_mask_without_image(r: Path) -> str:
    p = r / "benign" / "benign (5).png"; p.unlink(); return str(p.with_name("benign (5)_mask.png"))


def _break_image_without_mask(r: Path) -> str:
    p = r / "malignant" / "malignant (2)_mask.png"; p.unlink(); return str(r / "malignant" / "malignant (2).png")


def _break_size_mismatch(r: Path) -> str:
    p = r / "benign" / "benign (4)_mask.png"; Image.new("L", (17, 11)).save(p); return str(p)


def _break_truncated(r: Path) -> str:
    p = r / "benign" / "benign (6).png"; data = p.read_bytes(); p.write_bytes(data[: len(data) // 2]); return str(p)


def _break_garbage_image(r: Path) -> str:
    p = r / "normal" / "normal (1).png"; p.write_bytes(b"this is not a png"); return str(p)


def _break_empty_class(r: Path) -> str:
    for f in (r / "normal").iterdir():
        f.unlink()
    return str(r / "normal")


def _break_unknown_class(r: Path) -> str:
    (r / "cancer").mkdir(); return str(r / "cancer")


def _break_non_image(r: Path) -> str:
    p = r / "benign" / "notes.txt"; p.write_text("hello"); return str(p)


BAD_CASES = [
    ("mask_without_image", _break_mask_without_image),
    ("image_without_mask", _break_image_without_mask),
    ("size_mismatch", _break_size_mismatch),
    ("unreadable", _break_truncated),
    ("unreadable", _break_garbage_image),
    ("empty_class", _break_empty_class),
    ("unknown_class", _break_unknown_class),
    ("not_an_image", _break_non_image),
]


@pytest.mark.parametrize("kind,breaker", BAD_CASES, ids=[b.__name__[7:] for _, b in BAD_CASES])
def test_bad_input_is_named_and_skippable(kind, breaker, synthetic_release, tmp_path):
    root = _copy(synthetic_release, tmp_path)
    bad_path = breaker(root)
    before = tree_digest(root)
    with pytest.raises(BusiDataError) as err:
        read_release(root)
    assert bad_path in str(err.value), str(err.value)
    assert any(p.kind == kind and p.path == bad_path for p in err.value.problems)
    assert "--skip-bad" in str(err.value)
    result = read_release(root, skip_bad=True)
    assert any(p.kind == kind and p.path == bad_path for p in result.problems)
    assert result.infos, "the good cases are still read"
    assert all(bad_path not in (i.case.image_path,) + i.case.mask_paths for i in result.infos)
    assert tree_digest(root) == before, "nothing under the input is modified"


def test_scan_pairs_multi_masks_and_sorts_naturally(synthetic_release):
    scan = scan_release(synthetic_release)
    assert not scan.problems
    ids = [c.case_id for c in scan.cases if c.label == "benign"]
    assert ids[:3] == ["benign/benign (1)", "benign/benign (2)", "benign/benign (3)"]
    multi = [c for c in scan.cases if len(c.mask_paths) > 1]
    assert multi and all(p.endswith(("_mask.png", "_mask_1.png")) for c in multi for p in c.mask_paths)


@pytest.mark.parametrize("where", ["release", "parent"])
def test_release_root_found_from_itself_or_parent(where, synthetic_release):
    path = synthetic_release if where == "release" else synthetic_release.parent
    assert find_release_root(path) == synthetic_release


ILL_ROOTS = [("missing", "no such directory"), ("empty", "not a BUSI release")]


@pytest.mark.parametrize("what,message", ILL_ROOTS)
def test_bad_roots_raise_clear_errors(what, message, tmp_path):
    path = tmp_path / what
    if what == "empty":
        path.mkdir()
    with pytest.raises(TfBusError, match=message):
        find_release_root(path)


@pytest.mark.parametrize("given, expected", [
    (["folder"], ["folder/case 2.png", "folder/case 10.JPG", "folder/scan.bmp"]),  # natural order, no masks
    (["folder/case 10_mask.png"], ["folder/case 10_mask.png"]),  # a file named explicitly is read as it is
    (["one.png", "folder", "one.png"], ["one.png", "folder/case 2.png", "folder/case 10.JPG", "folder/scan.bmp",
                                         "one.png"]),
])
def test_image_arguments_expand_folders_to_their_images(given, expected, tmp_path):
    from tf_bus.data.busi import image_files

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for name in ("case 10.JPG", "case 2.png", "case 2_mask.png", "case 10_mask.png", "case 10_mask_1.png",
                 "scan.bmp", "notes.txt", "sub/deeper.png"):
        (folder / name).write_bytes(b"x")
    (tmp_path / "one.png").write_bytes(b"x")
    assert image_files([tmp_path / g for g in given]) == [tmp_path / e for e in expected]


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such image file or folder"),
    (lambda p: p.mkdir(), "a folder without images; it should hold png/jpg/jpeg/bmp files other than masks"),
    (lambda p: (p.mkdir(), (p / "a_mask.png").write_bytes(b"x")), "a folder without images"),
])
def test_image_arguments_that_name_no_image_are_refused(make, message, tmp_path):
    from tf_bus.data.busi import image_files

    make(tmp_path / "x")
    with pytest.raises(TfBusError, match=message):
        image_files([tmp_path / "x"])
