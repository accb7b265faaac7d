"""PyTorch side of exported models: `hf.reference` loads an export folder and generates without JAX."""
