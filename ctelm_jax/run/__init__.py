"""A run: what a workdir holds (the resolved config, the corpus splits with their embeddings and encoder, the concept
vectors, checkpoints, the trained model on a mesh, exports) and the composition root that builds its ELM from a
config. Training writes a run through this layer; decode, eval, explore, export and hf read one through it."""
