"""The explorer of a trained run: load it, build the atlas, write `<workdir>/explore/` (index.html, map.png,
summary.json); and nearest-trial search over the run's corpus."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

import numpy as np
from absl import logging
from etils import epath

from ctelm_jax import concepts as concepts_lib
from ctelm_jax import fs
from ctelm_jax.data import render
from ctelm_jax.data.corpus import split_of
from ctelm_jax.explore import atlas as atlas_lib
from ctelm_jax.explore import page
from ctelm_jax.run.concepts import load_or_compute
from ctelm_jax.run.config import load_run_config
from ctelm_jax.run.corpus import load_splits, run_encoder
from ctelm_jax.run.trained import load_trained


def corpus(workdir: epath.Path) -> tuple[list[dict], np.ndarray]:
    """Every record of the run's corpus (all splits) and its embeddings, row-aligned."""
    config = load_run_config(workdir)
    splits = load_splits(config, workdir)
    records = [r for s in splits.values() for r in s.records]
    return records, np.concatenate([s.embeddings for s in splits.values()])


def run_concepts(workdir: epath.Path, names: Sequence[str] = ()) -> tuple[dict[str, concepts_lib.Concept], str]:
    """The concepts saved with the run (built-in and user-defined; the built-in ones are computed and saved if the
    run has none), restricted to `names` if given, and the note saying where they came from and by which method."""
    saved, note = load_or_compute(workdir)
    missing = [n for n in names if n not in saved]
    if missing:
        raise ValueError(f"concepts {missing} are not saved with {workdir}; saved: {sorted(saved)}.")
    return ({n: saved[n] for n in names} if names else saved), note


def explore_run(workdir: str | os.PathLike, sizes: atlas_lib.ExploreSizes = atlas_lib.ExploreSizes(),
                pairs: Sequence[tuple[str, str]] = (), concept_nctids: Sequence[str] = (),
                concept_names: Sequence[str] = (), step: int | None = None) -> str:
    """Builds the run's atlas, writes `<workdir>/explore/{index.html, map.png, summary.json}` and returns a summary
    (paths written, the agreement figure, timings)."""
    clock = time.perf_counter()
    workdir = fs.as_path(workdir)
    out = workdir / "explore"
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _, trained_step = load_trained(workdir, step)
    records, embeddings = corpus(workdir)
    concepts, concepts_note = run_concepts(workdir, concept_names)
    loaded = time.perf_counter()
    atlas = atlas_lib.build_atlas(model, tokenizer, records, [split_of(r["nctid"]) for r in records], embeddings,
                                  concepts, sizes, pairs, concept_nctids)
    built = time.perf_counter()
    agreement = atlas_lib.agreement_line(atlas.agreement)
    title = f"Embedding map of run {workdir.name} (step {trained_step})"
    ex = atlas.explained
    summary = [f"{len(atlas.ids)} trials; PCA of the unit embeddings, the two axes explain {ex[0]:.1%} + "
               f"{ex[1]:.1%} of the variance; paths and concept moves are projected with the same fitted PCA.",
               f"{len(atlas.regions)} k-means regions; {agreement}.",
               f"{sum(t.kind == 'path' for t in atlas.traces)} paths, "
               f"{sum(t.kind == 'concept' for t in atlas.traces)} concept moves ({', '.join(concepts)}); greedy "
               f"decoding, at most {sizes.max_new_tokens} new tokens, no repeated {sizes.no_repeat_ngram_size}-grams.",
               f"Concept vectors {concepts_note}."]
    html_path = page.write_page(atlas, out / "index.html", title, summary, str(workdir))
    png_path = page.write_png(atlas, out / "map.png", f"{title}\n{agreement}")
    timings = {"load": round(loaded - clock, 1), "atlas (decode included)": round(built - loaded, 1),
               "write": round(time.perf_counter() - built, 1)}
    (out / "summary.json").write_text(json.dumps({
        "step": trained_step, "sizes": dataclasses.asdict(sizes), "explained_variance": list(ex),
        "agreement": atlas.agreement,
        "regions": [dataclasses.asdict(r) for r in atlas.regions],
        "traces": [{"kind": t.kind, "group": t.group, "name": t.name, "settings": list(t.settings),
                    "xy": t.xy.round(4).tolist(), "texts": list(t.texts)} for t in atlas.traces],
        "timings_s": timings}, indent=1) + "\n")
    logging.info("explore: %s", timings)
    return "\n".join([f"wrote {html_path} and {png_path}", *summary, f"took {timings}"])


def search_run(workdir: str | os.PathLike, query: str, k: int = 10) -> str:
    """The k trials of the run's corpus nearest (cosine) to an NCT id or a text, one line each."""
    workdir = fs.as_path(workdir)
    records, embeddings = corpus(workdir)
    ids = [r["nctid"] for r in records]
    encode, note = (None, "an NCT id needs none") if atlas_lib.NCT_ID.fullmatch(query.strip()) else \
        run_encoder(load_run_config(workdir))
    hits = atlas_lib.search(query, ids, embeddings, encode, k, no_encoder=note)
    lines = [f"nearest to {query!r} in {workdir}'s corpus ({len(ids)} trials), by cosine:"]
    for i, cos in hits:
        text = render.render_text(records[i]).replace("\n", " | ")
        lines.append(f"{cos:.3f}  {ids[i]}  {text[:150]}")
    return "\n".join(lines)
