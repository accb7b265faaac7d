"""Builds the ELM and its tokenizer from the `model` section of a config."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh

from ctelm_jax.errors import UserError, require_folder
from ctelm_jax.models.adapter import Adapter, standardisation
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.embed_head import EmbedHead
from ctelm_jax.models.llama import Constrain, Llama, LlamaConfig, RopeScaling, no_constraint
from ctelm_jax.models.lora import LoRAParam
from ctelm_jax.parallel.mesh import make_mesh
from ctelm_jax.parallel.rules import DEFAULT_RULES, Rules, state_shardings
from ctelm_jax.weights.hf import read_config, read_decoder, weight_files
from ctelm_jax.weights.tokenizer import Tokenizer

# Fields of the config's model section that are not Llama architecture but numerics / LoRA / compile options.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "lora_rank", "lora_alpha", "lora_targets")
# HF config.json fields that fix the parameters' shapes.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings")


RANDOM = "random"  # model.decoder value: a randomly initialised decoder of shape `model.arch` (tests, benchmarks)
DECODER_HINT = "a Hugging Face Llama folder (config.json + safetensors + tokenizer)"
# The parameters a pretrained decoder's folder provides; the rest (adapter, LoRA, adapter statistics) start fresh.
PRETRAINED = nnx.All(nnx.PathContains("decoder"), nnx.Param, nnx.Not(LoRAParam))


def hf_folder(name: str, flag: str) -> Path:
    """The folder `name` of a decoder or tokenizer setting: 'default' is the embedded SmolLM2-135M-Instruct."""
    if name == "default":
        from ctelm_jax.weights.default import default_decoder_dir
        return default_decoder_dir()
    return require_folder(name, flag, "config.json" if flag == "model.decoder" else "tokenizer.json", DECODER_HINT)


def decoder_dir(model_cfg: Mapping[str, Any]) -> Path:
    """The HF folder the decoder (and by default the tokenizer) comes from; 'default' is the embedded SmolLM2."""
    if model_cfg["decoder"] == RANDOM:
        raise UserError("model.decoder='random' has no folder to read the tokenizer from; set "
                        f"--config.model.tokenizer=PATH ('default' or {DECODER_HINT}).")
    return hf_folder(str(model_cfg["decoder"]), "model.decoder")


def _arch_config(model_cfg: Mapping[str, Any], runtime: dict[str, Any]) -> LlamaConfig:
    arch = dict(model_cfg["arch"])
    if arch.get("rope_scaling"):
        arch["rope_scaling"] = RopeScaling(**dict(arch["rope_scaling"]))
    return LlamaConfig(**arch, **runtime)


def decoder_config(model_cfg: Mapping[str, Any]) -> LlamaConfig:
    """The decoder's LlamaConfig plus runtime fields: `arch` where the config declares it (a random decoder, or the
    declared shape of a pretrained one, which `build_elm` checks against its config.json), else config.json."""
    runtime = {k: (tuple(model_cfg[k]) if k == "lora_targets" else model_cfg[k]) for k in RUNTIME_FIELDS}
    runtime["attention"] = str(model_cfg.get("attention", "auto"))  # runs saved before the key: auto
    if model_cfg.get("arch"):
        return _arch_config(model_cfg, runtime)
    if model_cfg["decoder"] == RANDOM:
        raise UserError("model.decoder='random' needs model.arch (the LlamaConfig fields of the random decoder).")
    return LlamaConfig.from_hf_dict(read_config(decoder_dir(model_cfg)), **runtime)


def check_model_sources(model_cfg: Mapping[str, Any]) -> None:
    """Fails fast, before any work, when the decoder or tokenizer folder is unset or missing, when the decoder's
    weights are not safetensors, or when its config.json differs from the shape the config declares in `arch`."""
    load_tokenizer_dir(model_cfg)
    if model_cfg["decoder"] == RANDOM:
        decoder_config(model_cfg)
        return
    folder = decoder_dir(model_cfg)
    weight_files(folder)
    if model_cfg.get("arch"):
        declared = decoder_config(model_cfg).to_hf_dict()
        found = LlamaConfig.from_hf_dict(read_config(folder)).to_hf_dict()
        diff = {k: (v, found.get(k)) for k, v in declared.items() if k in SHAPE_FIELDS and found.get(k) != v}
        if diff:
            lines = ", ".join(f"{k} {a} declared vs {b} in config.json" for k, (a, b) in diff.items())
            raise UserError(f"model.decoder={folder} is not the model the config declares in model.arch ({lines}); "
                            "point --config.model.decoder at the right folder, or use a config for this model.")


def load_tokenizer_dir(model_cfg: Mapping[str, Any]) -> Path:
    """The folder of the tokenizer: `tokenizer` when set, else the decoder folder."""
    if model_cfg.get("tokenizer"):
        return hf_folder(str(model_cfg["tokenizer"]), "model.tokenizer")
    return decoder_dir(model_cfg)


def tokens_per_embedding(model_cfg: Mapping[str, Any]) -> int:
    """k, the soft tokens per embedding (1 in runs written before the setting existed)."""
    return int(model_cfg.get("tokens_per_embedding", 1))


def load_tokenizer(model_cfg: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer named by `tokenizer`, else the decoder folder's, writing k placeholders per embedding."""
    return Tokenizer.from_dir(load_tokenizer_dir(model_cfg), tokens_per_embedding=tokens_per_embedding(model_cfg))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the ELM's structure and fresh values depend on (hashable: the initialiser's compile key)."""

    cfg: LlamaConfig
    domain_dim: int
    adapter_hidden: int
    seed: int
    placeholder_id: int
    pretrained: bool  # the decoder's base parameters come from its folder, not from the seed
    embed_pred_weight: float = 0.0  # > 0: an embedding-prediction head whose loss has this weight
    tokens_per_embedding: int = 1  # k: the adapter's soft tokens per embedding

    def __hash__(self) -> int:
        return hash(repr(self))  # by value, also when a field read from JSON is a list (eos_token_id)

    def create(self, constrain: Constrain = no_constraint,
               stats: tuple[jax.Array, jax.Array] | None = None) -> ELM:
        """The ELM with freshly initialised parameters (traced by `eval_shape` or `jit`, never run at scale);
        `stats` = the adapter's input (mean, scale)."""
        rngs = nnx.Rngs(self.seed)
        decoder = Llama(self.cfg, rngs=rngs, constrain=constrain)
        adapter = Adapter(self.domain_dim, self.adapter_hidden, self.cfg.hidden_size, rngs=rngs,
                          param_dtype=jnp.dtype(self.cfg.param_dtype), dtype=jnp.dtype(self.cfg.dtype),
                          tokens_per_embedding=self.tokens_per_embedding)
        if stats is not None:
            adapter.input_mean[...], adapter.input_scale[...] = stats
        head = EmbedHead(self.cfg.hidden_size, self.domain_dim, self.embed_pred_weight, rngs=rngs,
                         param_dtype=jnp.dtype(self.cfg.param_dtype)) if self.embed_pred_weight > 0 else None
        return ELM(decoder, adapter, self.placeholder_id, head)

    @property
    def fresh(self) -> nnx.filterlib.Filter:
        """The parameters the initialiser makes: all but those a pretrained decoder's folder provides."""
        return nnx.Not(PRETRAINED) if self.pretrained else ...


