"""Evaluation metrics and probes on toy inputs, the decode CLI's input checks, the whole evaluation on a tiny run."""

import dataclasses
import hashlib
import json
import re

import numpy as np
import pytest

from ctelm_jax import concepts, decode, prompts, vectors
from ctelm_jax.data.corpus import load_records, split_of
from ctelm_jax.eval import facts, metrics, probes, report, suite
from ctelm_jax.eval.suite import EvalSizes, evaluate_run
from ctelm_jax.run.corpus import Split
from conftest import write_step0_run

TEXT = ("Phase: phase 2\nConditions: asthma\nInterventions: salbutamol\nAges: {ages}\nSex: {sex}\n"
        "Status: completed")


def trial_text(ages: str = "18 years and older", sex: str = "all") -> str:
    return TEXT.format(ages=ages, sex=sex)


# ----------------------------------------------------------------------------------------------------------------
# metrics


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(vectors.cosine_rows(a, b), [1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="equal shapes"):
        vectors.cosine_rows(a, b[:2])


def test_rouge_l_and_bleu_sanity():
    ref = "the quick brown fox jumps over the lazy dog"
    assert metrics.rouge_l([ref], [ref])[0] == pytest.approx(1.0)
    assert metrics.rouge_l(["completely different words"], [ref])[0] == 0.0
    partial = metrics.rouge_l(["the quick brown fox sleeps"], [ref])[0]
    assert 0.3 < partial < 1.0
    assert metrics.bleu([ref], [ref]) == pytest.approx(100.0)
    assert metrics.bleu(["completely different words here"], [ref]) < 5.0
    assert 0.0 < metrics.bleu(["the quick brown fox jumps over a lazy cat"], [ref]) < 100.0


def test_nearest_neighbour_excludes_self():
    pool = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    ids = ["A", "B", "C"]
    assert vectors.nearest_neighbours(pool, pool, ids, ids).tolist() == [1, 0, 1]
    assert vectors.nearest_neighbours(pool[:1], pool, ["Z"], ids).tolist() == [0]
    with pytest.raises(ValueError, match="no neighbour"):
        vectors.nearest_neighbours(pool[:1], pool[:1], ["A"], ["A"])


def test_summary_skips_non_finite():
    s = metrics.summary([1.0, 3.0, float("nan")])
    assert (s["mean"], s["median"], s["n"]) == (2.0, 2.0, 2)
    assert metrics.summary([])["n"] == 0


@pytest.mark.parametrize("k, n, lo, hi", [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
                                          (12, 24, 0.3143, 0.6857), (0, 0, 0.0, 1.0)])
def test_wilson_interval_known_values(k, n, lo, hi):
    assert metrics.wilson_interval(k, n) == pytest.approx((lo, hi), abs=1e-4)
    assert metrics.wilson_interval(n, n)[1] == 1.0 and metrics.wilson_interval(0, n)[0] == 0.0  # exactly


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        metrics.wilson_interval(3, 2)


# ----------------------------------------------------------------------------------------------------------------
# probes


def test_attribute_scoring():
    assert probes.score_answer("phase", "Phase 2.", "phase 2") == {"exact": True, "field": True, "overlap": True}
    assert probes.score_answer("conditions", "asthma; copd", "asthma; bronchitis") == {
        "exact": False, "field": False, "overlap": True}
    assert probes.score_answer("sex", trial_text(sex="female"), "female") == {
        "exact": False, "field": True, "overlap": False}
    assert probes.score_answer("ages", "18 to 65 years", "18 to 65 years")["exact"]
    assert not probes.score_answer("ages", "18 years and older", "18 to 65 years")["exact"]
    acc = probes.attribute_accuracy({"sex": ["all", "female", "male"]}, {"sex": ["all", "all", "male"]},
                                    majority={"sex": "all"})
    assert acc["sex"]["exact"] == pytest.approx(2 / 3) and acc["sex"]["majority"] == pytest.approx(2 / 3)


def test_extract_fields_from_cut_text():
    f = probes.extract_fields(trial_text("60 years and older", "female"))
    assert (f.min_age, f.max_age, f.sex, f.phase) == (60.0, None, "female", "phase 2")
    cut = "Phase: phase 2\nConditions: asthma\nAges: up to 17 years\nSex: male\nInclusion: some"
    f = probes.extract_fields(cut)
    assert (f.min_age, f.max_age, f.sex, f.phase) == (None, 17.0, "male", "")
    assert probes.extract_fields("Phase: phase 2\nAges: whenever") is None
    assert probes.well_formed(trial_text()) and not probes.well_formed(cut)


def test_concept_curve_monotone_and_flat():
    strengths = [-1.0, 0.0, 1.0]
    texts = {-1.0: [trial_text("18 to 55 years"), trial_text("18 years and older")],
             0.0: [trial_text("18 years and older"), trial_text("18 years and older")],
             1.0: [trial_text("60 years and older"), "garbage"]}
    c = probes.concept_curve("age", strengths, texts)
    nets = [r["net"] for r in c["curve"]]
    assert nets == [-0.5, 0.0, 0.5] and c["shape"] == "monotone"
    assert c["curve"][2]["positive"] == 0.5 and c["curve"][2]["parsed"] == 0.5
    assert c["curve"][0]["negative"] == 0.5
    # Pediatric runs the other way: a lower age range is toward the concept.
    assert [r["net"] for r in probes.concept_curve("pediatric", strengths, texts)["curve"]] == [0.5, 0.0, -0.5]
    flat = probes.concept_curve("sex", strengths, {s: [trial_text()] for s in strengths})
    assert flat["shape"] == "flat"
    # Moved with the push: away from the concept at -1 (1 of 2), toward it at +1 (1 of 2), with Wilson intervals.
    assert [(r["strength"], r["k"], r["n"]) for r in c["responsive"]] == [(-1.0, 1, 2), (1.0, 1, 2)]
    assert c["responsive"][1]["ci"] == pytest.approx(metrics.wilson_interval(1, 2))
    assert c["curve"][2]["toward_ci"] == pytest.approx(metrics.wilson_interval(1, 2))
    assert c["curve"][1]["toward_ci"] == pytest.approx(metrics.wilson_interval(0, 2))
    # Pediatric runs the other way: at -1 a text moved toward children, at +1 one moved away: none with the push.
    assert [r["k"] for r in probes.concept_curve("pediatric", strengths, texts)["responsive"]] == [0, 0]
    with pytest.raises(ValueError, match="strength 0"):
        probes.concept_curve("sex", [1.0], {1.0: [trial_text()]})


def test_specificity_counts_moves_that_keep_phase_conditions_and_interventions():
    base = trial_text()
    other_phase = base.replace("Phase: phase 2", "Phase: phase 3")
    other_drug = base.replace("Interventions: salbutamol", "Interventions: budesonide")
    assert other_phase != base and other_drug != base
    texts = {0.0: [base, base, base, "garbage"],
             -1.0: [trial_text("18 to 40 years"), other_phase, base, base],  # kept, phase changed, kept, base unparsed
             1.0: [trial_text("65 years and older", "female"), other_drug, "garbage", base]}
    c = probes.concept_curve("age", [-1.0, 0.0, 1.0], texts)
    assert [(r["strength"], r["specific"]) for r in c["responsive"]] == [(-1.0, 2 / 4), (1.0, 1 / 4)]
    assert c["responsive"][1]["specific_ci"] == pytest.approx(metrics.wilson_interval(1, 4))
    assert c["specificity"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert probes.identity("garbage") is None and probes.identity(base) == probes.identity(trial_text("60 years and older"))
    # The curves decode 72 tokens: a text cut after its Ages line keeps its identity; one cut inside Interventions none.
    cut = base[:base.index("\nSex:")]
    assert probes.identity(cut) == probes.identity(base) is not None
    assert probes.identity(base[:base.index("\nAges:")]) is None
    assert "Specificity, phase, conditions and interventions as at strength 0" in report._concept_table(
        {"age": c}, {"age": {"description": "d", "positive": 1, "negative": 1}}, "test")


def test_concept_plot_with_a_full_share(tmp_path):
    # Every trial moved toward the concept at +1: the interval ends at exactly 1, and the error bars draw.
    texts = {0.0: [trial_text()], 1.0: [trial_text("60 years and older")]}
    curve = probes.concept_curve("age", [0.0, 1.0], texts)
    assert curve["curve"][1]["toward_ci"][1] == 1.0 and curve["responsive"][0]["k"] == 1
    assert report.plot_concepts({"concepts": {"curves": {"age": curve}}}, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("values, expected", [([0.0, 0.0, 0.0], "flat"), ([-0.5, 0.0, 0.5], "monotone"),
                                              ([-0.5, 0.0, 0.0, 0.25], "monotone"), ([0.0, 0.5, 0.25], "not monotone"),
                                              ([0.5, 0.0, -0.5], "not monotone")])
def test_shape(values, expected):
    assert probes.shape(values) == expected


def test_novel_vectors_are_unit():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((50, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    g = probes.gaussian_vectors(e, 5, rng)
    m, pairs = probes.midpoint_vectors(e, 5, rng)
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, rtol=1e-5)
    assert (pairs[:, 0] != pairs[:, 1]).all()


# ----------------------------------------------------------------------------------------------------------------
# a tiny run: decode CLI pieces and the whole evaluation

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory of configs/tiny.py with a checkpoint of its freshly built model (no training needed)."""
    return write_step0_run(tmp_path_factory.mktemp("tiny_run"))


def fake_encode(texts):
    """A deterministic stand-in encoder: 32-d unit vectors seeded by each text's hash."""
    out = []
    for t in texts:
        seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
        v = np.random.default_rng(seed).standard_normal(32)
        out.append(v / np.linalg.norm(v))
    return np.asarray(out, np.float32)


def test_evaluate_run_end_to_end(tiny_run, tmp_path):
    sizes = EvalSizes(n_test=4, max_new_tokens=12, batch_size=4, n_attribute=2, attribute_max_new_tokens=6,
                      n_concept=2, concept_max_new_tokens=8, strengths=(-1.0, 1.0), n_novel=2, rerank_candidates=3)
    encoded: list[str] = []

    def encode(texts):
        encoded.extend(texts)
        return fake_encode(texts)

    out = tmp_path / "elsewhere"  # not <workdir>/eval
    markdown = evaluate_run(tiny_run, sizes, encode=encode, out=out)
    for name in ("report.md", "metrics.json", "samples.jsonl", "cosine_hist.png", "concept_curves.png"):
        assert (out / name).is_file(), name
    # Each text embedded once: 3 candidates x 4 trials (re-ranking, greedy included), 4 each for the untrained
    # adapter, neighbour and random text, 2 + 2 novel vectors; the greedy and kept texts reuse re-ranking's cosines.
    assert len(encoded) == 3 * 4 + 3 * 4 + 4
    assert (tiny_run / "concepts.npz").is_file() and (tiny_run / "concepts.json").is_file()
    results = json.loads((out / "metrics.json").read_text())
    assert results["step"] == 3
    assert list(results["describe"]) == ["ELM", "ELM, re-ranked (n=3)", "untrained adapter",
                                         "nearest training neighbour", "random training text"]
    reranked = results["describe"]["ELM, re-ranked (n=3)"]
    assert (np.array(reranked["cosines"]) >= np.array(results["describe"]["ELM"]["cosines"])).all()
    assert results["rerank"]["candidates"] == 3 and len(results["rerank"]["chosen"]) == 4
    for name in ("ELM", "ELM, re-ranked (n=3)", "untrained adapter"):
        assert results["describe"][name]["seconds_per_text"] > 0, name
    assert results["describe"]["ELM, re-ranked (n=3)"]["seconds_per_text"] > results["describe"]["ELM"][
        "seconds_per_text"]
    assert "seconds_per_text" not in results["describe"]["nearest training neighbour"]
    assert re.search(r"^\| ELM, re-ranked \(n=3\) \| [\d.-]+ ± [\d.]+ \| .* \| \d+\.\d\d \|$", markdown, re.M)
    assert re.search(r"the greedy text on \d/4 trials\).*ELM, re-ranked \(n=3\) re-embed cosine -?[\d.]+: [\d.]+ "
                     r"(above|below) the ELM \(ELM, re-ranked \(n=3\) closer on \d/4 trials\)", markdown)
    assert results["describe"]["nearest training neighbour"]["well_formed"] == 1.0
    assert results["describe"]["ELM"]["cosine"]["n"] == 4
    assert set(results["attributes"]) == set(probes.EVAL_ATTRIBUTES)
    assert [r["strength"] for r in results["concepts"]["curves"]["sex"]["curve"]] == [-1.0, 0.0, 1.0]
    # Random embeddings: the run's centroid vectors alone, and the report says why the edit pairs are missing.
    assert list(results["concepts"]["by_method"]) == ["centroid"] and results["concepts"]["method"] == "centroid"
    assert results["concepts"]["other"].startswith("edit_pair vectors not compared: ")
    assert "### centroid vectors (the run's)" in markdown and "(edit_pair vectors not compared: " in markdown
    for line in ("ages", "sex"):  # the describe lines: each system's facts, and the majority line's share
        row = results["describe_lines"][line]
        assert row["ELM"] == results["describe"]["ELM"]["facts"][line] and 0 <= row["majority line"] <= 1
    assert re.search(r"^\| sex \| \d+% \| .* \| \d+% \|$", markdown, re.M)
    assert set(results["novel"]) == {"gaussian", "midpoint"}
    assert "| ELM (step 3) |" in markdown
    for name, row in results["describe"].items():
        assert set(row["facts"]) >= {"key_facts", "conditions_f1", "interventions_f1", "ages", "ages_within",
                                     "logic", "logic_n"}, name
    facts_md = markdown.split("## Facts", 1)[1].split("##", 1)[0]
    for label in ("| ELM (step 3) |", "| ELM, re-ranked (n=3) |", "| nearest training neighbour |",
                  "| random training text |"):
        assert label in facts_md, label
    assert "| key facts |" in facts_md and "| logic (items) |" in facts_md
    sex = results["concepts"]["curves"]["sex"]
    assert [r["strength"] for r in sex["responsive"]] == [-1.0, 1.0] and sex["responsive"][0]["n"] == 2
    assert re.search(r"Moved with the push \(95% Wilson interval\): -1\.00: \d/2 = \d+% \[\d+%, \d+%\]", markdown)
    assert re.search(r"net shift against strength: (flat|monotone|not monotone)\)", markdown)
    assert re.search(r"ELM re-embed cosine -?[\d.]+: [\d.]+ (above|below) the untrained adapter \(ELM closer on \d/4 "
                     r"trials\); .*nearest training neighbour", markdown)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len([s for s in samples if s["task"] == "describe"]) == 20
    chosen = results["rerank"]["chosen"]
    shown = {name: [s["text"] for s in samples if s["task"] == "describe" and s["system"] == name]
             for name in ("ELM", "ELM, re-ranked (n=3)")}
    assert all(a == b for a, b, c in zip(*shown.values(), chosen) if c == 0)  # greedy kept: the same text
    for name, row in results["describe"].items():  # the facts are those of the texts the report shows
        shown = [s for s in samples if s["task"] == "describe" and s["system"] == name]
        expected = facts.fact_table([s["text"] for s in shown], [s["truth"] for s in shown])
        assert json.dumps(row["facts"]) == json.dumps(expected), name
    assert results["describe"]["nearest training neighbour"]["facts"]["n"] == 4


@pytest.fixture(scope="module")
def trained(tiny_run):
    from ctelm_jax.run.trained import load_trained

    return load_trained(tiny_run)


def test_decode_jobs_per_mode(trained):
    model, tokenizer, config, _ = trained
    d = int(config.model.domain_dim)
    v = fake_encode(["a", "b"])
    assert v.shape[1] == d
    labels = ["A", "B"]
    assert len(decode.make_jobs("describe", tokenizer, labels, v)) == 2
    (compare,) = decode.make_jobs("compare", tokenizer, labels, v)
    assert prompts.slots(tokenizer, compare.prompt) == 2 and compare.vectors.shape == (2, d)
    asks = decode.make_jobs("ask", tokenizer, labels, v, question="What phase is the trial {E}?")
    assert len(asks) == 2 and asks[0].prompt == prompts.attribute_prompt(tokenizer, "phase")
    both = decode.make_jobs("ask", tokenizer, labels, v, question="Is {E} like <|embedding|>?")
    assert len(both) == 1 and both[0].vectors.shape == (2, d)
    path = decode.make_jobs("interpolate", tokenizer, labels, v, steps=3)
    np.testing.assert_allclose(path[0].vectors[0], v[0], rtol=1e-5)
    np.testing.assert_allclose(path[-1].vectors[0], v[1], rtol=1e-5)
    assert [j.setting["t"] for j in path] == [0.0, 0.5, 1.0]
    from ctelm_jax import concepts

    concept = concepts.Concept("sex", v[0] - v[1], 1, 1)
    moved = decode.make_jobs("concept", tokenizer, labels[:1], v[:1], strengths=[-1.0, 0.0, 1.0], concept=concept)
    assert [j.setting["strength"] for j in moved] == [-1.0, 0.0, 1.0]
    results = decode.decode_jobs(model, tokenizer, moved, prompts.sampling_config(tokenizer, 5))
    assert len(results) == 3 and all(isinstance(r["text"], str) for r in results)
    assert "<|embedding|>" in results[0]["prompt"]


@pytest.mark.parametrize("mode,kwargs,n,match", [
    ("compare", {}, 3, "exactly 2 embeddings"),
    ("interpolate", {"steps": 1}, 2, "at least 2 points"),
    ("ask", {"question": "What phase is it?"}, 1, "no embedding slot"),
    ("ask", {"question": "Compare {E} and {E}"}, 3, "exactly 2 embeddings"),
    ("ask", {}, 1, "needs --question"),
    ("concept", {"strengths": [1.0]}, 1, "needs --concept"),
    ("translate", {}, 1, "unknown --mode"),
])
def test_decode_bad_requests(trained, mode, kwargs, n, match):
    tokenizer = trained.tokenizer
    with pytest.raises(ValueError, match=match):
        decode.make_jobs(mode, tokenizer, [str(i) for i in range(n)], fake_encode([str(i) for i in range(n)]),
                         **kwargs)


def test_decode_bad_vectors(tmp_path):
    with pytest.raises(ValueError, match=r"this model takes \(n, 32\)"):
        decode.check_vectors(np.ones((2, 31), np.float32), 32, "x")
    with pytest.raises(ValueError, match="NaN"):
        decode.check_vectors(np.full((1, 32), np.nan, np.float32), 32, "x")
    with pytest.raises(ValueError, match="zero vectors"):
        decode.check_vectors(np.zeros((1, 32), np.float32), 32, "x")
    assert decode.check_vectors(np.ones(32), 32, "x").shape == (1, 32)
    np.save(tmp_path / "v.npy", np.ones((3, 16), np.float32))
    with pytest.raises(ValueError, match=r"shape \(3, 16\)"):
        decode.vectors_from_npy(tmp_path / "v.npy", 32)
    ids, emb = ["NCT1", "NCT2"], np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match="--nctids is empty"):
        decode.vectors_from_nctids([], ids, emb, "corpus")
    with pytest.raises(ValueError, match="not in corpus"):
        decode.vectors_from_nctids(["NCT3"], ids, emb, "corpus")
    assert decode.vectors_from_nctids(["nct2"], ids, emb, "corpus")[1].tolist() == [[0.0, 1.0]]


def test_run_without_concepts_says_how_to_make_them(tmp_path):
    from ctelm_jax import concepts

    with pytest.raises(FileNotFoundError, match="no concept vectors"):
        concepts.load(tmp_path)


def test_an_edit_pair_runs_curves_are_set_beside_the_centroid_vectors():
    records = [r for r in load_records() if split_of(r["nctid"]) == "train"][:1200]  # every centroid group has trials
    e = np.random.default_rng(0).standard_normal((len(records), 16)).astype(np.float32)
    train = Split(records, e / np.linalg.norm(e, axis=1, keepdims=True))
    centroid = concepts.builtin(train.records, train.embeddings)
    run_vectors = {n: dataclasses.replace(c, method="edit_pair") for n, c in centroid.items()}
    sets, note = suite._vector_sets(run_vectors, None, None, train)
    assert list(sets) == ["edit_pair", "centroid"] and note == "centroid vectors compared beside them"
    assert all(np.array_equal(sets["centroid"][n].vector, c.vector) for n, c in centroid.items())
