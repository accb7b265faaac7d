"""BERT in Flax NNX and a sentence-transformers-compatible `SentenceEncoder` over Hugging Face BERT folders.

`Bert` reproduces Hugging Face's `BertModel` (absolute positions, post-LayerNorm, exact erf GELU) and returns the
last hidden states. `bert_from_hf` loads HF-named tensors (PyTorch layouts, optional `bert.` prefix) into it.
`SentenceEncoder.from_dir` reads a sentence-transformers folder (modules.json, Pooling, Normalize,
sentence_bert_config.json) or a plain HF BERT folder (mean pooling) and encodes texts in fixed-shape buckets.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ctelm_jax.encoders.pooling import pool, read_pooling_mode
from ctelm_jax.errors import MissingInput
from ctelm_jax.models.layers import Dense, LogicalAxes, logical_param
from ctelm_jax.weights.hf import CheckpointError, Tensors, read_config, read_tensors

BERT_MODEL_TYPES = ("bert",)
# HF tensors a BERT checkpoint may carry that the encoder does not use (buffers, pooler and pretraining heads).
IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")
LENGTH_STEP = 32  # padded lengths are multiples of this (capped at max_length): few compiles, little padding


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder (the fields of a HF `BertConfig` that change the computation)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "BertConfig":
        """Reads a HF BERT `config.json` dict; rejects other architectures and options this module does not run."""
        model_type = hf.get("model_type")
        if model_type not in BERT_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} (architectures {hf.get('architectures')}) is not BERT; "
                f"the encoder loads model_type in {BERT_MODEL_TYPES}, e.g. all-MiniLM-L6-v2.")
        unsupported = {
            "hidden_act": (hf.get("hidden_act", "gelu"), "gelu"),
            "position_embedding_type": (hf.get("position_embedding_type", "absolute"), "absolute"),
        }
        for key, (got, want) in unsupported.items():
            if got != want:
                raise CheckpointError(f"{source}: {key}={got!r} is not supported; this BERT implements {want!r} only.")
        try:
            return cls(
                vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf.get("max_position_embeddings", 512),
                type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: required BERT config key {e.args[0]!r} is missing.") from e


class LayerNorm(nnx.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, in float32 (torch.nn.LayerNorm)."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.weight = logical_param(rngs.params(), nnx.initializers.ones, (dim,), ("norm",), jnp.float32)
        self.bias = logical_param(rngs.params(), nnx.initializers.zeros, (dim,), ("norm",), jnp.float32)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


class Embedding(nnx.Module):
    """A lookup table (num, dim)."""

    def __init__(self, num: int, dim: int, axes: LogicalAxes, *, rngs: nnx.Rngs):
        self.embedding = logical_param(rngs.params(), nnx.initializers.normal(0.02), (num, dim), axes, jnp.float32)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.embedding[...][ids]


class Embeddings(nnx.Module):
    """Word + absolute position + token type embeddings, then LayerNorm."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.word = Embedding(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), rngs=rngs)
        self.position = Embedding(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), rngs=rngs)
        self.token_type = Embedding(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), rngs=rngs)
        self.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        return self.norm(self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids))


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention with output projection, residual and post-LayerNorm."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query = Dense(d, d, ("embed", "heads"), rngs=rngs, use_bias=True)
        self.key = Dense(d, d, ("embed", "heads"), rngs=rngs, use_bias=True)
        self.value = Dense(d, d, ("embed", "heads"), rngs=rngs, use_bias=True)
        self.dense = Dense(d, d, ("heads", "embed"), rngs=rngs, use_bias=True)
        self.norm = LayerNorm(d, cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.num_heads) + mask_bias
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return self.norm(self.dense(ctx) + x)


class Layer(nnx.Module):
    """One encoder layer: self-attention block, then GELU feed-forward with residual and post-LayerNorm."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.attention = SelfAttention(cfg, rngs=rngs)
        self.intermediate = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs=rngs, use_bias=True)
        self.output = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), rngs=rngs, use_bias=True)
        self.output_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
        x = self.attention(x, mask_bias)
        return self.output_norm(self.output(jax.nn.gelu(self.intermediate(x), approximate=False)) + x)


class Bert(nnx.Module):
    """The BERT encoder: embeddings -> N layers; returns last hidden states (B, T, hidden) in float32."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Hidden states for int (B, T) ids; `attention_mask` (B, T) is 1 on tokens, 0 on padding."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"length {input_ids.shape[1]} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}; truncate the input.")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x


