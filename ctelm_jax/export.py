"""Exports a trained run as a Hugging Face folder (decoder + adapter in one state dict, tokenizer, concepts).

    python -m ctelm_jax.export --checkpoint=runs/default --out=runs/default/hf [--step=N] [--lora=merge|peft]
        [--overwrite] [--max_shard_size=5GB]

Load the folder with `ctelm_jax.hf.reference.load` (PyTorch, no JAX) or back into ctelm_jax with
`ctelm_jax.weights.elm_export.import_elm`. Flags are defined only when this module runs as a program, so importing
it never clashes with other entry points' flags (`--out`, `--step`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from absl import app, flags, logging
from etils import epath

from ctelm_jax import console
from ctelm_jax.errors import UserError
from ctelm_jax.run.export import export_run
from ctelm_jax.weights.elm_export import LORA_MODES

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as '5GB' (powers of 1000), '500MiB' (powers of 1024) or '1000000'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise UserError(f"--max_shard_size={text!r}: expected a number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, "
                         "GiB, TiB).")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def define_flags(fv: flags.FlagValues) -> None:
    """Defines the export flags in `fv`."""
    flags.DEFINE_string("checkpoint", None, "Run directory (the --workdir of training; local or gs://).",
                        flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the latest.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder (local or gs://); must not exist or be empty unless --overwrite.",
                        flag_values=fv)
    flags.DEFINE_enum("lora", "merge", LORA_MODES, "merge: LoRA folded into the base weights; peft: kept as a PEFT "
                      "adapter (adapter_config.json + adapter_model.safetensors) beside them.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out (atomically).", flag_values=fv)
    flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file before sharding, e.g. 5GB, 500MiB.",
                        flag_values=fv)
    flags.mark_flags_as_required(["checkpoint", "out"], flag_values=fv)


def run(fv: flags.FlagValues) -> epath.Path:
    """Exports the run named by parsed flags `fv`; returns the folder."""
    return export_run(fv.checkpoint, fv.out, fv.step, fv.lora, fv.overwrite, parse_size(fv.max_shard_size))


def main(argv: Sequence[str]) -> None:
    """Exports --checkpoint's run to --out."""
    del argv
    logging.info("exported %s to %s", flags.FLAGS.checkpoint, run(flags.FLAGS))


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(console.entry_point(main, "ctelm_jax.export"))
