"""The trial corpus as a TFDS dataset (`clinical_trials`, array_record files, no TensorFlow needed to build or read).

Splits are fixed by NCT id (`corpus.split_of`), so they are disjoint and identical across builds and corpus updates.
Read with `load_split(data_dir, "train")`: a random-access sequence of dicts (bytes for text features), which
`grain.MapDataset.source` accepts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ctelm_jax.data import corpus, render


class ClinicalTrials(tfds.core.GeneratorBasedBuilder):
    """ClinicalTrials.gov trial records with their canonical text and structured fields."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS would locate this file through importlib_resources (not installed); there is no checksums file anyway.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "Shipped HINT-derived corpus; text by ctelm_jax.data.render; splits by NCT id hash."}

    def __init__(self, *, source: str | os.PathLike = corpus.SHIPPED, **kwargs: Any):
        self._source = Path(source)
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: ids, canonical text, structured fields (ages -1 when unstated) and the raw record as JSON."""
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "nctid": text, "text": text, "phase": text, "status": text, "sex": text, "raw": text,
                "conditions": tfds.features.Sequence(text), "interventions": tfds.features.Sequence(text),
                "min_age": tfds.features.Scalar(np.float32), "max_age": tfds.features.Scalar(np.float32),
            }),
            supervised_keys=None,
            homepage="https://clinicaltrials.gov",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        """One generator per split over the local corpus file (nothing is downloaded)."""
        del dl_manager
        records = corpus.load_records(self._source)
        return {split: self._generate_examples(records, split) for split in corpus.SPLITS}

    def _generate_examples(self, records: Sequence[dict], split: str) -> Iterator[tuple[str, dict]]:
        """(nctid, features) of the records in `split`."""
        for record in records:
            if corpus.split_of(record["nctid"]) != split:
                continue
            f = render.fields(record)
            yield record["nctid"], {
                "nctid": f.nctid, "text": render.render_fields(f), "phase": f.phase, "status": f.status, "sex": f.sex,
                "conditions": list(f.conditions), "interventions": list(f.interventions),
                "min_age": -1.0 if f.min_age is None else f.min_age,
                "max_age": -1.0 if f.max_age is None else f.max_age,
                "raw": json.dumps(record, ensure_ascii=False, sort_keys=True),
            }


def build(data_dir: str | os.PathLike, source: str | os.PathLike = corpus.SHIPPED) -> ClinicalTrials:
    """Prepares `clinical_trials` under `data_dir` from the local corpus file (a no-op if already built)."""
    builder = ClinicalTrials(data_dir=str(data_dir), source=source)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return builder


def load_split(data_dir: str | os.PathLike, split: str) -> Sequence[dict[str, Any]]:
    """Random-access data source of one built split ("train", "validation" or "test")."""
    if split not in corpus.SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {corpus.SPLITS}.")
    return ClinicalTrials(data_dir=str(data_dir)).as_data_source(split=split)
