"""Decoding that revises a draft toward the target vector (`revise`, issue 29): the task's examples (draft = nearest
other trial), the rounds (each re-embeds the last text; the closest round kept, the draft only when allowed),
`decode --draft` end to end on a tiny run, the evaluation's revised rows, and the bad flags."""

import json
import re

import numpy as np
import pytest

from ctelm_jax import decode, prompts
from ctelm_jax.data import corpus, pipeline, render, tasks
from ctelm_jax.errors import UserError
from ctelm_jax.eval.suite import EvalSizes, evaluate_run
from ctelm_jax.generate import SamplingConfig
from ctelm_jax.revise import Revised, check_rounds, revise
from ctelm_jax.vectors import nearest_neighbours
from conftest import write_step0_run
from test_entry_points import fails_with_one_line
from test_eval import fake_encode
from test_rerank import flags_for

DIM = 32


def test_a_draft_shows_the_key_lines_only():
    text = "Phase: phase 2\nConditions: gout\nInclusion: adults {E} only\nExclusion: none\nStatus: completed"
    assert tasks.draft_text(text) == "Phase: phase 2\nConditions: gout\nStatus: completed"
    assert tasks.draft_text("Phase: {E}" + "x" * 1000) == ("Phase:  " + "x" * 1000)[:tasks.DRAFT_MAX_CHARS].strip()


@pytest.fixture(scope="module")
def records():
    return corpus.load_records()[:300]


def test_a_revise_example_reads_the_draft_then_the_target_and_writes_the_target(records, tokenizer):
    drafts = np.roll(np.arange(len(records)), 1)
    for index in range(20):
        ex = tasks.make_example("revise", records, index, np.random.default_rng(index), tokenizer, 4096,
                                drafts=drafts)
        assert ex["embedding_indices"].tolist() == [drafts[index], index]
        prompt = tokenizer.decode(ex["tokens"][:int(np.argmax(ex["loss_mask"])) + 1].tolist())
        assert tasks.draft_text(render.render_text(records[drafts[index]])) in prompt
        target = tokenizer.decode(ex["tokens"][1:][ex["loss_mask"][:-1] == 1].tolist()[:-1])
        assert target == render.render_text(records[index])
    with pytest.raises(ValueError, match="needs each record's draft row"):
        tasks.make_example("revise", records, 0, np.random.default_rng(0), tokenizer, 4096)