def model_spec(model_cfg: Mapping[str, Any], tokenizer: Tokenizer) -> ModelSpec:
    """The ModelSpec of a config's model section, checking that the tokenizer fits the decoder's vocabulary and
    writes the config's k placeholders per embedding."""
    cfg = decoder_config(model_cfg)
    if len(tokenizer) > cfg.vocab_size + 1:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the decoder's vocabulary is {cfg.vocab_size}; "
                         "they do not belong together (set model.tokenizer to the decoder's tokenizer).")
    k = tokens_per_embedding(model_cfg)
    if tokenizer.tokens_per_embedding != k:
        raise ValueError(f"the tokenizer writes {tokenizer.tokens_per_embedding} placeholder(s) per embedding but "
                         f"model.tokens_per_embedding={k}; build it with load_tokenizer(model_cfg).")
    return ModelSpec(cfg, int(model_cfg["domain_dim"]), int(model_cfg["adapter_hidden"]), int(model_cfg["seed"]),
                     tokenizer.placeholder_id, model_cfg["decoder"] != RANDOM,
                     float(model_cfg.get("embed_pred_weight", 0.0)), k)


def abstract_elm(model_cfg: Mapping[str, Any], tokenizer: Tokenizer, constrain: Constrain = no_constraint) -> ELM:
    """The ELM's structure: shapes, dtypes and logical axes, no values (nothing allocated, no weights read)."""
    spec = model_spec(model_cfg, tokenizer)
    return nnx.eval_shape(lambda: spec.create(constrain))


