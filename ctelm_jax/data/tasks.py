"""Curriculum tasks: each turns corpus rows into one chat exchange whose user turn holds placeholder tokens (one
`Tokenizer.slot` of k per embedding) and whose assistant turn is the target.

Tasks (`TASKS`):
  describe     embedding -> the trial's canonical text (`render.render_fields`)
  attributes   embedding + a question about phase / conditions / interventions / ages / sex / status -> the answer,
               written as the canonical text writes that field
  compare      two embeddings -> what the trials share and how they differ, from their structured fields
  concept      embedding + a concept ("older patients", "children", "women only", "men only") -> the canonical text
               of the same trial with that attribute set (or, when the trial already has it, removed)
  eligibility  embedding -> its eligibility criteria written out in full (ages, sex, every key inclusion and
               exclusion item as a list): ctELM's eligibility-criteria generation, a longer reconstruction than
               `describe`
  offset       an embedding moved along a concept vector, `concepts.apply(e, v, a)` (v: `OFFSET_CONCEPTS`, computed
               from the training split at the start of the run; a uniform in [-OFFSET_RANGE, OFFSET_RANGE]) -> the
               canonical text of the trial moved in proportion to a (`render.move_fields`), under a `describe`
               instruction: ctELM's concept-offset training, the move the concept curves decode
  embed        the trial's canonical text (no placeholder) -> its embedding: no target tokens; the hidden states
               over the text (`pool_mask`) feed the embedding-prediction head (`models.embed_head`), the trial's
               embedding row is the target (`target_indices`)
  revise       a draft trial (its embedding and its key lines, `draft_text`) and the target embedding -> the target
               trial's canonical text: a correction step (vec2text's, retrieve-and-edit's); training drafts are
               each trial's nearest other training trial (`make_example`'s `drafts`), decoding drafts the nearest
               corpus trial or the model's own text (`ctelm_jax.revise`)
  counterfactual  the embedding of a training trial's text with its ages, sex or pediatric status edited
               (`Counterfactuals`: `render.move_fields` at +1 or -1, embedded by the run's encoder) -> the edited
               text under a `describe` instruction, or, half of the time, the answer to an ages / sex question about
               it: balanced examples of what the concept moves decode, on real embeddings of the edited texts

Tokens are `prompt + target + [end-of-turn]`, where the prompt is the chat template up to and including the
assistant header (`encode_prompt`, which generation must use too). `loss_mask[t] = 1` means `tokens[t + 1]` is a
target token (answer or end-of-turn), so it lines up with `targets[t] = tokens[t + 1]`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Mapping, Sequence, TypedDict

import numpy as np

from ctelm_jax.data import render
from ctelm_jax.weights.tokenizer import Tokenizer

TASKS: tuple[str, ...] = ("describe", "attributes", "compare", "concept", "eligibility", "offset", "embed",
                          "counterfactual", "revise")
ATTRIBUTES: tuple[str, ...] = ("phase", "conditions", "interventions", "ages", "sex", "status")
ELIGIBILITY_MAX_CHARS = 1200
OFFSET_CONCEPTS: tuple[str, ...] = ("age", "pediatric", "sex")  # the `offset` task's concept ids 1, 2, 3 (0: none)
OFFSET_RANGE = 1.0
DRAFT_MAX_CHARS = 400  # the key lines of 99% of canonical texts; ~50-90 tokens
_E = "{E}"  # stands for one embedding's placeholder tokens (`Tokenizer.slot`) in instruction templates


@dataclasses.dataclass(frozen=True)
class Counterfactuals:
    """Edited training trials for the `counterfactual` task: row r is record `rows[r]` moved along concept
    `concepts[r]` (a name in OFFSET_CONCEPTS) at `strengths[r]` (`render.move_fields`), and `embeddings[r]` is the
    encoder's embedding of that edited trial's canonical text. The pipeline appends the embeddings to the corpus
    table, so row r is embedding row len(records) + r."""

    rows: np.ndarray  # int (M,)
    concepts: tuple[str, ...]  # (M,)
    strengths: np.ndarray  # float (M,)
    embeddings: np.ndarray  # float32 (M, D)

    def __post_init__(self):
        m = len(self.rows)
        if not (len(self.concepts) == len(self.strengths) == len(self.embeddings) == m) or m == 0:
            raise ValueError(f"counterfactuals: {m} rows, {len(self.concepts)} concepts, {len(self.strengths)} "
                             f"strengths and {len(self.embeddings)} embeddings; they must be as many, at least 1.")
        unknown = set(self.concepts) - set(OFFSET_CONCEPTS)
        if unknown:
            raise ValueError(f"counterfactuals: unknown concept(s) {sorted(unknown)}; known: {OFFSET_CONCEPTS}")


class Example(TypedDict):
    """One tokenized task example."""

    tokens: np.ndarray  # int32 (L,)
    loss_mask: np.ndarray  # float32 (L,): 1 where tokens[t + 1] is a target token
    embedding_indices: np.ndarray  # int32 (n,): corpus rows whose embeddings fill the n slots, in order
    task: str
    pool_mask: np.ndarray  # float32 (L,): 1 on the tokens of the text whose embedding is predicted (`embed` only)
    target_indices: np.ndarray  # int32 (0,) or (1,): the corpus row whose embedding that text should get
    embedding_concepts: np.ndarray  # int32 (n,): per slot, 1 + the index in OFFSET_CONCEPTS to move along, 0: none
    embedding_strengths: np.ndarray  # float32 (n,): per slot, the strength of that move


# ----------------------------------------------------------------------------------------------------------------
# chat template, split once per tokenizer

@dataclasses.dataclass(frozen=True)
class _Template:
    """Token ids of the chat template around the user text and the answer."""

    before_user: tuple[int, ...]
    after_user: tuple[int, ...]  # end of the user turn + assistant header (the generation prompt)
    end_of_turn: int


def _split_template(tokenizer: Tokenizer) -> _Template:
    """Finds the fixed parts of the chat template with marker messages and encodes them."""
    user, answer = "\u27e6USER\u27e7", "\u27e6ANSWER\u27e7"
    prompt = tokenizer.chat([{"role": "user", "content": user}], add_generation_prompt=True)
    full = tokenizer.chat([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                          add_generation_prompt=False)
    before, _, after = prompt.partition(user)
    if not full.startswith(before + user + after) or answer not in full:
        raise ValueError("the chat template does not render a user turn followed by the generation prompt and the "
                         "answer; ctelm_jax tasks need a plain user/assistant template.")
    end = tokenizer.encode(full[len(before + user + after) + len(answer):])
    if not end or end[0] not in tokenizer.eos_ids:
        raise ValueError(f"the chat template does not close the answer with an end token {tokenizer.eos_ids}.")
    return _Template(tuple(tokenizer.encode(before)), tuple(tokenizer.encode(after)), end[0])


_TEMPLATES: dict[int, tuple[Tokenizer, _Template]] = {}


def _template(tokenizer: Tokenizer) -> _Template:
    """The cached template split of `tokenizer`."""
    cached = _TEMPLATES.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        cached = _TEMPLATES[id(tokenizer)] = (tokenizer, _split_template(tokenizer))
    return cached[1]


def encode_prompt(tokenizer: Tokenizer, instruction: str) -> list[int]:
    """Token ids of the chat prompt for `instruction` (with placeholder tokens) up to the assistant's first token."""
    t = _template(tokenizer)
    return [*t.before_user, *tokenizer.encode(instruction), *t.after_user]