def test_revise_batches_pair_each_trial_with_its_nearest_other_trial(records, tokenizer):
    table = np.random.default_rng(0).normal(size=(len(records), DIM)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    batch = next(pipeline.make_pipeline(records, table, tokenizer, {"revise": 1.0}, 512, 4, 0, 8, process_index=0,
                                        process_count=1, embedding_dim=DIM))
    ids = [r["nctid"] for r in records]
    nearest = nearest_neighbours(table, table, ids, ids)
    pairs = 0
    for row in batch["embeddings"]:
        used = row[np.abs(row).sum(-1) > 0]
        for draft, target in zip(used[0::2], used[1::2]):
            i = int(np.argmax(table @ target))
            assert np.array_equal(table[i], target) and np.array_equal(draft, table[nearest[i]])
            pairs += 1
    assert pairs >= 4


COS = np.array([[0.3, 0.6, 0.5], [0.9, 0.2, 0.4]])  # COS[i][r]: trial i's draft (r = 0) and rounds 1, 2


def scripted(monkeypatch):
    """A decoder whose round-r text of trial i (the i-th basis vector) re-embeds at cosine COS[i][r]."""
    calls = []

    def fake_decode(model, tokenizer, prompt_ids, embeddings, config, rng=None):
        calls.append((prompt_ids, embeddings))
        return [f"trial {int(np.argmax(e[1]))} round {len(calls)}" for e in embeddings]

    def encode(texts):
        out = np.zeros((len(texts), DIM), np.float32)
        for row, text in enumerate(texts):
            i, r = int(text.split()[1]), (0 if "draft" in text else int(text.split()[-1]))
            out[row, i], out[row, DIM - 1] = COS[i, r], np.sqrt(1 - COS[i, r] ** 2)
        return out

    monkeypatch.setattr(prompts, "decode_texts", fake_decode)
    return encode, calls


def test_every_round_revises_the_last_text_and_the_closest_round_is_kept(monkeypatch, tokenizer):
    encode, calls = scripted(monkeypatch)
    targets = np.eye(DIM, dtype=np.float32)[:2]
    drafts = ["trial 0 draft", "trial 1 draft"]
    got = revise(None, tokenizer, targets, drafts, encode(drafts), SamplingConfig(), encode, rounds=2)
    np.testing.assert_allclose(got.draft_cosines, COS[:, 0], atol=1e-6)
    np.testing.assert_allclose(got.cosines, COS[:, 1:].T, atol=1e-6)
    assert got.chosen.tolist() == [1, 2]  # trial 1's draft (0.9) is closer, but not a candidate
    assert got.texts == ["trial 0 round 1", "trial 1 round 2"] and got.equal_to_draft == 0.0
    (p1, e1), (p2, e2) = calls
    assert p1 == [prompts.revise_prompt(tokenizer, d) for d in drafts]  # round 1 revises the drafts
    assert p2 == [prompts.revise_prompt(tokenizer, t) for t in got.rounds[0]]  # round 2 the round-1 texts
    assert all(np.array_equal(e[1], t) for e, t in zip(e2, targets))
    assert all(np.array_equal(e[0], v) for e, v in zip(e2, encode(got.rounds[0])))  # re-embedded, not reused
    kept = Revised(got.drafts, got.draft_cosines, got.rounds, got.cosines, keep_draft=True)
    assert kept.chosen.tolist() == [1, 0] and kept.texts[1] == "trial 1 draft" and kept.equal_to_draft == 0.5
    np.testing.assert_allclose(kept.chosen_cosines, [0.6, 0.9], atol=1e-6)


@pytest.mark.parametrize("rounds, draft, match", [
    (-1, "greedy", "--rounds=-1: pass 0 to 8 revision rounds"), (9, "neighbour", "--rounds=9: pass 0 to 8"),
    (0, "greedy", "--draft=greedy with --rounds=0 revises nothing"), (1, "best", "--draft='best': choose one of")])
def test_bad_round_counts_and_drafts(rounds, draft, match):
    with pytest.raises(UserError, match=re.escape(match)):
        check_rounds(rounds, draft)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return write_step0_run(tmp_path_factory.mktemp("revise_run"))


def test_decode_with_a_greedy_draft_end_to_end(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "run_encoder", lambda config: (fake_encode, "the test's encoder"))
    np.save(tmp_path / "two.npy", fake_encode(["a trial", "another trial"]))
    out = tmp_path / "decoded.jsonl"
    decode.decode(flags_for(tiny_run, tmp_path / "two.npy", out, rerank=0, draft="greedy", rounds=2))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row, v in zip(rows, fake_encode(["a trial", "another trial"])):
        assert row["draft_source"] == "greedy" and len(row["round_cosines"]) == 2 and row["round"] in (1, 2)
        assert row["cosine"] == row["round_cosines"][row["round"] - 1] == max(row["round_cosines"])
        assert row["cosine"] == pytest.approx(float(fake_encode([row["text"]])[0] @ v), abs=1e-4)
        assert row["draft_cosine"] == pytest.approx(float(fake_encode([row["draft"]])[0] @ v), abs=1e-4)


@pytest.mark.parametrize("changes, match", [
    ({"mode": "compare"}, "--draft=greedy revises a text toward the one vector it describes: "
                          "--mode=describe/interpolate/concept, not --mode=compare; pass --draft=none."),
    ({"rerank": 3}, "--draft=greedy and --rerank=3 both choose among texts; pass one of them"),
    ({"rounds": 99}, "--rounds=99: pass 0 to 8 revision rounds"),
    ({"draft": "neighbour"}, "--draft=neighbour drafts from the run's corpus embeddings, and random has none; pass "
                             "--draft=greedy"),
])
def test_bad_draft_flags_write_nothing(tiny_run, tmp_path, monkeypatch, changes, match):
    monkeypatch.setattr(decode, "run_encoder", lambda config: (fake_encode, "the test's encoder"))
    out = tmp_path / "decoded.jsonl"
    with pytest.raises(UserError, match=re.escape(match)):
        decode.decode(flags_for(tiny_run, tmp_path / "none.npy", out, **{"rerank": 0, "draft": "greedy", **changes}))
    assert not out.exists()


def test_a_draft_on_a_run_without_an_encoder_is_one_line(tiny_run, tmp_path):
    np.save(tmp_path / "two.npy", fake_encode(["a", "b"]))
    out = fails_with_one_line("ctelm_jax.decode", f"--workdir={tiny_run}", f"--npy={tmp_path / 'two.npy'}",
                              "--draft=greedy")
    assert "--draft=greedy re-embeds every round's text with the run's encoder, but the run was trained on random " \
           "embeddings" in out.stderr and "pass --draft=none." in out.stderr


def test_the_evaluation_has_revised_rows_for_a_run_that_trains_revise(tmp_path):
    (tmp_path / "run").mkdir()
    run = write_step0_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["stages"][-1]["tasks"]["revise"] = 0.2
    (run / "config.json").write_text(json.dumps(config))
    sizes = EvalSizes(n_test=3, max_new_tokens=8, batch_size=4, n_attribute=1, attribute_max_new_tokens=4,
                      n_concept=1, concept_max_new_tokens=4, strengths=(1.0,), n_novel=1, rerank_candidates=0,
                      revise_rounds=2)
    markdown = evaluate_run(run, sizes, encode=fake_encode, out=tmp_path / "eval")
    results = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for kind in ("neighbour", "greedy"):
        name = f"ELM, {kind} draft, 2 rounds"
        info, row = results["revise"][name], results["describe"][name]
        assert 0 <= info["equal_to_draft"] <= 1 and len(info["round_cosines"]) == 2 and set(info["chosen"]) <= {1, 2}
        assert row["cosine"]["n"] == 3 and row["seconds_per_text"] > 0
        assert f"{name}: each draft revised round after round" in markdown
    assert results["describe"]["ELM, greedy draft, 2 rounds"]["seconds_per_text"] > \
        results["describe"]["ELM"]["seconds_per_text"]  # the greedy draft's decode counts
    with pytest.raises(UserError, match="revise_rounds=9: use 0"):
        EvalSizes(revise_rounds=9)
