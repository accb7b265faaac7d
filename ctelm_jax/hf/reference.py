"""A PyTorch reference for exported ELM folders: load, splice soft tokens, generate (no JAX needed).

    python -m ctelm_jax.hf.reference --model=runs/default/hf --embeddings=trial.npy \
        --prompt="Describe the clinical trial <|embedding|>."

`--embeddings` holds one vector per placeholder in the prompt, shape (n, d) (or (d,) for one). The folder is what
`python -m ctelm_jax.export` writes: a Hugging Face Llama folder whose state dict also holds the adapter
(`adapter.0.*`, `adapter.2.*`), with the LoRA merged in or as a PEFT adapter beside it. A model with
`tokens_per_embedding` = k > 1 in config.json turns each embedding into k soft tokens (`adapter.2`'s outputs split in
k, in order) at k consecutive placeholders: `generate` writes each placeholder of the prompt k times.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

ADAPTER_PREFIX = "adapter."
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


class Loaded(NamedTuple):
    """An exported ELM in PyTorch: the decoder, its tokenizer and the embedding adapter."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    adapter: torch.nn.Sequential


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the folder's state dict (all shards, or the single file)."""
    index = folder / INDEX_FILE
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE}; is this an exported ELM folder?")


def load_adapter(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """The adapter Linear -> ReLU -> Linear, from the `adapter.*` tensors of the folder's state dict."""
    folder = Path(folder)
    state = {}
    for path in _weight_files(folder):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in {INDEX_FILE} is missing.")
        with safe_open(str(path), framework="pt") as f:
            state.update({k[len(ADAPTER_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(ADAPTER_PREFIX)})
    if set(state) != {"0.weight", "0.bias", "2.weight", "2.bias"}:
        raise KeyError(f"{folder}: expected adapter.0.weight/bias and adapter.2.weight/bias in the state dict, "
                       f"found {sorted(ADAPTER_PREFIX + k for k in state)}.")
    (hidden, domain), model_dim = state["0.weight"].shape, state["2.weight"].shape[0]
    adapter = torch.nn.Sequential(torch.nn.Linear(domain, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, model_dim))
    adapter.load_state_dict(state)
    return adapter.to(dtype).eval()


def _merge_peft(model: LlamaForCausalLM, folder: Path) -> None:
    """Adds the folder's PEFT LoRA updates (alpha / r) * B @ A to the base weights in place (when peft is absent)."""
    config = json.loads((folder / PEFT_CONFIG).read_text())
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    factors = load_file(str(folder / PEFT_WEIGHTS))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in factors.items():
            if key.endswith(".lora_A.weight"):
                module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
                b = factors[key.replace(".lora_A.", ".lora_B.")]
                weight = params[module + ".weight"]
                weight.copy_((weight.float() + scale * (b.float() @ a.float())).to(weight.dtype))


def _fold_injected_lora(model: LlamaForCausalLM) -> None:
    """Merges LoRA layers that transformers' PEFT integration injected and puts their base layers back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], module.get_base_layer())
    model._hf_peft_config_loaded = False


def load(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Loaded:
    """Loads an exported ELM folder: LlamaForCausalLM (LoRA merged), tokenizer, adapter.

    transformers reads the decoder and reports the `adapter.*` tensors as unexpected keys (they are read here).
    """
    folder = Path(folder)
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)  # never a pickle
    # With peft installed, transformers injects a PEFT adapter stored in the folder itself: fold it into the base
    # layers so the model is a plain LlamaForCausalLM either way; without peft, merge the factors here.
    if getattr(model, "_hf_peft_config_loaded", False):
        _fold_injected_lora(model)
    elif (folder / PEFT_CONFIG).is_file():
        _merge_peft(model, folder)
    return Loaded(model.eval(), AutoTokenizer.from_pretrained(str(folder)), load_adapter(folder, dtype))


def tokens_per_embedding(model: LlamaForCausalLM) -> int:
    """k, the soft tokens per embedding (config.json's `tokens_per_embedding`, absent: 1)."""
    return int(getattr(model.config, "tokens_per_embedding", 1))


def embed_inputs(
    model: LlamaForCausalLM, adapter: torch.nn.Sequential, input_ids: torch.Tensor, embeddings: torch.Tensor,
    placeholder_id: int | None = None,
) -> torch.Tensor:
    """Input embeddings (B, T, D) with the adapter's soft tokens at the placeholders of row b: with k soft tokens per
    embedding, token j of adapter(embeddings[b, e]) at placeholder e * k + j.

    `input_ids` (B, T); `embeddings` (B, E, d). The placeholder id (default: config.json's `placeholder_token_id`)
    may lie past the model's vocabulary, so it is never looked up.
    """
    placeholder_id = model.config.placeholder_token_id if placeholder_id is None else placeholder_id
    is_placeholder = input_ids == placeholder_id
    counts = is_placeholder.sum(dim=1)
    token_embeds = model.get_input_embeddings()(input_ids.masked_fill(is_placeholder, 0))
    b, e, _ = embeddings.shape
    soft = adapter(embeddings.to(next(adapter.parameters()).dtype)).to(token_embeds.dtype)
    soft = soft.reshape(b, e * tokens_per_embedding(model), token_embeds.shape[-1])  # (B, E * k, D)
    if int(counts.max()) > soft.shape[1]:
        raise ValueError(f"a row has {int(counts.max())} placeholder tokens but only {e} embeddings of "
                         f"{tokens_per_embedding(model)} soft token(s) were given.")
    slot = (is_placeholder.cumsum(dim=1) - 1).clamp(min=0)
    gathered = torch.gather(soft, 1, slot[..., None].expand(-1, -1, soft.shape[-1]))
    return torch.where(is_placeholder[..., None], gathered, token_embeds)


def generate_ids(
    loaded: Loaded, input_ids: torch.Tensor, embeddings: torch.Tensor, max_new_tokens: int = 128,
    greedy: bool = True,
) -> torch.Tensor:
    """New token ids (B, <= max_new_tokens) continuing unpadded `input_ids` (B, T) with their embeddings (B, E, d)."""
    with torch.no_grad():
        embeds = embed_inputs(loaded.model, loaded.adapter, input_ids, embeddings)
        return loaded.model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            do_sample=not greedy, pad_token_id=loaded.model.generation_config.pad_token_id)


def generate(
    folder_or_loaded: str | os.PathLike | Loaded, prompt: str, embeddings: np.ndarray | torch.Tensor,
    max_new_tokens: int = 128, greedy: bool = True, chat: bool = True,
) -> str:
    """The model's answer to `prompt`, whose placeholder tokens receive `embeddings` (n, d) in order (each one written
    k times for a model of k soft tokens per embedding)."""
    loaded = folder_or_loaded if isinstance(folder_or_loaded, Loaded) else load(folder_or_loaded)
    tokenizer, config = loaded.tokenizer, loaded.model.config
    prompt = prompt.replace(config.placeholder_token, config.placeholder_token * tokens_per_embedding(loaded.model))
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    embeddings = torch.as_tensor(np.asarray(embeddings, np.float32)).reshape(-1, loaded.adapter[0].in_features)
    placeholders = ids.count(config.placeholder_token_id) // tokens_per_embedding(loaded.model)
    if placeholders != len(embeddings):
        raise ValueError(f"the prompt has {placeholders} placeholder tokens "
                         f"({config.placeholder_token!r}) but {len(embeddings)} embeddings were given.")
    new = generate_ids(loaded, torch.tensor([ids]), embeddings[None], max_new_tokens, greedy)
    return tokenizer.decode(new[0], skip_special_tokens=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the answer of an exported model to --prompt with --embeddings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Exported ELM folder.")
    parser.add_argument("--embeddings", required=True, help=".npy of shape (n, d): one row per placeholder.")
    parser.add_argument("--prompt", required=True, help="Prompt text with n placeholder tokens.")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--no_chat", action="store_true", help="Use the prompt as is, without the chat template.")
    args = parser.parse_args(argv)
    print(generate(args.model, args.prompt, np.load(args.embeddings), args.max_new_tokens, greedy=not args.sample,
                   chat=not args.no_chat))


if __name__ == "__main__":
    main()
