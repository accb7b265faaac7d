"""The embedding-space explorer: its pieces on toy inputs, the nearest-trial search, and the page of a tiny run opened
in headless Chromium (Debian `chromium` + `chromium-driver`, installed by `make test`) and read through its DOM."""

import dataclasses
import json
import re
import shutil
import struct

import numpy as np
import pytest

from ctelm_jax import concepts as concepts_lib
from ctelm_jax.data import render
from ctelm_jax.explore import atlas
from ctelm_jax.explore.run import corpus, explore_run, search_run
from ctelm_jax.run.concepts import compute
from conftest import write_step0_run

TEXT = "Phase: phase 2\nConditions: {conditions}\nInterventions: x\nAges: not stated\nSex: all\nStatus: completed"


def truth(conditions, phase="phase 2"):
    return {"phase": {"value": phase, "share": 0.5}, "conditions": [[c, 3] for c in conditions]}


def test_label_agreement_and_chance():
    labels = [TEXT.format(conditions="Breast Cancer; asthma"), TEXT.format(conditions="gout")]
    truths = [truth(["breast cancer", "lymphoma"]), truth(["diabetes"], phase="phase 3")]
    assert atlas.label_agrees(labels[0], truths[0]) == {"condition": True, "phase": True}
    assert atlas.label_agrees(labels[1], truths[1]) == {"condition": False, "phase": False}
    assert atlas.label_agrees("no lines at all", truths[0]) == {"condition": False, "phase": False}
    a = atlas.agreement(labels, truths)
    assert (a["condition"], a["phase"], a["either"]) == (0.5, 0.5, 0.5)
    # Label 0 against region 1 agrees on nothing; label 1 against region 0 on the phase only.
    assert (a["condition_other_regions"], a["phase_other_regions"]) == (0.0, 0.5)
    assert atlas.agreement_line(a).startswith("region labels: 1/2 name one of their region's top-3 conditions")


def test_colour_fields():
    assert atlas.condition_group(["Asthma", "Lung Cancer"]) == "cancer"  # cancer comes first
    assert atlas.condition_group(["Asthma"]) == "respiratory"
    assert atlas.condition_group(["Overactive Bladder"]) == atlas.OTHER
    f = render.TrialFields("N", "phase 1", "completed", (), (), None, None, "all", (), ())
    ages = {(None, None): "not stated", (None, 17.0): "children only", (65.0, None): "older adults (min age >= 60)",
            (18.0, 65.0): "adults", (12.0, 40.0): "children and adults", (None, 40.0): "children and adults"}
    for (lo, hi), group in ages.items():
        assert atlas.age_group(dataclasses.replace(f, min_age=lo, max_age=hi)) == group


