"""Packaging for ctelm_jax: Embedding Language Models of clinical trials in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="ctelm_jax",
    version="0.1.0",
    description="JAX/Flax training stack for Embedding Language Models (ELMs) of clinical trials.",
    packages=find_packages(include=["ctelm_jax", "ctelm_jax.*"]),
    package_data={"ctelm_jax": ["py.typed"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.8",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "etils[epath]",
        "array-record",
        "absl-py",
        "ml_collections",
        "numpy",
        "safetensors",
        "tokenizers",
        "transformers>=5",
        "gguf",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "rouge-score",
        "sacrebleu",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "execnet"],
        # PyTorch side of the parity checks and the reference loader; CPU wheel, pinned.
        "hf": ["torch==2.13.0", "accelerate", "sentence-transformers", "peft"],
    },
)
