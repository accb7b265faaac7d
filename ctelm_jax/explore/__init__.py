"""See the embedding space: a map of a run's corpus embeddings with regions, paths and concept directions read
aloud by the ELM (`atlas.py`: the content; `page.py`: the HTML page and PNG; `run.py`: a run in, files out).

    python -m ctelm_jax.explore --workdir=runs/default
"""
