"""Concept-offset training (the `offset` task) and embedding noise: moved targets, moved input vectors, the concept
vectors a run computes and saves, and the noise's scale."""

import dataclasses

import numpy as np
import pytest

from ctelm_jax import concepts
from ctelm_jax.data import corpus, pipeline, render, tasks
from ctelm_jax.errors import UserError
from ctelm_jax.train import inputs
from ctelm_jax.train.curriculum import Curriculum
from ctelm_jax.train.validate import check_config

ADULT = render.TrialFields("NCT1", "phase 2", "completed", ("asthma",), ("x",), 18.0, 65.0, "all",
                           ("Age 18 to 65 years", "Asthma for 1 year"), ("Pregnant women",))
OPEN = render.TrialFields("NCT2", "phase 3", "recruiting", ("gout",), ("y",), None, None, "all", ("Gout",), ())
SEQ, BATCH, E, D = 256, 4, 6, 16


@pytest.mark.parametrize("strength, ages", [
    (1.0, (65.0, None)),      # 18-65 -> 65 and older
    (0.5, (42.0, 82.0)),      # half-way: 18 + 0.5 * 47 = 41.5 -> 42, 65 + 0.5 * 35 = 82.5 -> 82 (half to even)
    (-1.0, (18.0, 40.0)),     # younger: the upper bound goes to 40, the lower one is already 18
    (-0.25, (18.0, 59.0)),    # 65 - 0.25 * 25 = 58.75 -> 59
])
def test_the_age_move_shifts_both_bounds_in_proportion(strength, ages):
    moved = render.move_fields(ADULT, "age", strength)
    assert (moved.min_age, moved.max_age) == ages
    assert moved.inclusion == ("Asthma for 1 year",) and moved.exclusion == ("Pregnant women",)  # age item dropped
    assert (moved.sex, moved.conditions) == (ADULT.sex, ADULT.conditions)


def test_the_age_move_of_a_trial_without_bounds():
    assert render.move_fields(OPEN, "age", 0.0) is OPEN
    older = render.move_fields(OPEN, "age", 1.0)
    assert (older.min_age, older.max_age) == (65.0, None)
    younger = render.move_fields(OPEN, "age", -0.5)
    assert (younger.min_age, younger.max_age) == (None, 70.0)  # the lower bound stays unstated (18 either way)
    assert render.ages_text(younger.min_age, younger.max_age) != render.ages_text(None, None)
    child = dataclasses.replace(OPEN, max_age=17.0)
    assert render.move_fields(child, "age", -1.0) is child  # never moves against the push: already younger than 40


@pytest.mark.parametrize("strength, sex", [(0.49, "all"), (0.5, "female"), (1.0, "female"), (-0.49, "all"),
                                           (-0.8, "male")])
def test_the_sex_move_sets_women_or_men_only_past_the_threshold(strength, sex):
    moved = render.move_fields(ADULT, "sex", strength)
    assert moved.sex == sex
    assert moved.exclusion == (() if sex != "all" else ("Pregnant women",))  # a sex item contradicts the edit


def test_the_pediatric_move():
    assert render.move_fields(ADULT, "pediatric", 0.3) is ADULT
    child = render.move_fields(ADULT, "pediatric", 0.7)
    assert render.is_pediatric(child) and child.max_age == 17.0
    kid = dataclasses.replace(OPEN, max_age=12.0)
    assert render.move_fields(kid, "pediatric", -0.9).min_age == render.ADULT_AGE
    with pytest.raises(ValueError, match="unknown concept 'height'"):
        render.move_fields(ADULT, "height", 1.0)


def test_offset_concepts_are_the_builtin_concepts():
    assert set(tasks.OFFSET_CONCEPTS) == set(concepts.BUILTIN)


@pytest.fixture(scope="module")
def records():
    return corpus.load_records()[:800]


