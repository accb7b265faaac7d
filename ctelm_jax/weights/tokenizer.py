"""The decoder's tokenizer: Hugging Face fast tokenizer + chat template + the reserved embedding placeholder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ctelm_jax.errors import MissingInput

PLACEHOLDER = "<|embedding|>"  # added to a tokenizer that has no reserved token
# Special tokens the decoder reserves and never generates, taken as the placeholder where the vocabulary has one (as
# OpenELM does for Llama-3), so the placeholder's id lies inside the decoder's embedding table.
RESERVED_PLACEHOLDERS = ("<|reserved_special_token_0|>",)


def default_placeholder(hf: PreTrainedTokenizerBase) -> str:
    """The tokenizer's first reserved special token (`RESERVED_PLACEHOLDERS`), else `PLACEHOLDER`."""
    vocab = hf.get_vocab()
    return next((t for t in RESERVED_PLACEHOLDERS if t in vocab), PLACEHOLDER)


class Tokenizer:
    """Encodes prompts with the model's chat template; `placeholder_id` marks where a soft token goes, and one
    embedding's `slot` is the placeholder written `tokens_per_embedding` (k) times, one per soft token."""

    def __init__(self, hf: PreTrainedTokenizerBase, placeholder: str | None = None, tokens_per_embedding: int = 1):
        if not hf.chat_template:
            raise ValueError("the tokenizer has no chat template; ctelm_jax prompts need one (tokenizer_config.json).")
        placeholder = placeholder or default_placeholder(hf)
        if placeholder not in hf.get_vocab():
            hf.add_special_tokens({"additional_special_tokens": [placeholder]})
        self.hf = hf
        self.placeholder = placeholder
        self.placeholder_id: int = hf.convert_tokens_to_ids(placeholder)
        self.tokens_per_embedding = tokens_per_embedding
        eos = {hf.eos_token_id} | {hf.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")
                                   if t in hf.get_vocab()}
        self.eos_ids: tuple[int, ...] = tuple(sorted(i for i in eos if i is not None))
        self.pad_id: int = hf.pad_token_id if hf.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def from_dir(cls, path: str | os.PathLike, placeholder: str | None = None,
                 tokens_per_embedding: int = 1) -> "Tokenizer":
        """Loads `tokenizer.json` + `tokenizer_config.json` (with chat template) from a folder."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise MissingInput(f"{path}: no tokenizer.json; export or convert the model's tokenizer there first.")
        return cls(AutoTokenizer.from_pretrained(str(path)), placeholder, tokens_per_embedding)

    @classmethod
    def from_gguf(cls, gguf_path: str | os.PathLike, placeholder: str | None = None,
                  tokens_per_embedding: int = 1) -> "Tokenizer":
        """Builds the tokenizer and chat template stored in a GGUF file's metadata."""
        gguf_path = Path(gguf_path)
        return cls(AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name), placeholder,
                   tokens_per_embedding)

    @property
    def slot(self) -> str:
        """The text that stands for one embedding in a prompt: the placeholder, k times."""
        return self.placeholder * self.tokens_per_embedding

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens in it parsed, nothing added."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Messages rendered with the model's chat template."""
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json, tokenizer_config.json and the chat template to a folder."""
        self.hf.save_pretrained(str(path))
