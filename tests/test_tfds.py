"""The TFDS builder: builds from the shipped file into a fresh folder; splits disjoint by NCT id and stable."""

import json

import pytest

from ctelm_jax.data import corpus, render, tfds_builder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    dirs = [tmp_path_factory.mktemp(f"tfds{i}") for i in range(2)]
    return [tfds_builder.build(d) for d in dirs], dirs


def _ids(data_dir, split):
    return [ex["nctid"].decode() for ex in tfds_builder.load_split(data_dir, split)]


def test_builds_all_records_into_disjoint_stable_splits(built):
    builders, dirs = built
    assert builders[0].info.version == "1.0.0" and builders[0].name == "clinical_trials"
    ids = {split: _ids(dirs[0], split) for split in corpus.SPLITS}
    assert sum(len(v) for v in ids.values()) == 4466
    assert not set(ids["train"]) & set(ids["validation"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["validation"]) & set(ids["test"])
    for split, split_ids in ids.items():
        assert all(corpus.split_of(i) == split for i in split_ids)
        assert sorted(_ids(dirs[1], split)) == sorted(split_ids)  # a second build gives the same split


def test_features_match_render(built):
    _, dirs = built
    source = tfds_builder.load_split(dirs[0], "validation")
    for k in range(0, len(source), 25):
        ex = source[k]
        record = json.loads(ex["raw"])
        f = render.fields(record)
        assert ex["text"].decode() == render.render_fields(f)
        assert ex["sex"].decode() == f.sex and ex["phase"].decode() == f.phase
        assert [c.decode() for c in ex["conditions"]] == list(f.conditions)
        assert ex["min_age"] == pytest.approx(-1 if f.min_age is None else f.min_age)
        assert ex["max_age"] == pytest.approx(-1 if f.max_age is None else f.max_age)


def test_rebuild_is_reused_and_bad_split_rejected(built):
    _, dirs = built
    assert tfds_builder.build(dirs[0]).info.splits["train"].num_examples == len(_ids(dirs[0], "train"))
    with pytest.raises(ValueError, match="unknown split"):
        tfds_builder.load_split(dirs[0], "dev")
