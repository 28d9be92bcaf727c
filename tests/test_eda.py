"""EDA: JSON statistics and PNG charts for a prepared folder and for a raw release."""

from __future__ import annotations

import json

import pytest

from tf_bus.data.eda import eda


@pytest.mark.parametrize("source", ["prepared", "release"])
def test_eda_writes_json_and_pngs(source, prepared, synthetic_release, tmp_path):
    data = prepared if source == "prepared" else synthetic_release
    stats = eda(data, tmp_path / "eda")
    for name in ("class_counts.png", "image_sizes.png", "lesion_area.png"):
        png = (tmp_path / "eda" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    saved = json.loads((tmp_path / "eda" / "eda.json").read_text())
    assert saved["class_counts_before_balancing"] == stats["class_counts_before_balancing"]
    total = sum(sum(v.values()) for v in stats["class_counts_before_balancing"].values())
    assert total == 36 and stats["image_height"]["count"] == 36
    assert stats["images_with_empty_mask"]["normal"] == 6
    assert stats["lesion_area_fraction"]["benign"]["median"] > 0
    if source == "prepared":
        manifest = json.loads((prepared / "manifest.json").read_text())
        assert stats["class_counts_after_balancing"] == manifest["counts_after_balancing"]