def test_an_offset_example_describes_the_moved_trial(records, tokenizer):
    seen = set()
    for index in range(40):
        rng = np.random.default_rng(index)
        ex = tasks.make_example("offset", records, index, rng, tokenizer, 2048)
        (concept,), (strength,) = ex["embedding_concepts"], ex["embedding_strengths"]
        assert 1 <= concept <= len(tasks.OFFSET_CONCEPTS) and -tasks.OFFSET_RANGE <= strength <= tasks.OFFSET_RANGE
        assert ex["embedding_indices"].tolist() == [index]
        moved = render.move_fields(render.fields(records[index]), tasks.OFFSET_CONCEPTS[concept - 1], float(strength))
        target = tokenizer.decode(ex["tokens"][1:][ex["loss_mask"][:-1] == 1].tolist()[:-1])
        assert target == render.render_fields(moved)
        seen.add(concept)
        plain = tasks.make_example("describe", records, index, rng, tokenizer, 2048)
        assert plain["embedding_concepts"].tolist() == [0] and plain["embedding_strengths"].tolist() == [0.0]
    assert seen == {1, 2, 3}


def _vectors():
    return np.random.default_rng(1).normal(size=(len(tasks.OFFSET_CONCEPTS), D)).astype(np.float32) * 0.3


def test_the_input_vector_is_the_embedding_moved_by_strength_times_the_concept_vector():
    table = np.random.default_rng(0).normal(size=(5, D)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    vectors = _vectors()
    packed = {"tokens_segment_ids": np.ones((1, 8), np.int32), "tokens": np.zeros((1, 8), np.int32),
              "tokens_positions": np.tile(np.arange(8), (1, 1)), "loss_mask": np.zeros((1, 8), np.float32),
              "task_ids": np.zeros((1, 8), np.int32), "pool_mask": np.zeros((1, 8), np.float32),
              "embedding_indices": np.array([[3, 1, 4, 0]]), "embedding_indices_segment_ids": np.array([[1, 1, 2, 0]]),
              "embedding_concepts": np.array([[2, 0, 3, 0]]), "embedding_strengths": np.float32([[-0.7, 0, 0.4, 0]]),
              "target_indices": np.zeros((1, 4), np.int32), "target_indices_segment_ids": np.zeros((1, 4), np.int32)}
    out = pipeline._Finalize(table, 0, vectors).map(packed)["embeddings"][0]
    assert np.array_equal(out[0], concepts.apply(table[3], vectors[1], np.float32(-0.7)))
    by_hand = table[3] + np.float32(-0.7) * vectors[1]  # e + a v, on the unit sphere like every encoder embedding
    np.testing.assert_allclose(out[0], by_hand / np.linalg.norm(by_hand), rtol=0, atol=1e-6)
    assert np.array_equal(out[1], table[1])  # an embedding without a move is the table's row, bit for bit
    assert np.array_equal(out[2], concepts.apply(table[4], vectors[2], np.float32(0.4)))
    assert not out[3].any()
    packed["embedding_noise"] = np.zeros((1, 4, D), np.float32)  # only a noisy pipeline packs this key
    assert np.array_equal(pipeline._Finalize(table, 0, vectors).map(packed)["embeddings"][0], out)
    packed["embedding_noise"][0, 1] = 0.1
    noisy = pipeline._Finalize(table, 0, vectors).map(packed)["embeddings"][0]
    assert np.array_equal(noisy[1], concepts.apply(table[1] + np.float32(0.1), np.zeros(D, np.float32), 0.0))


def test_offset_batches_hold_moved_unit_vectors(records, tokenizer):
    table = np.random.default_rng(0).normal(size=(len(records), D)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    vectors = _vectors()
    kw = dict(process_index=0, process_count=1, embedding_dim=D, concept_vectors=vectors)
    batch = next(pipeline.make_pipeline(records, table, tokenizer, {"offset": 1.0}, SEQ, BATCH, 0, E, **kw))
    used = np.abs(batch["embeddings"]).sum(-1) > 0
    slots = batch["embeddings"][used]
    assert len(slots) >= BATCH
    np.testing.assert_allclose(np.linalg.norm(slots, axis=-1), 1.0, atol=1e-6)
    for x in slots:  # each is e_i + a v_c renormalised: in the span of one table row and one concept vector
        nearest = table[np.argmax(table @ x)]
        residuals = [np.linalg.lstsq(np.stack([nearest, v], 1), x, rcond=None)[1] for v in vectors]
        assert min(float(r[0]) if len(r) else 0.0 for r in residuals) < 1e-10
        assert not any(np.array_equal(x, row) for row in table)
    with pytest.raises(ValueError, match="offset task needs one concept vector"):
        pipeline.make_pipeline(records, table, tokenizer, {"offset": 1.0}, SEQ, BATCH, 0, E,
                               **(kw | {"concept_vectors": None}))


def test_embedding_noise_has_the_asked_spread_and_is_reproducible(records, tokenizer):
    dim, std = 4096, 0.05
    make = pipeline._MakeExample(records, tokenizer, {"describe": 1.0}, SEQ, dim, noise_std=std)
    noise = make.random_map(7, np.random.default_rng(3))["embedding_noise"]
    assert noise.shape == (1, dim)
    # The sample std of 4096 normal draws is within 3 of its standard errors (std / sqrt(2 * 4096) = 1.1%) of std.
    assert abs(noise.std() / std - 1) < 3 / np.sqrt(2 * dim)
    assert np.array_equal(noise, make.random_map(7, np.random.default_rng(3))["embedding_noise"])
    off = pipeline._MakeExample(records, tokenizer, {"describe": 1.0}, SEQ, dim)
    assert "embedding_noise" not in off.random_map(7, np.random.default_rng(3))
    table = np.random.default_rng(0).normal(size=(len(records), D)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    kw = dict(process_index=0, process_count=1, embedding_dim=D, noise_std=0.1)
    a, b = (next(pipeline.make_pipeline(records, table, tokenizer, {"describe": 1.0}, SEQ, BATCH, 0, E, **kw))
            for _ in range(2))
    assert np.array_equal(a["embeddings"], b["embeddings"])
    used = np.abs(a["embeddings"]).sum(-1) > 0
    slots = a["embeddings"][used]
    np.testing.assert_allclose(np.linalg.norm(slots, axis=-1), 1.0, atol=1e-6)
    # |noise|^2 ~ D * 0.1^2 = 0.16, so each input stays near its row: cosine ~ 1 / sqrt(1.16) = 0.93, never 1.
    best = (slots @ table.T).max(-1)
    assert (best < 1 - 1e-4).all() and (best > 0.6).all()
    with pytest.raises(ValueError, match="noise_std=-0.1"):
        pipeline.make_pipeline(records, table, tokenizer, {"describe": 1.0}, SEQ, BATCH, 0, E,
                               **(kw | {"noise_std": -0.1}))


def test_a_run_computes_the_concept_vectors_once_and_saves_them(records, tmp_path):
    from configs.tiny import get_config

    config = get_config()
    embeddings = np.random.default_rng(0).normal(size=(len(records), D)).astype(np.float32)
    train = inputs.Split(records, embeddings)

    def stages() -> Curriculum:
        return Curriculum(config.stages, list(config.data.tasks))

    assert inputs.offset_vectors(stages(), tmp_path, train) is None  # no stage trains the offset task
    assert not (tmp_path / concepts.NPZ).exists()
    config.stages[-1]["tasks"] = {"describe": 1.0, "offset": 1.0}
    vectors = inputs.offset_vectors(stages(), tmp_path, train)
    expected = concepts.builtin(records, embeddings)
    assert np.array_equal(vectors, np.stack([expected[n].vector for n in tasks.OFFSET_CONCEPTS]))
    assert set(concepts.load(tmp_path)) == set(tasks.OFFSET_CONCEPTS)
    # A resumed run moves along the saved vectors, whatever the split gives now.
    assert np.array_equal(inputs.offset_vectors(stages(), tmp_path, inputs.Split(records, embeddings * 2)), vectors)
    # Too few records for a concept's group: refused with the fix, nothing saved.
    with pytest.raises(UserError, match=r"concept 'age': 0 records with and 0 without .*--config.data.max_records"):
        inputs.offset_vectors(stages(), tmp_path / "small", inputs.Split(records[:20], embeddings[:20]))
    assert not (tmp_path / "small").exists()


def test_negative_embedding_noise_is_refused_before_any_work():
    from configs.tiny import get_config

    config = get_config()
    config.data.embedding_noise = -0.5
    with pytest.raises(UserError, match=r"data.embedding_noise=-0.5: must be a finite number >= 0"):
        check_config(config)


def test_a_tiny_run_trains_the_offset_task_with_noise(tmp_path):
    from configs.tiny import get_config

    from conftest import metric_rows

    from ctelm_jax.train.loop import train

    config = get_config()
    config.data.max_records, config.data.embedding_noise = 600, 0.1
    config.stages[-1]["tasks"] = {"describe": 0.5, "offset": 0.5}
    summary = train(config, tmp_path)
    assert summary["status"] == "finished"
    saved = concepts.load(tmp_path)
    assert list(saved) == list(concepts.BUILTIN)
    rows = metric_rows(tmp_path)
    offset = [r["loss/offset"] for r in rows if "loss/offset" in r]
    assert len(offset) >= 3 and np.isfinite(offset).all()  # stage 2's 4 steps (a step without one has no row)
    assert np.isfinite(rows[-1]["val/offset"])


def _edited(records, n=6):
    """Hand-made counterfactuals: records 0..n-1 moved along each concept in turn, +1 and -1 alternating."""
    concepts_ = tuple(tasks.OFFSET_CONCEPTS[r % 3] for r in range(n))
    e = np.random.default_rng(2).normal(size=(n, D)).astype(np.float32)
    return tasks.Counterfactuals(np.arange(n), concepts_, np.asarray([1.0, -1.0] * (n // 2)),
                                 e / np.linalg.norm(e, axis=1, keepdims=True))


def test_a_counterfactual_example_reads_the_edited_embedding_and_writes_the_edited_trial(records, tokenizer):
    edited, forms = _edited(records), set()
    for index in range(60):
        ex = tasks.make_example("counterfactual", records, index, np.random.default_rng(index), tokenizer, 2048,
                                counterfactuals=edited)
        (row,) = ex["embedding_indices"].tolist()
        r = row - len(records)  # the edited trial's embedding follows the corpus table
        assert 0 <= r < len(edited.rows) and ex["embedding_concepts"].tolist() == [0]
        moved = render.move_fields(render.fields(records[int(edited.rows[r])]), edited.concepts[r],
                                   float(edited.strengths[r]))
        target = tokenizer.decode(ex["tokens"][1:][ex["loss_mask"][:-1] == 1].tolist()[:-1])
        attribute = "sex" if edited.concepts[r] == "sex" else "ages"
        assert target in (render.render_fields(moved), tasks.attribute_answer(moved, attribute))
        forms.add(target == render.render_fields(moved))
    assert forms == {True, False}  # both the edited text and the short answers are trained
    with pytest.raises(ValueError, match="needs the run's edited trials"):
        tasks.make_example("counterfactual", records, 0, np.random.default_rng(0), tokenizer, 2048)


def test_counterfactual_batches_hold_the_edited_embeddings(records, tokenizer):
    table = np.random.default_rng(0).normal(size=(len(records), D)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    edited = _edited(records)
    kw = dict(process_index=0, process_count=1, embedding_dim=D, counterfactuals=edited)
    batch = next(pipeline.make_pipeline(records, table, tokenizer, {"counterfactual": 1.0}, SEQ, BATCH, 0, E, **kw))
    slots = batch["embeddings"][np.abs(batch["embeddings"]).sum(-1) > 0]
    assert len(slots) >= BATCH
    assert all(any(np.array_equal(x, e) for e in edited.embeddings) for x in slots)  # never a corpus row
    with pytest.raises(ValueError, match="counterfactual task needs the edited training trials"):
        pipeline.make_pipeline(records, table, tokenizer, {"counterfactual": 1.0}, SEQ, BATCH, 0, E,
                               **(kw | {"counterfactuals": None}))
    with pytest.raises(ValueError, match="made for another split or encoder"):
        pipeline.make_pipeline(records[:3], table[:3], tokenizer, {"counterfactual": 1.0}, SEQ, BATCH, 0, E, **kw)