EMBED_INSTRUCTION = "Clinical trial: "


def embed_prompt(tokenizer: Tokenizer, text: str, max_len: int | None = None) -> tuple[list[int], np.ndarray]:
    """(chat prompt ids, float32 mask of the text's tokens in it) of the `embed` task; the text is cut to fit
    `max_len` tokens. Training and `text_embedding.embed_texts` build the same prompt."""
    t = _template(tokenizer)
    head = [*t.before_user, *tokenizer.encode(EMBED_INSTRUCTION)]
    body = tokenizer.encode(text)
    if max_len is not None:
        body = body[:max(max_len - len(head) - len(t.after_user), 0)]
    mask = np.zeros(len(head) + len(body) + len(t.after_user), np.float32)
    mask[len(head):len(head) + len(body)] = 1.0
    return [*head, *body, *t.after_user], mask


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    """The token that ends an assistant turn (generation stops there)."""
    return _template(tokenizer).end_of_turn


# ----------------------------------------------------------------------------------------------------------------
# structured fields per corpus, computed once

class _View:
    """Fields of a record list, computed on first use, and an index of trials by condition."""

    def __init__(self, records: Sequence[Mapping]):
        self.records = records
        self._fields: list[render.TrialFields | None] = [None] * len(records)
        self._by_condition: dict[str, list[int]] | None = None

    def fields(self, i: int) -> render.TrialFields:
        """Fields of record i."""
        f = self._fields[i]
        if f is None:
            f = self._fields[i] = render.fields(self.records[i])
        return f

    def sharing_condition(self, i: int) -> list[int]:
        """Other rows that list one of record i's conditions (from the raw record, so no full pass of `fields`)."""
        if self._by_condition is None:
            self._by_condition = collections.defaultdict(list)
            for j, record in enumerate(self.records):
                for name in {d.lower() for d in record["diseases"]}:
                    self._by_condition[name].append(j)
        rows = {j for d in self.records[i]["diseases"] for j in self._by_condition.get(d.lower(), ())}
        rows.discard(i)
        return sorted(rows)


