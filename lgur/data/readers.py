"""Readers of the official annotation files of text-based person search datasets.

CUHK-PEDES (`reid_raw.json`, or the older `captions.json` without splits),
ICFG-PEDES (`ICFG-PEDES.json`) and RSTPReid (`data_captions.json`) all become one
list of `Record`s. The synthetic world writes the CUHK-PEDES layout, so the same
reader serves it. Bad entries are counted, reported with examples, and skipped.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KNOWN_SPLITS = {"train", "val", "test", "test-paraphrase"}
# CUHK-PEDES captions.json has no split field: the standard split is by identity.
CUHK_ID_SPLITS = ((1, 11003, "train"), (11004, 12003, "val"), (12004, 13003, "test"))


@dataclass(frozen=True)
class Record:
    image_path: Path  # absolute path of the image file
    file_path: str  # path as written in the annotation file
    identity: int
    captions: tuple[str, ...]
    split: str


@dataclass
class ReadReport:
    dataset: str
    read: int = 0
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    dropped_captions: int = 0

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason].append(example)

    @property
    def skipped_total(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self, examples: int = 3) -> str:
        lines = [f"{self.dataset}: {self.read} entries read, {self.skipped_total} skipped"]
        if self.dropped_captions:
            lines.append(f"  {self.dropped_captions} empty captions dropped from otherwise valid entries")
        for reason, items in sorted(self.skipped.items()):
            shown = ", ".join(items[:examples]) + (", ..." if len(items) > examples else "")
            lines.append(f"  {len(items)} x {reason}: {shown}")
        return "\n".join(lines)


class DatasetFormatError(ValueError):
    """The annotation file is not in the expected layout; the message says what is wrong."""


def _load_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetFormatError(f"cannot read {path}: {error}") from error
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path.name} must hold a JSON list of entries, found {type(data).__name__}")
    return data


def _records(
    entries: list[Any],
    image_root: Path,
    report: ReadReport,
    path_key: str,
    split_of: Any = None,
    check_files: bool = True,
) -> list[Record]:
    records = []
    for n, entry in enumerate(entries):
        where = f"#{n}"
        if not isinstance(entry, dict):
            report.skip("entry is not an object", where)
            continue
        file_path = entry.get(path_key)
        where = f"#{n} {file_path}"
        if not isinstance(file_path, str) or not file_path:
            report.skip(f"no {path_key}", where)
            continue
        try:
            identity = int(entry.get("id"))
        except (TypeError, ValueError, OverflowError):
            report.skip("missing or non-integer id", where)
            continue
        split = split_of(identity) if split_of else entry.get("split")
        if not isinstance(split, str) or split not in KNOWN_SPLITS:
            report.skip(f"unknown split {split!r}", where)
            continue
        raw = entry.get("captions")
        if not isinstance(raw, list):
            report.skip("captions is not a list", where)
            continue
        captions = tuple(c.strip() for c in raw if isinstance(c, str) and c.strip())
        if not captions:
            report.skip("no non-empty caption", where)
            continue
        report.dropped_captions += len(raw) - len(captions)
        try:
            image_path = (image_root / file_path).resolve()
            inside = image_path.is_relative_to(image_root.resolve())
            exists = not check_files or image_path.is_file()
        except (OSError, ValueError):  # e.g. a NUL byte in the path
            report.skip("invalid image path", where)
            continue
        if not inside:
            report.skip("image path leaves the dataset folder", where)
            continue
        if not exists:
            report.skip("missing image file", where)
            continue
        records.append(Record(image_path, file_path, identity, captions, split))
        report.read += 1
    return records


def _cuhk_split(identity: int) -> str | None:
    for lo, hi, split in CUHK_ID_SPLITS:
        if lo <= identity <= hi:
            return split
    return None


def read_cuhk_pedes(root: str | Path, check_files: bool = True) -> tuple[list[Record], ReadReport]:
    """CUHK-PEDES: root/reid_raw.json (with splits) or root/captions.json; images under root/imgs/."""
    root = Path(root)
    report = ReadReport("CUHK-PEDES")
    if (root / "reid_raw.json").is_file():
        entries, split_of = _load_json_list(root / "reid_raw.json"), None
    elif (root / "captions.json").is_file():
        entries, split_of = _load_json_list(root / "captions.json"), _cuhk_split
    else:
        raise DatasetFormatError(f"{root} has neither reid_raw.json nor captions.json (CUHK-PEDES layout)")
    return _records(entries, root / "imgs", report, "file_path", split_of, check_files), report


def read_icfg_pedes(root: str | Path, check_files: bool = True) -> tuple[list[Record], ReadReport]:
    """ICFG-PEDES: root/ICFG-PEDES.json (train/test); images under root/imgs/."""
    root = Path(root)
    report = ReadReport("ICFG-PEDES")
    entries = _load_json_list(root / "ICFG-PEDES.json")
    return _records(entries, root / "imgs", report, "file_path", None, check_files), report


def read_rstpreid(root: str | Path, check_files: bool = True) -> tuple[list[Record], ReadReport]:
    """RSTPReid: root/data_captions.json with img_path; images under root/imgs/."""
    root = Path(root)
    report = ReadReport("RSTPReid")
    entries = _load_json_list(root / "data_captions.json")
    return _records(entries, root / "imgs", report, "img_path", None, check_files), report


READERS = {"cuhk-pedes": read_cuhk_pedes, "icfg-pedes": read_icfg_pedes, "rstpreid": read_rstpreid}


def detect_format(root: str | Path) -> str:
    root = Path(root)
    if (root / "ICFG-PEDES.json").is_file():
        return "icfg-pedes"
    if (root / "data_captions.json").is_file():
        return "rstpreid"
    if (root / "reid_raw.json").is_file() or (root / "captions.json").is_file():
        return "cuhk-pedes"
    raise DatasetFormatError(
        f"{root}: no known annotation file (reid_raw.json / captions.json, ICFG-PEDES.json, data_captions.json)"
    )


def read_dataset(root: str | Path, fmt: str | None = None, check_files: bool = True) -> tuple[list[Record], ReadReport]:
    """Read any supported dataset (format detected from its annotation file) and log what was skipped."""
    fmt = fmt or detect_format(root)
    if fmt not in READERS:
        raise DatasetFormatError(f"unknown dataset format {fmt!r}; choose from {sorted(READERS)}")
    records, report = READERS[fmt](root, check_files)
    if report.skipped_total or report.dropped_captions:
        log.warning(report.summary())
    return records, report