_MODULE_NAMES = {
    ("embeddings", "word"): "embeddings.word_embeddings",
    ("embeddings", "position"): "embeddings.position_embeddings",
    ("embeddings", "token_type"): "embeddings.token_type_embeddings",
    ("embeddings", "norm"): "embeddings.LayerNorm",
    ("attention", "query"): "attention.self.query",
    ("attention", "key"): "attention.self.key",
    ("attention", "value"): "attention.self.value",
    ("attention", "dense"): "attention.output.dense",
    ("attention", "norm"): "attention.output.LayerNorm",
    ("intermediate",): "intermediate.dense",
    ("output",): "output.dense",
    ("output_norm",): "output.LayerNorm",
}
# leaf name -> (HF leaf name, whether the HF tensor is the transpose)
_LEAF_NAMES = {"kernel": ("weight", True), "embedding": ("weight", False), "weight": ("weight", False),
               "bias": ("bias", False)}


def hf_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """The HF `BertModel` tensor name of a `Bert` parameter path and whether it is stored transposed."""
    prefix, module = ("", path[:-1]) if path[0] != "layers" else (f"encoder.layer.{path[1]}.", path[2:-1])
    leaf, transpose = _LEAF_NAMES[path[-1]]
    return f"{prefix}{_MODULE_NAMES[tuple(module)]}.{leaf}", transpose


def canonical_hf_names(tensors: Tensors) -> Tensors:
    """Drops a `bert.` prefix (task models) and renames legacy LayerNorm `gamma`/`beta` to `weight`/`bias`."""
    if any(name.startswith("bert.") for name in tensors):
        tensors = {name[len("bert."):]: t for name, t in tensors.items() if name.startswith("bert.")}
    legacy = {".gamma": ".weight", ".beta": ".bias"}
    out = {}
    for name, t in tensors.items():
        for old, new in legacy.items():
            if name.endswith(old) and "LayerNorm" in name:
                name = name[: -len(old)] + new
        out[name] = t
    return out


def bert_from_hf(model: Bert, tensors: Tensors, source: str = "checkpoint") -> None:
    """Sets every parameter of `model` (concrete or abstract) from HF BERT tensors, checking names and shapes."""
    tensors = canonical_hf_names(tensors)
    used = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = hf_name(path)
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name!r} is missing (needed for parameter "
                                  f"{'/'.join(map(str, path))}); is this a complete BERT checkpoint?")
        value = tensors[name].T if transpose else tensors[name]
        want = tuple(var.shape)
        if tuple(value.shape) != want:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but config.json implies "
                f"{want[::-1] if transpose else want}; does config.json belong to these weights?")
        var.set_value(jnp.asarray(value, jnp.float32))
        used.add(name)
    unused = sorted(n for n in set(tensors) - used if not n.startswith(IGNORED_PREFIXES))
    if unused:
        raise CheckpointError(f"{source}: {len(unused)} tensors fit no parameter of a {model.config.num_layers}-layer "
                              f"BERT (e.g. {unused[:3]}); does config.json belong to these weights?")


def load_bert(model_dir: str | os.PathLike) -> Bert:
    """A `Bert` built from a HF folder's `config.json` with its safetensors weights loaded."""
    cfg = BertConfig.from_hf_dict(read_config(model_dir), source=str(Path(model_dir) / "config.json"))
    model = nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))
    bert_from_hf(model, read_tensors(model_dir), source=str(model_dir))
    return model


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers folder says about the pipeline around the transformer."""

    transformer_dir: Path
    pooling: str
    normalize: bool
    max_seq_length: int | None
    do_lower_case: bool


def read_sentence_config(path: str | os.PathLike) -> SentenceConfig:
    """Parses `modules.json` and `sentence_bert_config.json`; without modules.json: mean pooling, no L2 (as ST)."""
    path = Path(path)
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return SentenceConfig(path, "mean", False, None, False)
    try:
        modules = json.loads(modules_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{modules_file}: not valid JSON ({e}).") from e
    kinds = {m["type"].rsplit(".", 1)[-1]: path / m.get("path", "") for m in modules}
    unsupported = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if unsupported or "Transformer" not in kinds or "Pooling" not in kinds:
        raise ValueError(f"{modules_file}: modules {sorted(kinds)}; the encoder runs Transformer -> Pooling "
                         "(-> Normalize) only.")
    transformer_dir = kinds["Transformer"]
    st_cfg_file = transformer_dir / "sentence_bert_config.json"
    st_cfg = json.loads(st_cfg_file.read_text()) if st_cfg_file.is_file() else {}
    return SentenceConfig(
        transformer_dir, read_pooling_mode(kinds["Pooling"]), "Normalize" in kinds,
        st_cfg.get("max_seq_length"), bool(st_cfg.get("do_lower_case", False)))


def _lowercase_inputs(tokenizer: PreTrainedTokenizerBase) -> None:
    """Prepends a Lowercase normaliser to a fast tokenizer (sentence-transformers' `do_lower_case`)."""
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    rest = [backend.normalizer] if backend.normalizer is not None else []
    backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])


