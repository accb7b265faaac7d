"""Corpus loading/validation, the NCT-id split, and the ClinicalTrials.gov API v2 importer."""

import collections
import gzip
import json
import logging
import subprocess
import sys

import pytest

from ctelm_jax.data import corpus, ctgov, render

GOOD = {"nctid": "NCT00000001", "phase": "phase 2", "status": "completed", "why_stop": "", "diseases": ["asthma"],
        "drugs": ["budesonide"], "criteria": "Inclusion Criteria:\n\n  -  Age 18 to 65 years\n"}

STUDY = {  # a hand-written API v2 study record, trimmed to the modules the importer reads
    "protocolSection": {
        "identificationModule": {"nctId": "NCT09999999", "briefTitle": "A study of drug X in asthma"},
        "statusModule": {"overallStatus": "ACTIVE_NOT_RECRUITING", "whyStopped": ""},
        "designModule": {"studyType": "INTERVENTIONAL", "phases": ["PHASE2", "PHASE3"]},
        "conditionsModule": {"conditions": ["Asthma", "Allergic Rhinitis"]},
        "armsInterventionsModule": {"interventions": [{"type": "DRUG", "name": "Drug X"},
                                                      {"type": "DRUG", "name": "Placebo"}]},
        "eligibilityModule": {
            "eligibilityCriteria": "Inclusion Criteria:\n\n* Women aged 40 to 75 years\n\nExclusion Criteria:\n\n"
                                   "* Current smokers",
            "minimumAge": "40 Years", "maximumAge": "75 Years", "sex": "FEMALE", "healthyVolunteers": False},
    },
    "hasResults": False,
}


def test_shipped_corpus_loads_valid():
    records = corpus.load_records()
    assert len(records) == 4466
    assert len({r["nctid"] for r in records}) == len(records)
    assert all(corpus.validate(r) is None for r in records)


def test_split_is_stable_disjoint_and_about_90_5_5():
    records = corpus.load_records()
    splits = collections.Counter(corpus.split_of(r["nctid"]) for r in records)
    assert set(splits) == set(corpus.SPLITS)
    assert 0.87 < splits["train"] / len(records) < 0.93
    assert 0.03 < splits["validation"] / len(records) < 0.07
    # fixed by the id alone: same answer every call, case/whitespace-insensitive
    assert [corpus.split_of(r["nctid"]) for r in records[:200]] == [corpus.split_of(f" {r['nctid'].lower()} ")
                                                                      for r in records[:200]]


def test_invalid_records_are_skipped_with_counted_reasons(tmp_path, caplog):
    lines = [json.dumps(GOOD).encode(),
             json.dumps({k: v for k, v in GOOD.items() if k != "criteria"} | {"nctid": "NCT2"}).encode(),
             json.dumps(GOOD | {"nctid": "NCT3", "criteria": "   "}).encode(),
             b'{"nctid": "NCT4", "criteria": "caf\xe9"}',  # latin-1 byte: not UTF-8
             b'{"nctid": "NCT5", "criteria": "\\ud800"',  # broken JSON
             json.dumps(GOOD | {"nctid": "NCT6", "criteria": "bad \ud800 surrogate"}).encode(),
             json.dumps(GOOD).encode(),  # duplicate id
             json.dumps(GOOD | {"nctid": "NCT7", "diseases": "asthma"}).encode(),
             b""]
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines))
    with caplog.at_level(logging.WARNING):
        records = corpus.load_records(path)
    assert [r["nctid"] for r in records] == ["NCT00000001"]
    log = caplog.text
    for reason in ("missing field criteria", "empty criteria", "non-UTF-8 bytes", "invalid JSON", "non-UTF-8 text",
                   "duplicate nctid", "field diseases is not a list"):
        assert reason in log, reason


def test_nothing_valid_raises(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(GOOD | {"criteria": ""}) + "\n")
    with pytest.raises(ValueError, match="no valid trial records"):
        corpus.load_records(path)
    with pytest.raises(FileNotFoundError):
        corpus.load_records(tmp_path / "missing.jsonl")


def test_ctgov_study_to_record():
    record = ctgov.study_to_record(STUDY)
    assert record["nctid"] == "NCT09999999"
    assert record["phase"] == "phase 2/phase 3"
    assert record["status"] == "active, not recruiting"
    assert record["diseases"] == ["asthma", "allergic rhinitis"]
    assert record["drugs"] == ["drug x", "placebo"]
    assert (record["min_age_years"], record["max_age_years"], record["sex"]) == (40.0, 75.0, "female")
    assert corpus.validate(record) is None
    f = render.fields(record)
    assert (f.min_age, f.max_age, f.sex) == (40.0, 75.0, "female")


@pytest.mark.parametrize("text, years", [("18 Years", 18.0), ("6 Months", 0.5), ("2 Weeks", 0.04), ("N/A", None),
                                         (None, None), ("1 Year", 1.0)])
def test_ctgov_ages(text, years):
    assert ctgov.age_years(text) == years


def test_ctgov_phase_and_status_names():
    assert ctgov.phase_text(["EARLY_PHASE1"]) == "early phase 1"
    assert ctgov.phase_text(["NA"]) == ctgov.phase_text([]) == "not applicable"
    assert ctgov.status_text("UNKNOWN") == "unknown status"
    assert ctgov.status_text("NOT_YET_RECRUITING") == "not yet recruiting"


def test_ctgov_accepts_response_list_and_jsonl(tmp_path):
    other = json.loads(json.dumps(STUDY))
    other["protocolSection"]["identificationModule"]["nctId"] = "NCT09999998"
    del other["protocolSection"]["eligibilityModule"]["eligibilityCriteria"]  # invalid: skipped
    (tmp_path / "response.json").write_text(json.dumps({"studies": [STUDY, other], "nextPageToken": "x"}))
    (tmp_path / "list.json").write_text(json.dumps([STUDY]))
    (tmp_path / "lines.jsonl").write_text(json.dumps(STUDY) + "\n\n" + json.dumps(other) + "\n")
    for name in ("response.json", "list.json", "lines.jsonl"):
        assert [r["nctid"] for r in ctgov.import_studies(tmp_path / name)] == ["NCT09999999"]


def test_ctgov_cli_writes_a_loadable_corpus(tmp_path):
    (tmp_path / "in.json").write_text(json.dumps({"studies": [STUDY]}))
    out = tmp_path / "out.jsonl.gz"
    subprocess.run([sys.executable, "-m", "ctelm_jax.data.ctgov", f"--input={tmp_path / 'in.json'}", f"--out={out}"],
                   check=True, capture_output=True)
    records = corpus.load_records(out)
    assert records == [ctgov.study_to_record(STUDY)]