_VIEWS: collections.OrderedDict[int, _View] = collections.OrderedDict()


def _view(records: Sequence[Mapping]) -> _View:
    """The cached view of `records` (keyed by identity; a few kept)."""
    view = _VIEWS.get(id(records))
    if view is None or view.records is not records:
        view = _VIEWS[id(records)] = _View(records)
        while len(_VIEWS) > 4:
            _VIEWS.popitem(last=False)
    _VIEWS.move_to_end(id(records))
    return view


# ----------------------------------------------------------------------------------------------------------------
# task definitions: (instruction with {E} placeholders, target, embedding rows)

_DESCRIBE = ("Describe the clinical trial {E}.", "Summarize this clinical trial: {E}",
             "Write the summary card of the trial {E}.")
_QUESTIONS = {
    "phase": ("What phase is the trial {E}?", "Which phase of clinical development is the trial {E} in?"),
    "conditions": ("Which conditions does the trial {E} study?", "What diseases is the trial {E} about?"),
    "interventions": ("Which interventions does the trial {E} test?", "What drugs or treatments does the trial {E} "
                      "give?"),
    "ages": ("What ages can enroll in the trial {E}?", "What is the age range of the trial {E}?"),
    "sex": ("Which sexes can enroll in the trial {E}?", "Is the trial {E} open to all sexes, or to women or men "
            "only?"),
    "status": ("What is the status of the trial {E}?", "Is the trial {E} completed, terminated or ongoing?"),
}
_COMPARE = ("Compare the clinical trials {E} and {E}: what do they share and how do they differ?",
            "What do the trials {E} and {E} have in common, and where do they differ?")
CONCEPT_WORDS = {"older patients": "older patients", "children": "children", "women only": "women",
                 "men only": "men"}
_CONCEPT_ADD = ("Rewrite the trial {E} so that it enrolls only {c}.", "Change the trial {E} to enroll only {c}.")
_CONCEPT_REMOVE = ("Rewrite the trial {E} so that it no longer enrolls only {c}.",
                   "Change the trial {E} so that it is not limited to {c}.")
