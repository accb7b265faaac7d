"""Decoding that checks itself (`rerank`): the kept candidate is the one closest to its vector when re-embedded, the
greedy text is candidate 0, results repeat for a seed; `decode --rerank` end to end on a tiny run and its bad flags."""

import json
import re
import types

import numpy as np
import pytest

from ctelm_jax import decode, prompts
from ctelm_jax.errors import UserError
from ctelm_jax.eval.suite import EvalSizes
from ctelm_jax.generate import SamplingConfig
from ctelm_jax.rerank import Reranked, RerankConfig, input_vectors, rerank
from conftest import write_step0_run
from test_entry_points import fails_with_one_line
from test_eval import fake_encode

DIM = 32  # configs/tiny.py's domain_dim


# ----------------------------------------------------------------------------------------------------------------
# scripted candidates and cosines

# COSINES[i][j]: the cosine that candidate j of input i re-embeds at (0: greedy). Input 2 ties: the earliest is kept.
COSINES = np.array([[0.5, 0.9, 0.1, 0.3], [0.8, 0.2, 0.3, 0.7], [0.4, 0.4, 0.6, 0.6]])
CHOSEN = [1, 0, 2]


def scripted(monkeypatch):
    """Replaces the decoder with texts naming (input, candidate) and returns an encoder whose cosine to input i's
    vector (the i-th basis vector) is COSINES[i][j]; records the decode settings and the encoder's calls."""
    calls = {"decode": [], "encode": []}

    def fake_decode(model, tokenizer, prompt_ids, embeddings, config, rng=None):
        calls["decode"].append((len(prompt_ids), config, rng))
        seen: dict[int, int] = {}
        texts = []
        for e in embeddings:
            i = int(np.argmax(e[0]))
            seen[i] = seen.get(i, 0) + 1
            texts.append(f"input {i} greedy" if config.greedy else f"input {i} sample {seen[i]}")
        return texts

    def encode(texts):
        calls["encode"].append(list(texts))
        out = np.zeros((len(texts), DIM), np.float32)
        for row, text in enumerate(texts):
            i, j = int(text.split()[1]), (0 if text.endswith("greedy") else int(text.split()[-1]))
            out[row, i], out[row, DIM - 1] = COSINES[i, j], np.sqrt(1 - COSINES[i, j] ** 2)
        return out

    monkeypatch.setattr(prompts, "decode_texts", fake_decode)
    return encode, calls


def basis(n: int) -> list[np.ndarray]:
    return [np.eye(DIM, dtype=np.float32)[i][None] for i in range(n)]


def test_chosen_is_the_argmax_and_greedy_is_candidate_0(monkeypatch):
    encode, calls = scripted(monkeypatch)
    config = SamplingConfig(max_new_tokens=4, batch_size=8)
    got = rerank(None, None, [[1, 2]] * 3, basis(3), config, encode, RerankConfig(candidates=4, seed=7), rng=3)
    assert got.chosen.tolist() == CHOSEN
    np.testing.assert_allclose(got.cosines, COSINES, atol=1e-6)
    assert [c[0] for c in got.candidates] == [f"input {i} greedy" for i in range(3)]
    assert got.candidates[0][1:] == ["input 0 sample 1", "input 0 sample 2", "input 0 sample 3"]
    assert got.texts == ["input 0 sample 1", "input 1 greedy", "input 2 sample 2"]
    np.testing.assert_allclose(got.chosen_cosines, [0.9, 0.8, 0.6], atol=1e-6)
    assert (got.chosen_cosines >= got.cosines[:, 0]).all()
    # The greedy decode runs with the given settings and rng, the 3 x 3 samples in one call at the options' settings.
    (n1, greedy, rng1), (n2, sampled, rng2) = calls["decode"]
    assert (n1, greedy, rng1) == (3, config, 3)
    assert n2 == 9 and rng2 == 7 and (sampled.temperature, sampled.top_p) == (0.7, 1.0)
    assert sampled.max_new_tokens == 4 and sampled.batch_size == 8
    assert len(calls["encode"]) == 1 and len(calls["encode"][0]) == 12  # every candidate in one encoder call


