"""Importer for ClinicalTrials.gov API v2 study records (a user's own exports) into corpus records.

    python -m ctelm_jax.data.ctgov --input=studies.json --out=data/my_trials.jsonl.gz

`--input` may be an API v2 response ({"studies": [...]}), a JSON list of studies, one study object, JSON lines, or a
folder of such .json/.jsonl files (the bulk download unzipped). Structured age and sex, when the record has them,
are kept as `min_age_years`, `max_age_years` (None: no limit) and `sex` ("all" / "female" / "male").
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from absl import app, flags, logging

from ctelm_jax import console
from ctelm_jax.data import corpus
from ctelm_jax.errors import MissingInput

_PHASES = {"EARLY_PHASE1": "early phase 1", "PHASE1": "phase 1", "PHASE2": "phase 2", "PHASE3": "phase 3",
           "PHASE4": "phase 4", "NA": "not applicable"}
_STATUS = {"ACTIVE_NOT_RECRUITING": "active, not recruiting", "UNKNOWN": "unknown status"}
_SEX = {"ALL": "all", "FEMALE": "female", "MALE": "male"}
_UNITS = {"year": 1.0, "month": 12.0, "week": 52.0, "day": 365.0, "hour": 365.0 * 24, "minute": 365.0 * 24 * 60}


def age_years(text: str | None) -> float | None:
    """Years of an API age such as "18 Years" or "6 Months"; None for missing or "N/A"."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+?)s?\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        return None
    return round(float(m.group(1)) / _UNITS[m.group(2).lower()], 2)


def phase_text(phases: list[str] | None) -> str:
    """Corpus phase text of an API phase list: ["PHASE2", "PHASE3"] -> "phase 2/phase 3"."""
    names = [_PHASES.get(p, p.lower().replace("_", " ")) for p in phases or []]
    return "/".join(names) if names else "not applicable"


def status_text(status: str | None) -> str:
    """Corpus status text of an API overallStatus: "ACTIVE_NOT_RECRUITING" -> "active, not recruiting"."""
    if not status:
        return "unknown status"
    return _STATUS.get(status, status.lower().replace("_", " "))


def study_to_record(study: Mapping[str, Any]) -> dict[str, Any]:
    """One API v2 study as a corpus record (fields may be missing; `corpus.validate` judges)."""
    p = study.get("protocolSection", study)
    ident = p.get("identificationModule", {})
    status = p.get("statusModule", {})
    elig = p.get("eligibilityModule", {})
    record: dict[str, Any] = {
        "nctid": ident.get("nctId"),
        "phase": phase_text(p.get("designModule", {}).get("phases")),
        "status": status_text(status.get("overallStatus")),
        "why_stop": status.get("whyStopped", ""),
        "diseases": [c.lower() for c in p.get("conditionsModule", {}).get("conditions", [])],
        "drugs": [i["name"].lower() for i in p.get("armsInterventionsModule", {}).get("interventions", [])
                  if i.get("name")],
        "criteria": elig.get("eligibilityCriteria"),
    }
    if "minimumAge" in elig or "maximumAge" in elig:
        record["min_age_years"] = age_years(elig.get("minimumAge"))
        record["max_age_years"] = age_years(elig.get("maximumAge"))
    if elig.get("sex") in _SEX:
        record["sex"] = _SEX[elig["sex"]]
    return record


def _studies(value: Any) -> Iterator[Any]:
    """Study objects in a parsed JSON value: {"studies": [...]}, a list, or one study."""
    if isinstance(value, dict) and "studies" in value:
        yield from value["studies"]
    elif isinstance(value, list):
        yield from value
    else:
        yield value


def read_studies(path: str | os.PathLike) -> Iterator[Any]:
    """Study objects in a .json / .jsonl file or a folder of them."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{path}: no such file or folder; pass a ClinicalTrials.gov API v2 JSON / JSONL export.")
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.suffix in (".json", ".jsonl"):
                yield from read_studies(child)
        return
    text = path.read_text(encoding="utf-8")
    try:
        yield from _studies(json.loads(text))
    except json.JSONDecodeError:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield from _studies(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: neither a JSON document nor JSON lines ({e}).") from e


def import_studies(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Valid corpus records of the studies at `path` (invalid ones skipped and counted, see `corpus.clean_records`)."""
    return corpus.clean_records((study_to_record(s) if isinstance(s, dict) else s for s in read_studies(path)),
                                str(path))


def main(argv: list[str]) -> None:
    """Converts --input to --out."""
    del argv
    n = corpus.write_records(import_studies(flags.FLAGS.input), flags.FLAGS.out)
    logging.info("wrote %d records to %s", n, flags.FLAGS.out)
    print(f"wrote {n} records to {flags.FLAGS.out}")


if __name__ == "__main__":
    flags.DEFINE_string("input", None, "API v2 JSON / JSONL file or folder of them.", required=True)
    flags.DEFINE_string("out", None, "Output corpus file (.jsonl or .jsonl.gz).", required=True)
    app.run(console.entry_point(main, "ctelm_jax.data.ctgov", also=(ValueError,)))
