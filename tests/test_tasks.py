"""Curriculum tasks on real records with the default decoder tokenizer: masked targets decode to the target text."""

import collections

import numpy as np
import pytest

from ctelm_jax.data import corpus, render, tasks
from ctelm_jax.weights.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def records():
    return corpus.load_records()


def _target_ids(example):
    return example["tokens"][1:][example["loss_mask"][:-1] == 1]


@pytest.mark.parametrize("task", [t for t in tasks.TASKS if t != "embed"])  # embed has no target tokens (below)
def test_masked_targets_decode_to_the_target(task, records, tokenizer):
    end = tokenizer.decode([tasks.end_of_turn_id(tokenizer)], skip_special_tokens=False)
    assert end == "<|im_end|>"
    # The edited trials of `counterfactual` (embedding rows after the corpus's) and the drafts of `revise`.
    edited = tasks.Counterfactuals(np.arange(6), ("age", "sex", "pediatric") * 2, np.asarray([1.0, -1.0] * 3),
                                   np.zeros((6, 4), np.float32))
    extras = {"counterfactuals": edited, "drafts": np.roll(np.arange(len(records)), 1)}
    for index in (0, 17, 1234, 4000):
        instruction, target, rows = tasks.make_text(task, records, index, np.random.default_rng(index), **extras)
        ex = tasks.make_example(task, records, index, np.random.default_rng(index), tokenizer, 2048, **extras)
        assert ex["task"] == task and ex["tokens"].dtype == np.int32 and ex["loss_mask"].dtype == np.float32
        assert ex["embedding_indices"].tolist() == rows
        expected = {"counterfactual": rows[:1] if rows[0] >= len(records) else None,
                    "revise": [extras["drafts"][index], index]}.get(task, [index, *rows[1:]])
        assert rows == expected
        assert np.count_nonzero(ex["tokens"] == tokenizer.placeholder_id) == len(rows) == instruction.count("{E}")
        assert tokenizer.decode(_target_ids(ex), skip_special_tokens=False) == target + end
        assert ex["loss_mask"][-1] == 0
        prompt_len = len(ex["tokens"]) - len(_target_ids(ex))
        prompt = tasks.encode_prompt(tokenizer, instruction.replace("{E}", tokenizer.placeholder))
        assert ex["tokens"][:prompt_len].tolist() == prompt
        assert ex["loss_mask"][:prompt_len - 1].sum() == 0  # nothing of the prompt is a target
        chat = tokenizer.chat([{"role": "user", "content": instruction.replace("{E}", tokenizer.placeholder)}])
        assert tokenizer.decode(prompt, skip_special_tokens=False) == chat  # generation sees the same prompt


@pytest.mark.parametrize("task", ["describe", "compare"])
def test_k_tokens_per_embedding_write_each_placeholder_k_times(task, records, tokenizer):
    three = Tokenizer(tokenizer.hf, tokenizer.placeholder, tokens_per_embedding=3)
    one = tasks.make_example(task, records, 17, np.random.default_rng(17), tokenizer, 2048)
    ex = tasks.make_example(task, records, 17, np.random.default_rng(17), three, 2048)
    ph = tokenizer.placeholder_id
    assert ex["tokens"].tolist() == [u for t in one["tokens"].tolist() for u in ([t] * 3 if t == ph else [t])]
    assert np.count_nonzero(ex["tokens"] == ph) == 3 * len(ex["embedding_indices"])
    assert ex["embedding_indices"].tolist() == one["embedding_indices"].tolist()
    assert _target_ids(ex).tolist() == _target_ids(one).tolist()


def test_task_contents(records):
    rng = np.random.default_rng(0)
    _, describe, _ = tasks.make_text("describe", records, 3, rng)
    assert describe == render.render_text(records[3])
    f = render.fields(records[3])
    answers = {tasks.make_text("attributes", records, 3, rng)[1] for _ in range(60)}
    assert answers == {tasks.attribute_answer(f, a) for a in tasks.ATTRIBUTES}
    _, compare, (i, j) = tasks.make_text("compare", records, 3, rng)
    assert i == 3 and j != 3 and compare == tasks.compare_text(f, render.fields(records[j]))
    shared, differs = compare.split("\n")
    assert shared.startswith("Shared: ") and differs.startswith("Differs: ")
    assert tasks.compare_text(f, f).endswith("Differs: nothing")
    eligibility = tasks.make_text("eligibility", records, 3, rng)[1]
    assert eligibility.startswith(f"Ages: {render.ages_text(f.min_age, f.max_age)}\nSex: {f.sex}\nInclusion:\n- ")


def test_concept_targets_edit_the_attribute(records):
    rng = np.random.default_rng(1)
    seen = collections.Counter()
    for index in range(0, 4466, 37):
        instruction, target, rows = tasks.make_text("concept", records, index, rng)
        concept = next(c for c, word in tasks.CONCEPT_WORDS.items() if f"only {word}." in instruction
                       or f"to {word}." in instruction)
        adds = "no longer" not in instruction and "not limited" not in instruction
        edited = render.parse_text(target)
        assert edited is not None and rows == [index]
        assert render.CONCEPTS[concept](edited) == adds
        assert render.CONCEPTS[concept](render.fields(records[index])) != adds  # the edit changes the trial
        seen[concept, adds] += 1
    assert {c for c, _ in seen} == set(render.CONCEPTS)


def test_truncation_and_skips(records, tokenizer):
    stats = collections.Counter()
    full = tasks.make_example("describe", records, 5, np.random.default_rng(0), tokenizer, 4096)
    cut = tasks.make_example("describe", records, 5, np.random.default_rng(0), tokenizer, 60, stats)
    assert len(cut["tokens"]) == 60 and stats["truncated"] == 1
    assert cut["tokens"].tolist() == full["tokens"][:60].tolist()  # the prompt is kept whole, the target cut
    assert cut["loss_mask"][-1] == 0 and cut["loss_mask"].sum() == 60 - (len(full["tokens"]) - full["loss_mask"].sum())
    assert tasks.make_example("compare", records, 5, np.random.default_rng(0), tokenizer, 30, stats) is None
    assert stats["skipped: prompt longer than max_len"] == 1
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_example("translate", records, 5, np.random.default_rng(0), tokenizer, 512)


def test_embed_example_pools_exactly_the_trial_text(records, tokenizer):
    for index in (0, 17, 1234):
        ex = tasks.make_example("embed", records, index, np.random.default_rng(index), tokenizer, 2048)
        text = render.render_text(records[index])  # the text the corpus embedding was made of
        assert ex["task"] == "embed" and not ex["loss_mask"].any()  # no target tokens
        assert ex["embedding_indices"].size == 0 and tokenizer.placeholder_id not in ex["tokens"]
        assert ex["target_indices"].tolist() == [index]
        assert tokenizer.decode(ex["tokens"][ex["pool_mask"] == 1], skip_special_tokens=False) == text
        assert ex["tokens"].tolist() == tasks.embed_prompt(tokenizer, text)[0]  # what embed_texts builds
    short = tasks.make_example("embed", records, 17, np.random.default_rng(0), tokenizer, 48)
    assert len(short["tokens"]) == 48 and 0 < short["pool_mask"].sum() < 48  # cut text, template kept
    assert short["tokens"][-1] == tasks.embed_prompt(tokenizer, "x")[0][-1]
