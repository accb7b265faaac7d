"""Trial records: the shipped corpus, validation on load, and the fixed train/validation/test split by NCT id."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from absl import logging

from ctelm_jax.errors import MissingInput

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "clinical_trials.jsonl.gz"
REQUIRED: dict[str, type] = {"nctid": str, "phase": str, "status": str, "diseases": list, "drugs": list,
                             "criteria": str}
OPTIONAL: dict[str, Any] = {"why_stop": ""}
SPLITS: tuple[str, ...] = ("train", "validation", "test")
Split = Literal["train", "validation", "test"]


def split_of(nctid: str) -> Split:
    """The record's split, fixed by a stable hash of its NCT id: 90% train, 5% validation, 5% test."""
    bucket = int.from_bytes(hashlib.sha256(nctid.strip().upper().encode()).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _utf8_clean(value: Any) -> bool:
    """True if every string inside `value` encodes as UTF-8 (no lone surrogates from bad JSON escapes)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, list):
        return all(_utf8_clean(v) for v in value)
    if isinstance(value, dict):
        return all(_utf8_clean(k) and _utf8_clean(v) for k, v in value.items())
    return True


def validate(record: Any) -> str | None:
    """Why `record` is not a usable trial record, or None if it is."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key, kind in REQUIRED.items():
        if key not in record or record[key] is None:
            return f"missing field {key}"
        if not isinstance(record[key], kind):
            return f"field {key} is not a {kind.__name__}"
    if not all(isinstance(x, str) for x in record["diseases"] + record["drugs"]):
        return "diseases/drugs hold non-strings"
    if not record["nctid"].strip():
        return "empty nctid"
    if not record["criteria"].strip():
        return "empty criteria"
    if not _utf8_clean(record):
        return "non-UTF-8 text"
    return None


def _lines(path: Path) -> Iterator[bytes]:
    """Raw lines of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        yield from f


def clean_records(raw: Iterable[Any], source: str = "records") -> list[dict]:
    """Valid records of `raw` (optional fields defaulted, duplicates dropped); skipped ones are counted and logged."""
    out: list[dict] = []
    seen: set[str] = set()
    skipped: collections.Counter[str] = collections.Counter()
    for record in raw:
        reason = validate(record)
        if reason is None and record["nctid"] in seen:
            reason = "duplicate nctid"
        if reason is not None:
            skipped[reason] += 1
            continue
        seen.add(record["nctid"])
        out.append({**OPTIONAL, **record})
    for reason, n in sorted(skipped.items()):
        logging.warning("%s: skipped %d record(s): %s", source, n, reason)
    if not out:
        raise ValueError(f"{source}: no valid trial records (skipped: {dict(skipped)}); each record needs "
                         f"{sorted(REQUIRED)} with non-empty criteria.")
    logging.info("%s: %d valid records, %d skipped", source, len(out), sum(skipped.values()))
    return out


def _parse(lines: Iterable[bytes], counts: collections.Counter[str]) -> Iterator[Any]:
    """JSON values of non-blank lines; lines that are not UTF-8 or not JSON are counted in `counts` and skipped."""
    for line in lines:
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            counts["non-UTF-8 bytes"] += 1
            continue
        try:
            yield json.loads(text)
        except json.JSONDecodeError:
            counts["invalid JSON"] += 1


def load_records(path: str | os.PathLike = SHIPPED) -> list[dict]:
    """Valid trial records of a .jsonl or .jsonl.gz file; invalid lines are skipped with a logged, counted reason."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: no such corpus file; pass a .jsonl(.gz) of trial records (see "
                                f"data/README.md, or import ClinicalTrials.gov exports with ctelm_jax.data.ctgov).")
    bad: collections.Counter[str] = collections.Counter()
    records = list(_parse(_lines(path), bad))
    for reason, n in sorted(bad.items()):
        logging.warning("%s: skipped %d line(s): %s", path, n, reason)
    if not records:
        raise ValueError(f"{path}: no valid trial records (skipped lines: {dict(bad)}).")
    return clean_records(records, str(path))


def write_records(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Writes records as JSON lines (gzip if the name ends in .gz); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    n = 0
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n