_REVISE = ("Revise the draft trial {E} into the trial {E}. Draft:\n{D}",
           "Edit this draft of trial {E} until it describes the trial {E}. Draft:\n{D}")
_ELIGIBILITY = ("List the eligibility criteria of the trial {E}.", "Who can take part in the trial {E}? Give the "
                "full eligibility criteria.")


def attribute_answer(f: render.TrialFields, attribute: str) -> str:
    """The answer to an `attributes` question, written as the canonical text writes that field."""
    if attribute == "conditions":
        return render.LIST_SEP.join(f.conditions) or "not stated"
    if attribute == "interventions":
        return render.LIST_SEP.join(f.interventions) or "not stated"
    if attribute == "ages":
        return render.ages_text(f.min_age, f.max_age)
    if attribute in ("phase", "sex", "status"):
        return getattr(f, attribute)
    raise ValueError(f"unknown attribute {attribute!r}; known: {ATTRIBUTES}")


def compare_text(a: render.TrialFields, b: render.TrialFields) -> str:
    """ "Shared: ..." and "Differs: ..." lines for two trials, attribute by attribute."""
    shared: list[str] = []
    differs: list[str] = []
    for name in ("phase", "conditions", "interventions", "ages", "sex", "status"):
        if name in ("conditions", "interventions"):
            x, y = getattr(a, name), getattr(b, name)
            common = [v for v in x if v.lower() in {w.lower() for w in y}]
            only_x = [v for v in x if v not in common]
            only_y = [w for w in y if w.lower() not in {v.lower() for v in common}]
            if common:
                shared.append(f"{name}: {', '.join(common)}")
            if only_x or only_y:
                differs.append(f"{name}: {', '.join(only_x) or 'none'} vs {', '.join(only_y) or 'none'}")
            continue
        x, y = attribute_answer(a, name), attribute_answer(b, name)
        (shared if x == y else differs).append(f"{name}: {x}" if x == y else f"{name}: {x} vs {y}")
    return f"Shared: {'; '.join(shared) or 'nothing'}\nDiffers: {'; '.join(differs) or 'nothing'}"


def eligibility_text(f: render.TrialFields, max_chars: int = ELIGIBILITY_MAX_CHARS) -> str:
    """Ages, sex and every key inclusion / exclusion item as a bulleted list, items cut from the end to fit."""
    inclusion, exclusion = list(f.inclusion), list(f.exclusion)

    def text() -> str:
        lines = [f"Ages: {render.ages_text(f.min_age, f.max_age)}", f"Sex: {f.sex}", "Inclusion:"]
        lines += [f"- {i}" for i in inclusion] or ["- not stated"]
        lines += ["Exclusion:"] + ([f"- {e}" for e in exclusion] or ["- not stated"])
        return "\n".join(lines)

    while len(text()) > max_chars and (inclusion or exclusion):
        (inclusion if len(inclusion) > len(exclusion) else exclusion).pop()
    return text()


def draft_text(text: str) -> str:
    """A draft as the `revise` prompt shows it: the text's lines but its criteria (Inclusion / Exclusion), i.e. the key
    facts, cut to DRAFT_MAX_CHARS characters."""
    lines = [line for line in text.replace(_E, " ").splitlines() if not line.startswith(("Inclusion:", "Exclusion:"))]
    return "\n".join(lines)[:DRAFT_MAX_CHARS].strip()


def revise_instruction(draft: str, variant: int = 0) -> str:
    """The `revise` instruction around a draft text (its `draft_text` shown), {E} marking the draft's embedding, then
    the target's."""
    return _REVISE[variant].replace("{D}", draft_text(draft))


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    """One of `options`, uniformly."""
    return options[int(rng.integers(len(options)))]


