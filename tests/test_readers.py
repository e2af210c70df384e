"""Dataset readers on tiny fixtures written in each dataset's official layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from lgur.data.readers import (
    DatasetFormatError,
    detect_format,
    read_cuhk_pedes,
    read_dataset,
    read_icfg_pedes,
    read_rstpreid,
)


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 40), (120, 30, 30)).save(path)


def _write(root: Path, name: str, entries: list) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(entries))


def test_cuhk_pedes_reid_raw(tmp_path: Path) -> None:
    for f in ("CUHK01/0363004.png", "CUHK03/1_1_1.jpg", "test_query/p1_s1.jpg"):
        _image(tmp_path / "imgs" / f)
    _write(
        tmp_path,
        "reid_raw.json",
        [
            {
                "split": "train",
                "captions": ["A man in a red shirt.", "He wears red."],
                "file_path": "CUHK01/0363004.png",
                "processed_tokens": [["a", "man"]],
                "id": 1,
            },
            {"split": "val", "captions": ["A woman with a bag."], "file_path": "CUHK03/1_1_1.jpg", "id": 2},
            {"split": "test", "captions": ["", "  "], "file_path": "test_query/p1_s1.jpg", "id": 3},
            {"split": "test", "captions": ["Missing file."], "file_path": "nowhere/x.jpg", "id": 4},
            {"split": "holdout", "captions": ["Odd split."], "file_path": "CUHK01/0363004.png", "id": 5},
            {"split": "train", "captions": ["Escapes."], "file_path": "../../etc/passwd", "id": 6},
        ],
    )
    records, report = read_cuhk_pedes(tmp_path)
    assert [(r.identity, r.split, len(r.captions)) for r in records] == [(1, "train", 2), (2, "val", 1)]
    assert records[0].image_path == (tmp_path / "imgs" / "CUHK01/0363004.png").resolve()
    assert report.read == 2 and report.skipped_total == 4
    assert report.skipped["no non-empty caption"] == ["#2 test_query/p1_s1.jpg"]
    assert report.skipped["missing image file"] == ["#3 nowhere/x.jpg"]
    assert report.skipped["unknown split 'holdout'"] == ["#4 CUHK01/0363004.png"]
    assert len(report.skipped["image path leaves the dataset folder"]) == 1
    text = report.summary()
    assert "4 skipped" in text and "missing image file" in text and "nowhere/x.jpg" in text


def test_cuhk_pedes_captions_json_splits_by_identity(tmp_path: Path) -> None:
    for f in ("a.jpg", "b.jpg", "c.jpg"):
        _image(tmp_path / "imgs" / f)
    _write(
        tmp_path,
        "captions.json",
        [
            {"id": 5, "file_path": "a.jpg", "captions": ["One."]},
            {"id": 11500, "file_path": "b.jpg", "captions": ["Two."]},
            {"id": 12500, "file_path": "c.jpg", "captions": ["Three."]},
        ],
    )
    records, _ = read_cuhk_pedes(tmp_path)
    assert [r.split for r in records] == ["train", "val", "test"]


def test_icfg_pedes(tmp_path: Path) -> None:
    _image(tmp_path / "imgs" / "test/0016/0016_010_01_0303morning_1505_1.jpg")
    _image(tmp_path / "imgs" / "train/0001/0001_001.jpg")
    _write(
        tmp_path,
        "ICFG-PEDES.json",
        [
            {
                "id": 16,
                "file_path": "test/0016/0016_010_01_0303morning_1505_1.jpg",
                "captions": ["The man wears black."],
                "processed_tokens": [["the"]],
                "split": "test",
            },
            {"id": 1, "file_path": "train/0001/0001_001.jpg", "captions": ["A girl."], "split": "train"},
            {"id": "x", "file_path": "train/0001/0001_001.jpg", "captions": ["Bad id."], "split": "train"},
        ],
    )
    records, report = read_icfg_pedes(tmp_path)
    assert {r.split for r in records} == {"train", "test"} and report.skipped_total == 1
    assert detect_format(tmp_path) == "icfg-pedes"


def test_rstpreid(tmp_path: Path) -> None:
    _image(tmp_path / "imgs" / "3903_c14_0007.jpg")
    _write(
        tmp_path,
        "data_captions.json",
        [
            {
                "id": 3903,
                "img_path": "3903_c14_0007.jpg",
                "captions": ["A woman in white.", "She has a bag."],
                "split": "train",
            },
            {"id": 3904, "img_path": "3904.jpg", "captions": ["Gone."], "split": "val"},
        ],
    )
    records, report = read_rstpreid(tmp_path)
    assert len(records) == 1 and records[0].captions == ("A woman in white.", "She has a bag.")
    assert report.skipped["missing image file"] == ["#1 3904.jpg"]


def test_read_dataset_reports_skips_and_rejects_unknown_layouts(tmp_path: Path, caplog) -> None:
    _write(
        tmp_path / "r", "data_captions.json", [{"id": 1, "img_path": "gone.jpg", "captions": ["x"], "split": "train"}]
    )
    with caplog.at_level(logging.WARNING):
        records, report = read_dataset(tmp_path / "r")
    assert records == [] and "1 skipped" in caplog.text
    with pytest.raises(DatasetFormatError, match="no known annotation file"):
        read_dataset(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "reid_raw.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="cannot read"):
        read_dataset(tmp_path / "bad")
    (tmp_path / "bad" / "reid_raw.json").write_text('{"a": 1}')
    with pytest.raises(DatasetFormatError, match="JSON list"):
        read_dataset(tmp_path / "bad")
