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
        "gcsfs",  # gs:// workdirs and exports (epath's gs:// backend)
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
        "plotly",  # the explorer page (plotly.js inlined)
        "scikit-learn",  # the explorer's PCA, k-means
        "rouge-score",
        "sacrebleu",
    ],
    extras_require={
        # selenium drives the Debian chromium + chromium-driver that `make test` installs (it downloads nothing).
        # gcp-storage-emulator serves gs:// on 127.0.0.1 for tests/test_remote_workdir.py.
        "test": ["pytest", "pytest-xdist", "execnet", "selenium", "gcp-storage-emulator"],
        # PyTorch side of the parity checks and the reference loader; CPU wheel, pinned.
        "hf": ["torch==2.13.0", "accelerate", "sentence-transformers", "peft"],
        # The TPU compiler (libtpu) for `ctelm_jax.aot` on machines without a TPU; JAX stays on CPU there.
        "tpu": ["jax[tpu]"],
    },
)