def _forward(graphdef: nnx.GraphDef, pooling: str, normalize: bool, state: nnx.State, tokens: jax.Array,
             mask: jax.Array) -> jax.Array:
    """Pooled (and maybe normalised) sentence embeddings of one padded batch."""
    return pool(nnx.merge(graphdef, state)(tokens, mask), mask, pooling, normalize)


class SentenceEncoder:
    """Texts -> float32 sentence embeddings, matching sentence-transformers on the same folder.

    Batches are padded to fixed buckets (lengths 32, 64, 96, ... up to `max_length`; batch sizes powers of two up to
    `batch_size`, multiples of the mesh size) so the jitted forward compiles a few times only. With a `mesh`, each
    batch is split over all its devices (data parallel) and the parameters are replicated.
    """

    def __init__(
        self, model: Bert, tokenizer: PreTrainedTokenizerBase, *, pooling: str, normalize: bool, max_length: int,
        name: str, mesh: Mesh | None = None,
    ):
        if max_length > model.config.max_position_embeddings:
            raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings="
                             f"{model.config.max_position_embeddings}.")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self.name = name
        self.mesh = mesh
        graphdef, state = nnx.split(model)
        if mesh is not None:
            state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
            self._batch_sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
        self._state = state
        self._forward = jax.jit(functools.partial(_forward, graphdef, pooling, normalize))

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike, max_length: int | None = None, mesh: Mesh | None = None, name: str | None = None,
    ) -> "SentenceEncoder":
        """Loads a sentence-transformers (or plain HF BERT) folder; `max_length` overrides its max_seq_length."""
        path = Path(path)
        if not path.is_dir():
            raise MissingInput(f"{path}: no such encoder folder; pass a sentence-transformers/HF BERT folder.")
        sc = read_sentence_config(path)
        model = load_bert(sc.transformer_dir)
        if not (sc.transformer_dir / "tokenizer.json").is_file():
            raise MissingInput(f"{sc.transformer_dir}: no tokenizer.json; the encoder needs the model's tokenizer.")
        tokenizer = AutoTokenizer.from_pretrained(str(sc.transformer_dir))
        if sc.do_lower_case:
            _lowercase_inputs(tokenizer)
        default_length = sc.max_seq_length or min(tokenizer.model_max_length, model.config.max_position_embeddings)
        return cls(model, tokenizer, pooling=sc.pooling, normalize=sc.normalize,
                   max_length=max_length or default_length, name=name or path.name, mesh=mesh)

    @property
    def dim(self) -> int:
        """Width of the embeddings."""
        return self.model.config.hidden_size

    @property
    def num_shards(self) -> int:
        """How many devices a batch is split over."""
        return 1 if self.mesh is None else self.mesh.size

    @property
    def compiled_shapes(self) -> int:
        """How many (batch, length) buckets the forward pass has been compiled for so far."""
        return self._forward._cache_size()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text ([CLS] ... [SEP]), stripped of outer whitespace and truncated to `max_length`."""
        enc = self.tokenizer([t.strip() for t in texts], truncation=True, max_length=self.max_length)
        return enc["input_ids"]

    def length_bucket(self, n: int) -> int:
        """The padded length for a batch whose longest text has n tokens."""
        return min(-(-max(n, 1) // LENGTH_STEP) * LENGTH_STEP, self.max_length)

    def batch_bucket(self, n: int, batch_size: int) -> int:
        """The padded batch size for n texts: a power of two up to `batch_size`, a multiple of the shard count."""
        b = 1
        while b < n:
            b *= 2
        b = min(b, batch_size)
        return -(-b // self.num_shards) * self.num_shards

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: Callable[[int], Any] | None = None,
    ) -> np.ndarray:
        """Embeds texts as float32 (N, dim), batching texts of similar length; `progress(n)` after each batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; it must be positive.")
        ids = self.tokenize(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros((len(ids), self.dim), np.float32)
        pad_id = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            length = self.length_bucket(max(len(ids[i]) for i in rows))
            tokens = np.full((self.batch_bucket(len(rows), batch_size), length), pad_id, np.int32)
            mask = np.zeros(tokens.shape, np.int32)
            for j, i in enumerate(rows):
                tokens[j, : len(ids[i])] = ids[i]
                mask[j, : len(ids[i])] = 1
            if self.mesh is not None:
                tokens, mask = jax.device_put((tokens, mask), self._batch_sharding)
            out[rows] = np.asarray(self._forward(self._state, tokens, mask))[: len(rows)]
            if progress is not None:
                progress(len(rows))
        return out
