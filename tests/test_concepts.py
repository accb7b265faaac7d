"""Concept vectors: centroid differences on a toy set, built-in definitions, apply, save/load."""

import dataclasses

import numpy as np
import pytest

from ctelm_jax import concepts
from ctelm_jax.data.render import TrialFields

BASE = TrialFields(nctid="", phase="phase 2", status="completed", conditions=("x",), interventions=("y",),
                   min_age=None, max_age=None, sex="all", inclusion=(), exclusion=())


def trial(min_age=None, max_age=None, sex="all") -> TrialFields:
    return dataclasses.replace(BASE, min_age=min_age, max_age=max_age, sex=sex)


TOY = [trial(65), trial(70), trial(18, 55), trial(18, 45), trial(18), trial(None, 12), trial(sex="female"),
       trial(sex="male"), trial(sex="female")]


def toy_embeddings(d: int = 6) -> np.ndarray:
    e = np.random.default_rng(0).standard_normal((len(TOY), d)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_define_is_difference_of_centroids():
    e = toy_embeddings()
    c = concepts.define("older", TOY, e, lambda f: f.min_age is not None and f.min_age >= 60,
                        lambda f: f.max_age is not None and f.max_age < 60 and (f.min_age or 0) >= 18)
    np.testing.assert_allclose(c.vector, e[[0, 1]].mean(0) - e[[2, 3]].mean(0), rtol=1e-6)
    assert (c.positive, c.negative) == (2, 2)


def test_builtin_groups():
    out = concepts.builtin(TOY, toy_embeddings())
    assert {k: (c.positive, c.negative) for k, c in out.items()} == {
        "age": (2, 2), "pediatric": (1, 5), "sex": (2, 1)}
    e = toy_embeddings()
    np.testing.assert_allclose(out["sex"].vector, e[[6, 8]].mean(0) - e[7], rtol=1e-6)


def test_define_rejects_bad_groups():
    e = toy_embeddings()
    with pytest.raises(ValueError, match="pass both filters"):
        concepts.define("x", TOY, e, lambda f: True, lambda f: f.sex == "male")
    with pytest.raises(ValueError, match="0 records with"):
        concepts.define("x", TOY, e, lambda f: False, lambda f: True)
    with pytest.raises(ValueError, match="one row per record"):
        concepts.define("x", TOY, e[:3], lambda f: True, lambda f: False)


def test_apply_moves_and_renormalises():
    e = toy_embeddings()[0]
    v = np.eye(6, dtype=np.float32)[1]
    moved = concepts.apply(e, v, 0.7)
    assert abs(np.linalg.norm(moved) - 1) < 1e-6
    np.testing.assert_allclose(moved, (e + 0.7 * v) / np.linalg.norm(e + 0.7 * v), rtol=1e-6)
    np.testing.assert_allclose(concepts.apply(e, v, 0.0), e, rtol=1e-6)
    assert moved[1] > e[1]
    with pytest.raises(ValueError, match="zero vector"):
        concepts.apply(e, e, -1.0)


def test_save_load_roundtrip(tmp_path):
    out = concepts.builtin(TOY, toy_embeddings())
    concepts.save(tmp_path, out, source="toy")
    back = concepts.load(tmp_path)
    assert back.keys() == out.keys()
    for k in out:
        np.testing.assert_array_equal(back[k].vector, out[k].vector)
        assert (back[k].positive, back[k].negative, back[k].description) == (
            out[k].positive, out[k].negative, out[k].description)
    with pytest.raises(FileNotFoundError, match="python -m ctelm_jax.concepts"):
        concepts.load(tmp_path / "elsewhere")
