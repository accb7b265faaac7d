"""Checks an export against its run: the PyTorch reference must reproduce ctelm_jax's greedy `describe` output.

    python -m ctelm_jax.hf.check_export --workdir=runs/default --export=runs/default/hf --n=5

Prints, for the first `n` test trials, whether the two greedy decodings (same prompt, same embedding) are identical;
exits non-zero if any differs.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from absl import app, flags

from ctelm_jax.generate import generate
from ctelm_jax.hf import reference
from ctelm_jax.prompts import describe_prompt, sampling_config, stop_ids
from ctelm_jax.run.corpus import load_splits
from ctelm_jax.run.trained import load_trained

_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory of the trained model.")
_EXPORT = flags.DEFINE_string("export", "runs/default/hf", "Its Hugging Face export (python -m ctelm_jax.export).")
_N = flags.DEFINE_integer("n", 5, "Test trials to compare.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Greedy tokens per trial.")


def strip(ids: list[int], stops: set) -> list[int]:
    """Ids up to (not including) the first stop or pad id."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def main(argv: list[str]) -> None:
    """Decodes each trial with both stacks and compares the token ids."""
    del argv
    trained = load_trained(_WORKDIR.value)
    test = load_splits(trained.config, _WORKDIR.value)["test"]
    loaded = reference.load(_EXPORT.value)
    prompt = describe_prompt(trained.tokenizer)
    stops = set(stop_ids(trained.tokenizer)) | {loaded.model.generation_config.pad_token_id}
    mismatches = 0
    for record, emb in list(zip(test.records, test.embeddings))[: _N.value]:
        ours = strip(generate(trained.model, [prompt], [np.asarray(emb)[None]],
                              sampling_config(trained.tokenizer, _MAX_NEW.value, batch_size=1), 0)[0], stops)
        theirs = strip(reference.generate_ids(loaded, torch.tensor([prompt]), torch.tensor(np.asarray(emb)[None, None]),
                                              max_new_tokens=_MAX_NEW.value)[0].tolist(), stops)
        same = ours == theirs
        mismatches += not same
        print(f"{record['nctid']}: {'identical' if same else 'DIFFERENT'} ({len(ours)} tokens) "
              f"{trained.tokenizer.decode(ours)[:100]!r}")
    print(f"{_N.value - mismatches}/{_N.value} identical")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    app.run(main)