def test_nearest_matches_brute_force():
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    idx, cos = atlas.nearest(x, x, 5, exclude=range(50), chunk=7)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_array_equal(idx, np.argsort(-sims, axis=1)[:, :5])
    np.testing.assert_allclose(cos, np.sort(sims, axis=1)[:, ::-1][:, :5], rtol=1e-5)
    assert (np.diff(cos, axis=1) <= 0).all()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory of configs/tiny.py (random 32-d embeddings) with a checkpoint of its freshly built model and
    the built-in concepts plus a user-defined one (phase 3 minus the rest) saved with it."""
    workdir = write_step0_run(tmp_path_factory.mktemp("tiny_run"))
    concepts = compute(workdir)
    records, embeddings = corpus(workdir)
    concepts["phase3"] = concepts_lib.define("phase3", records, embeddings, lambda f: f.phase == "phase 3",
                                             lambda f: f.phase != "phase 3", "phase 3 minus the rest")
    concepts_lib.save(workdir, concepts, source="test")
    return workdir


def test_search_by_nctid_and_text(tiny_run):
    records, embeddings = corpus(tiny_run)
    ids = [r["nctid"] for r in records]
    lines = search_run(tiny_run, ids[5].lower(), k=4).splitlines()
    assert len(lines) == 5 and ids[5].lower() in lines[0]
    found = [line.split()[1] for line in lines[1:]]
    cos = [float(line.split()[0]) for line in lines[1:]]
    assert ids[5] not in found and cos == sorted(cos, reverse=True)
    u = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = u @ u[5]
    sims[5] = -np.inf
    assert found == [ids[i] for i in np.argsort(-sims)[:4]]
    with pytest.raises(ValueError, match="needs the run's sentence encoder, but the run was trained on random"):
        search_run(tiny_run, "asthma in children")
    with pytest.raises(ValueError, match="not in the run's corpus"):
        search_run(tiny_run, "NCT99999999")


def browser():
    """Headless Chromium driven by selenium through the Debian chromedriver (nothing is downloaded)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("Chromium and chromedriver are not installed; the explorer test opens its page in them. Run "
                    "`make test` as root (its set-up runs `apt-get install -y chromium chromium-driver`) or install "
                    "those Debian packages by hand.")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed; `pip install -e '.[test]'` (make setup) installs it.")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_page_in_a_browser(tiny_run):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select, WebDriverWait

    records, _ = corpus(tiny_run)
    ids = [r["nctid"] for r in records]
    pair, moved = (ids[0], ids[1]), ids[2]
    sizes = atlas.ExploreSizes(clusters=4, path_steps=3, strengths=(-1.0, 0.0, 1.0), max_new_tokens=8,
                               batch_size=16, neighbours=5)
    summary = explore_run(tiny_run, sizes, pairs=[pair], concept_nctids=[moved])
    out = tiny_run / "explore"
    assert f"{len(ids)} trials" in summary and "region labels:" in summary
    assert re.search(r"^Concept vectors (loaded from|computed from) .*\(method: centroid\)\.$", summary, re.M)
    assert png_size(out / "map.png")[0] > 500
    saved = json.loads((out / "summary.json").read_text())
    concepts = ["age", "pediatric", "sex", "phase3"]
    assert [t["name"] for t in saved["traces"]] == [f"{ids[0]} → {ids[1]}"] + [f"{c}: {moved}" for c in concepts]

    d = browser()
    try:
        d.get((out / "index.html").as_uri())
        WebDriverWait(d, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        js = d.execute_script
        # Self-contained: no external script, style, image or frame, and nothing fetched while rendering.
        assert js("return document.querySelectorAll('script[src], link[href], img[src], iframe').length") == 0
        assert js("return performance.getEntriesByType('resource').map(r => r.name)") == []
        metas = js("return document.getElementById('map').data.map(t => t.meta)")
        assert metas == ["trials", "selection", "regions", "path"] + ["concept"] * len(concepts)
        # The SVG group of each drawn trace, by its index in the figure's data (d3 binds the trace to it).
        dom_traces = ("Object.fromEntries(Array.from(document.querySelectorAll('#map .scatterlayer .trace'))"
                      ".map(g => [g.__data__[0].trace.index, g]))")
        points = js(f"const g = {dom_traces}; return Object.keys(g).map(k => [+k, g[k].querySelectorAll('path.point')"
                    ".length])")
        points = dict(points)
        assert points[0] == len(ids)  # one point per trial
        assert [points[k] for k in range(3, 4 + len(concepts))] == [3] * (1 + len(concepts))  # one per t / strength
        # Region labels drawn on the map and listed in the table with the true majority fields.
        labels = js(f"return Array.from({dom_traces}[2].querySelectorAll('text')).map(t => t.textContent)")
        assert [int(label.split(":")[0]) for label in labels] == [0, 1, 2, 3]
        rows = d.find_elements("css selector", "#regions tbody tr")
        assert len(rows) == 4
        for row, region in zip(rows, saved["regions"]):
            assert region["label"].split("\n")[0] in row.text and "phase" in row.text and "sex" in row.text
        assert len(d.find_elements("css selector", "#paths tbody tr")) == 3
        assert len(d.find_elements("css selector", "#moves tbody tr")) == 3 * len(concepts)
        # A concept arrow per move, each with its arrow path.
        arrows = js("return Array.from(document.querySelectorAll('#map g.annotation')).map("
                    "a => a.querySelectorAll('path').length)")
        assert len(arrows) == len(concepts) and all(n >= 1 for n in arrows)
        # Paths and moves are projected with the fitted map: the path's t=0 point is its first trial's point.
        ends = js("const g = document.getElementById('map'); return [g.data[3].x[0], g.data[3].y[0], "
                  f"g.data[0].x[{ids.index(pair[0])}], g.data[0].y[{ids.index(pair[0])}]]")
        np.testing.assert_allclose(ends[:2], ends[2:], atol=1e-5)

        # Hover the most isolated trial: the hover label shows its NCT id and canonical text.
        i = js(f"""const pts = Array.from({dom_traces}[0].querySelectorAll('path.point')).map(p => {{
                     const r = p.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }});
                   let best = 0, far = -1;
                   pts.forEach((p, i) => {{ let m = Infinity; pts.forEach((q, j) => {{ if (i !== j)
                     m = Math.min(m, Math.hypot(p[0] - q[0], p[1] - q[1])); }});
                     if (m > far) {{ far = m; best = i; }} }});
                   return best;""")
        point = d.execute_script(f"return {dom_traces}[0].querySelectorAll('path.point')[{i}]")
        ActionChains(d).move_to_element(point).perform()
        WebDriverWait(d, 10).until(lambda d: d.find_elements("css selector", "#map .hoverlayer .hovertext"))
        hover = d.find_element("css selector", "#map .hoverlayer .hovertext").text
        assert hover.startswith(ids[i]) and render.render_text(records[i]).split("\n")[0] in hover

        # The field selector recolours the points and rewrites the legend.
        fills = f"return Array.from({dom_traces}[0].querySelectorAll('path.point')).map(p => p.style.fill)"
        before = js(fills)
        Select(d.find_element("id", "field")).select_by_value("sex")
        sexes = {render.fields(r).sex for r in records}
        legend = [e.get_attribute("data-category") for e in d.find_elements("css selector", "#legend .legend-item")]
        assert set(legend) == sexes
        after = js(fills)
        assert len(set(after)) == len(sexes) and after != before
        Select(d.find_element("id", "field")).select_by_value("cluster")
        assert len(d.find_elements("css selector", "#legend .legend-item")) == 4

        # Search: an NCT id lists its precomputed neighbours and marks them; a substring counts its matches.
        box = d.find_element("id", "search")
        box.send_keys(ids[7])
        neighbours = d.find_elements("css selector", "#neighbours li")
        assert len(neighbours) == 5 and ids[7] not in [n.get_attribute("data-nctid") for n in neighbours]
        assert js("return document.getElementById('map').data[1].x.length") == 6
        box.clear()
        box.send_keys("phase 3")
        expected = sum("phase 3" in render.render_text(r).lower() for r in records)
        assert d.find_element("id", "search-status").text == f"{expected} matching trials"
        assert len(d.find_elements("css selector", "#matches li")) == min(expected, 20)
        assert js("return document.getElementById('map').data[1].x.length") == expected
        assert [e for e in d.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        d.quit()