def _describe(view: _View, i: int, rng: np.random.Generator) -> tuple[str, str, list[int]]:
    return _pick(_DESCRIBE, rng), render.render_fields(view.fields(i)), [i]


def _attributes(view: _View, i: int, rng: np.random.Generator) -> tuple[str, str, list[int]]:
    attribute = _pick(ATTRIBUTES, rng)
    return _pick(_QUESTIONS[attribute], rng), attribute_answer(view.fields(i), attribute), [i]


def _compare(view: _View, i: int, rng: np.random.Generator) -> tuple[str, str, list[int]]:
    if len(view.records) < 2:
        raise ValueError("the compare task needs at least 2 records.")
    similar = view.sharing_condition(i) if rng.random() < 0.5 else []
    if similar:
        j = similar[int(rng.integers(len(similar)))]
    else:
        j = int(rng.integers(len(view.records) - 1))
        j += j >= i
    return _pick(_COMPARE, rng), compare_text(view.fields(i), view.fields(j)), [i, j]


def _concept(view: _View, i: int, rng: np.random.Generator) -> tuple[str, str, list[int]]:
    concept = _pick(tuple(render.CONCEPTS), rng)
    f = view.fields(i)
    direction = -1 if render.CONCEPTS[concept](f) else 1
    instruction = _pick(_CONCEPT_ADD if direction > 0 else _CONCEPT_REMOVE, rng)
    instruction = instruction.replace("{c}", CONCEPT_WORDS[concept])
    return instruction, render.render_fields(render.edit_fields(f, concept, direction)), [i]


def _eligibility(view: _View, i: int, rng: np.random.Generator) -> tuple[str, str, list[int]]:
    return _pick(_ELIGIBILITY, rng), eligibility_text(view.fields(i)), [i]


def _counterfactual(view: _View, counterfactuals: Counterfactuals,
                    rng: np.random.Generator) -> tuple[str, str, list[int]]:
    """A drawn edited trial (embedding row len(records) + r) -> its text, or an ages / sex answer about it."""
    r = int(rng.integers(len(counterfactuals.rows)))
    concept = counterfactuals.concepts[r]
    f = render.move_fields(view.fields(int(counterfactuals.rows[r])), concept, float(counterfactuals.strengths[r]))
    row = [len(view.records) + r]
    if rng.random() < 0.5:
        return _pick(_DESCRIBE, rng), render.render_fields(f), row
    attribute = "sex" if concept == "sex" else "ages"
    return _pick(_QUESTIONS[attribute], rng), attribute_answer(f, attribute), row


def _revise(view: _View, i: int, drafts: np.ndarray, rng: np.random.Generator) -> tuple[str, str, list[int]]:
    """Trial i's draft (row drafts[i], its nearest other trial) and its own embedding -> trial i's text."""
    j = int(drafts[i])
    instruction = revise_instruction(render.render_fields(view.fields(j)), int(rng.integers(len(_REVISE))))
    return instruction, render.render_fields(view.fields(i)), [j, i]


def offset_move(rng: np.random.Generator) -> tuple[int, float]:
    """(concept id, 1-based in OFFSET_CONCEPTS; strength uniform in [-OFFSET_RANGE, OFFSET_RANGE]) of an `offset`
    example."""
    return 1 + int(rng.integers(len(OFFSET_CONCEPTS))), float(rng.uniform(-OFFSET_RANGE, OFFSET_RANGE))


def _offset(view: _View, i: int, rng: np.random.Generator) -> tuple[str, str, list[int], int, float]:
    concept, strength = offset_move(rng)
    moved = render.move_fields(view.fields(i), OFFSET_CONCEPTS[concept - 1], strength)
    return _pick(_DESCRIBE, rng), render.render_fields(moved), [i], concept, strength


_BUILDERS: dict[str, Callable[[_View, int, np.random.Generator], tuple[str, str, list[int]]]] = {
    "describe": _describe, "attributes": _attributes, "compare": _compare, "concept": _concept,
    "eligibility": _eligibility, "offset": lambda view, i, rng: _offset(view, i, rng)[:3]}