@partial(jax.jit, static_argnums=(0, 1, 2))
def _init_fresh(spec: ModelSpec, mesh: Mesh, rules: Rules, stats: tuple[jax.Array, jax.Array] | None) -> dict:
    """The fresh parameters (a pure dict), each computed straight into its shards on `mesh`."""
    state = nnx.state(spec.create(stats=stats), spec.fresh)
    shardings = nnx.to_pure_dict(state_shardings(state, mesh, rules))
    return jax.lax.with_sharding_constraint(nnx.to_pure_dict(state), shardings)


def build_elm(model_cfg: Mapping[str, Any], tokenizer: Tokenizer, constrain: Constrain = no_constraint,
              train_embeddings: np.ndarray | None = None, mesh: Mesh | None = None,
              rules: Rules = DEFAULT_RULES) -> ELM:
    """A run's step 0, created on `mesh` (default: the first local device) with every parameter already sharded by
    `rules`: the decoder (pretrained weights unless `decoder='random'`) and a fresh adapter and LoRA. Fresh parameters
    come out of one jitted initialiser straight into their shards; pretrained ones are read slice by slice
    (`weights.hf.read_decoder`), so no host holds the whole model. With `train_embeddings` and
    `standardize_adapter_input`, the adapter's input statistics come from them."""
    mesh = mesh or make_mesh({}, jax.local_devices()[:1])
    spec = model_spec(model_cfg, tokenizer)
    abstract = nnx.eval_shape(lambda: spec.create(constrain))
    standardize = train_embeddings is not None and model_cfg.get("standardize_adapter_input", False)
    states = [_init_fresh(spec, mesh, rules, standardisation(train_embeddings) if standardize else None)]
    if spec.pretrained:
        shardings = nnx.to_flat_state(state_shardings(nnx.state(abstract.decoder), mesh, rules))
        arrays = read_decoder(decoder_dir(model_cfg), abstract.decoder, {path: s.get_value() for path, s in shardings})
        states.append(traverse_util.unflatten_dict({("decoder", *path): a for path, a in arrays.items()}))
    return nnx.merge(nnx.graphdef(abstract), *states)


def model_signature(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for a checkpoint to load into this model: architecture, adapter and LoRA shapes."""
    cfg = decoder_config(model_cfg)
    arch = cfg.to_hf_dict()
    # "embed_head" only with a head and "tokens_per_embedding" only when k > 1, so that checkpoints written before
    # either existed still match.
    tokens = tokens_per_embedding(model_cfg)
    return {**{k: arch[k] for k in SHAPE_FIELDS}, "domain_dim": int(model_cfg["domain_dim"]),
            "adapter_hidden": int(model_cfg["adapter_hidden"]), "lora_rank": cfg.lora_rank,
            "lora_targets": sorted(cfg.lora_targets) if cfg.lora_rank else [], "scan_layers": cfg.scan_layers,
            **({"embed_head": True} if float(model_cfg.get("embed_pred_weight", 0.0)) > 0 else {}),
            **({"tokens_per_embedding": tokens} if tokens != 1 else {})}