def test_given_first_candidates_are_not_decoded_again(monkeypatch):
    encode, calls = scripted(monkeypatch)
    config = SamplingConfig(max_new_tokens=4)
    got = rerank(None, None, [[1, 2]] * 3, basis(3), config, encode, RerankConfig(candidates=4),
                 first=[f"input {i} greedy" for i in range(3)])
    assert len(calls["decode"]) == 1 and got.chosen.tolist() == CHOSEN
    with pytest.raises(ValueError, match="2 first candidates for 3 inputs"):
        rerank(None, None, [[1, 2]] * 3, basis(3), config, encode, first=["a", "b"])


def test_no_inputs_and_inputs_of_two_embeddings():
    empty = rerank(None, None, [], [], SamplingConfig(), fake_encode, RerankConfig(candidates=3))
    assert empty.texts == [] and empty.cosines.shape == (0, 3)
    assert input_vectors([np.ones(DIM), np.ones((1, DIM))]).shape == (2, DIM)
    with pytest.raises(ValueError, match=r"the one embedding it describes; got embeddings of shape \(2, 32\)"):
        input_vectors([np.ones((2, DIM))])


@pytest.mark.parametrize("kwargs, match", [({"candidates": 1}, "at least 2"), ({"temperature": 0.0}, "positive"),
                                           ({"top_p": 0.0}, r"\(0, 1\]")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RerankConfig(**kwargs)


def test_reranked_keeps_the_earliest_of_equal_cosines():
    r = Reranked([["a", "b", "c"]], np.array([[0.2, 0.5, 0.5]]))
    assert r.chosen.tolist() == [1] and r.texts == ["b"]


# ----------------------------------------------------------------------------------------------------------------
# a tiny run: the real decoder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return write_step0_run(tmp_path_factory.mktemp("rerank_run"))


@pytest.fixture(scope="module")
def trained(tiny_run):
    from ctelm_jax.run.trained import load_trained

    return load_trained(tiny_run)


def test_rerank_on_a_tiny_model(trained):
    model, tokenizer, _, _ = trained
    vectors = fake_encode(["one trial", "another trial", "a third"])
    singles = [v[None] for v in vectors]
    describe = [prompts.describe_prompt(tokenizer)] * 3
    config = prompts.sampling_config(tokenizer, 8, batch_size=4)
    options = RerankConfig(candidates=3, seed=1)
    got = rerank(model, tokenizer, describe, singles, config, fake_encode, options)
    greedy = prompts.decode_texts(model, tokenizer, describe, singles, config)
    assert [c[0] for c in got.candidates] == greedy
    expected = np.array([[float(fake_encode([t])[0] @ v) for t in c] for c, v in zip(got.candidates, vectors)])
    np.testing.assert_allclose(got.cosines, expected, atol=1e-5)
    assert got.chosen.tolist() == np.argmax(expected, axis=1).tolist()
    assert (got.chosen_cosines >= got.cosines[:, 0]).all()
    # The same seed gives the same candidates; another seed other samples (the greedy ones stay).
    again = rerank(model, tokenizer, describe, singles, config, fake_encode, options, first=greedy)
    assert again.candidates == got.candidates and np.array_equal(again.cosines, got.cosines)
    other = rerank(model, tokenizer, describe, singles, config, fake_encode, RerankConfig(candidates=3, seed=2),
                   first=greedy)
    assert [c[0] for c in other.candidates] == greedy
    assert [c[1:] for c in other.candidates] != [c[1:] for c in got.candidates]


def flags_for(tiny_run, npy, out, **changes):
    """decode's flags as the program parses them (describe of the vectors in `npy`, written to `out`)."""
    return types.SimpleNamespace(**{
        "workdir": str(tiny_run), "step": None, "mode": "describe", "texts": [], "npy": str(npy), "nctids": None,
        "question": "", "steps": 3, "concept": "", "strengths": [], "out": str(out), "max_new_tokens": 6,
        "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "batch_size": 4,
        "seed": 0, "quantize": "none", "rerank": 3, "rerank_temperature": 0.7, "rerank_top_p": 1.0, "draft": "none",
        "rounds": 2, "keep_draft": False, **changes})


def test_decode_with_rerank_end_to_end(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(decode, "run_encoder", lambda config: (fake_encode, "the test's encoder"))
    np.save(tmp_path / "two.npy", fake_encode(["a trial", "another trial"]))
    out = tmp_path / "decoded.jsonl"
    decode.decode(flags_for(tiny_run, tmp_path / "two.npy", out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row, v in zip(rows, fake_encode(["a trial", "another trial"])):
        assert len(row["candidate_cosines"]) == 3 and row["cosine"] == max(row["candidate_cosines"])
        assert row["candidate_cosines"][row["candidate"]] == row["cosine"]
        assert row["cosine"] == pytest.approx(float(fake_encode([row["text"]])[0] @ v), abs=1e-4)
    assert re.search(r"=== describe: two\.npy\[0\] \(candidate=\d, cosine=-?[\d.]+\)", capsys.readouterr().out)
    # interpolate: every point's text re-ranked against that point's vector.
    decode.decode(flags_for(tiny_run, tmp_path / "two.npy", out, mode="interpolate"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["t"] for r in rows] == [0.0, 0.5, 1.0] and all(len(r["candidate_cosines"]) == 3 for r in rows)
    # --rerank=1 is off: plain rows.
    decode.decode(flags_for(tiny_run, tmp_path / "two.npy", out, rerank=1))
    assert all("cosine" not in json.loads(line) for line in out.read_text().splitlines())


@pytest.mark.parametrize("changes, match", [
    ({"rerank": -1}, "--rerank=-1: pass 0 or 1 (off) or the number of candidates per text, e.g. --rerank=4."),
    ({"mode": "compare"}, "--mode=describe/interpolate/concept, not --mode=compare; pass --rerank=0."),
    ({"mode": "ask"}, "not --mode=ask; pass --rerank=0."),
    ({"mode": "embed"}, "not --mode=embed; pass --rerank=0."),
    ({"rerank_temperature": 0.0}, "--rerank_temperature=0.0: sampled candidates need a positive temperature"),
    ({"rerank_top_p": 1.5}, "--rerank_top_p=1.5: it must lie in (0, 1]"),
])
def test_bad_rerank_flags(changes, match):
    f = {"mode": "describe", "rerank": 3, "rerank_temperature": 0.7, "rerank_top_p": 0.95, **changes}
    with pytest.raises(UserError, match=re.escape(match)):
        decode.rerank_config(f["mode"], f["rerank"], f["rerank_temperature"], f["rerank_top_p"], 0)


def test_bad_rerank_flags_are_one_line(tiny_run, tmp_path):
    np.save(tmp_path / "two.npy", fake_encode(["a", "b"]))
    out = fails_with_one_line("ctelm_jax.decode", f"--workdir={tiny_run}", "--mode=compare",
                              f"--npy={tmp_path / 'two.npy'}", "--rerank=3")
    assert "--rerank=3 re-ranks texts by their cosine to the one embedding they describe" in out.stderr
    # The tiny run was trained on random vectors: there is no encoder to re-embed with.
    out = fails_with_one_line("ctelm_jax.decode", f"--workdir={tiny_run}", f"--npy={tmp_path / 'two.npy'}",
                              "--rerank=3")
    assert "--rerank=3 re-embeds the candidates with the run's encoder, but the run was trained on random " \
           "embeddings" in out.stderr and "pass --rerank=0." in out.stderr


def test_eval_sizes_refuse_negative_candidates():
    with pytest.raises(UserError, match=r"rerank_candidates=-1: use 0 or 1 \(off\) or a count >= 2"):
        EvalSizes(rerank_candidates=-1)