def make_text(task: str, records: Sequence[Mapping], index: int, rng: np.random.Generator,
              counterfactuals: Counterfactuals | None = None,
              drafts: np.ndarray | None = None) -> tuple[str, str, list[int]]:
    """(instruction with {E} marking each placeholder, target text, embedding rows) of one task example (`offset`:
    the move of its one embedding is drawn too, and left out here; `make_example` keeps it; `counterfactual` draws
    one of `counterfactuals`, whatever `index`; `revise` drafts record `index` from record `drafts[index]`)."""
    if task == "counterfactual":
        if counterfactuals is None:
            raise ValueError("the counterfactual task needs the run's edited trials (`Counterfactuals`).")
        return _counterfactual(_view(records), counterfactuals, rng)
    if task == "revise":
        if drafts is None or len(drafts) != len(records):
            raise ValueError("the revise task needs each record's draft row (its nearest other record), one per "
                             "record.")
        return _revise(_view(records), index, drafts, rng)
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    return _BUILDERS[task](_view(records), index, rng)


def make_example(task: str, records: Sequence[Mapping], index: int, rng: np.random.Generator, tokenizer: Tokenizer,
                 max_len: int, stats: collections.Counter | None = None,
                 counterfactuals: Counterfactuals | None = None, drafts: np.ndarray | None = None) -> Example | None:
    """The tokenized `task` example built around record `index` (`counterfactual`: around a drawn row of
    `counterfactuals`); a target too long for `max_len` is cut (counted in `stats["truncated"]`), an example whose
    prompt leaves no room for a target is None (`stats["skipped: ..."]`)."""
    none = np.zeros(0, np.int32)
    if task == "embed":
        tokens, pool_mask = embed_prompt(tokenizer, render.render_fields(_view(records).fields(index)), max_len)
        if not pool_mask.any() or len(tokens) > max_len:
            if stats is not None:
                stats["skipped: prompt longer than max_len"] += 1
            return None
        return Example(tokens=np.asarray(tokens, np.int32), loss_mask=np.zeros(len(tokens), np.float32),
                       embedding_indices=none, task=task, pool_mask=pool_mask,
                       target_indices=np.asarray([index], np.int32), embedding_concepts=none,
                       embedding_strengths=np.zeros(0, np.float32))
    if task == "offset":
        instruction, target, rows, concept, strength = _offset(_view(records), index, rng)
        concepts, strengths = np.asarray([concept], np.int32), np.asarray([strength], np.float32)
    else:
        instruction, target, rows = make_text(task, records, index, rng, counterfactuals, drafts)
        concepts, strengths = np.zeros(len(rows), np.int32), np.zeros(len(rows), np.float32)
    instruction = instruction.replace(tokenizer.placeholder, " ").replace(_E, tokenizer.slot)
    target = target.replace(tokenizer.placeholder, " ")
    prompt = encode_prompt(tokenizer, instruction)
    room = max_len - len(prompt)
    if room < 1:
        if stats is not None:
            stats["skipped: prompt longer than max_len"] += 1
        return None
    answer = [*tokenizer.encode(target), end_of_turn_id(tokenizer)]
    if len(answer) > room:
        answer = answer[:room]
        if stats is not None:
            stats["truncated"] += 1
    tokens = np.asarray(prompt + answer, np.int32)
    loss_mask = np.zeros(len(tokens), np.float32)
    loss_mask[len(prompt) - 1:len(tokens) - 1] = 1.0
    return Example(tokens=tokens, loss_mask=loss_mask, embedding_indices=np.asarray(rows, np.int32), task=task,
                   pool_mask=np.zeros(len(tokens), np.float32), target_indices=none,
                   embedding_concepts=concepts, embedding_strengths=strengths)
