"""Test-wide settings: 8 fake CPU devices so sharding tests see a mesh, and shared tiny fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from ctelm_jax.weights.default import default_gguf_path  # noqa: E402
from ctelm_jax.weights.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The embedded SmolLM2 tokenizer (with the placeholder token), read from its GGUF."""
    return Tokenizer.from_gguf(default_gguf_path())
