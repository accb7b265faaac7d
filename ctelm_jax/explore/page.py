"""The explorer's outputs: one self-contained HTML page (plotly.js inlined: opens with no network) and a PNG of the
same map.

The page holds a single SVG scatter of the trials (hover: NCT id and canonical text), recoloured by the field chosen
in `#field` (`#legend` lists its categories); the regions with their ELM labels (`#regions` table beside their true
majority fields), the paths and the concept moves (arrows towards positive strength) drawn over it with their decoded
texts; and a client-side search (`#search`: NCT id or text substring) that lists matches and shows a trial's
precomputed cosine neighbours. Searching by meaning needs the encoder: `python -m ctelm_jax.explore --search=...`.
"""

from __future__ import annotations

import collections
import html
import json
import re
import textwrap
from typing import Any, Sequence

import matplotlib
import numpy as np
from etils.epath import Path

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import plotly.colors  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import plotly.io as pio  # noqa: E402

from ctelm_jax.explore.atlas import FIELDS, Atlas, Region, Trace  # noqa: E402

PALETTE: tuple[str, ...] = tuple(plotly.colors.qualitative.D3) + tuple(plotly.colors.qualitative.Dark24)
CONCEPT_PALETTE: tuple[str, ...] = ("#000000", "#e7298a", "#1b9e77", "#a6761d", "#7570b3", "#d95f02")
PATH_COLOUR = "#444444"
HOVER_WIDTH = 90  # characters per hover line
SEARCH_HINT = "python -m ctelm_jax.explore --workdir={workdir} --search=\"a trial text\""


def hover(text: str) -> str:
    """A text as plotly hover markup: HTML-escaped, lines wrapped at HOVER_WIDTH, joined by <br>."""
    lines = [w for line in text.split("\n") for w in textwrap.wrap(line, HOVER_WIDTH) or [""]]
    return "<br>".join(html.escape(line, quote=False) for line in lines)


def short_label(region: Region) -> str:
    """"<index>: <first decoded condition> (<decoded phase>)", or the label's start if it has no Conditions line."""
    conditions = re.search(r"^Conditions: ([^;\n]*)", region.label, re.M)
    phase = re.search(r"^Phase: (.*)$", region.label, re.M)
    if conditions:
        text = conditions.group(1)[:36] + (f" ({phase.group(1)[:16]})" if phase else "")
    else:
        text = region.label.replace("\n", " ")[:40] or "(empty)"
    return f"{region.index}: {text}"


def truth_text(region: Region) -> str:
    """A region's true majority fields in one line."""
    m = region.majority
    conditions = ", ".join(f"{c} ({n})" for c, n in m["conditions"]) or "none"
    return (f"phase {m['phase']['value']} ({m['phase']['share']:.0%}); conditions {conditions}; sex "
            f"{m['sex']['value']} ({m['sex']['share']:.0%}); ages {m['age group']['value']} "
            f"({m['age group']['share']:.0%})")


def concept_colours(atlas: Atlas) -> dict[str, str]:
    """A colour per concept drawn, in order of appearance."""
    names = dict.fromkeys(t.group for t in atlas.traces if t.kind == "concept")
    return {name: CONCEPT_PALETTE[i % len(CONCEPT_PALETTE)] for i, name in enumerate(names)}


def field_data(atlas: Atlas) -> dict[str, dict[str, Any]]:
    """Per field: categories (most common first), their counts and colours, and each trial's category code."""
    out = {}
    for name in FIELDS:
        values = atlas.categories[name]
        counts = collections.Counter(values).most_common()
        code = {value: c for c, (value, _) in enumerate(counts)}
        out[name] = {"categories": [v for v, _ in counts], "counts": [n for _, n in counts],
                     "palette": [PALETTE[c % len(PALETTE)] for c in range(len(counts))],
                     "codes": [code[v] for v in values]}
    return out


def _trace_hover(trace: Trace) -> list[str]:
    """Hover text of each point of a path or concept move."""
    key = "t" if trace.kind == "path" else "strength"
    return [f"<b>{html.escape(trace.name)}</b>, {key} = {s:g}<br>{hover(t)}" for s, t in zip(trace.settings,
                                                                                          trace.texts)]


def coords(values: np.ndarray) -> list[float]:
    """Map coordinates as a plain list (plotly would encode an array as base64, which the page's script cannot
    index), rounded to 6 decimals."""
    return np.round(np.asarray(values, np.float64), 6).tolist()


def figure(atlas: Atlas, fields: dict[str, dict[str, Any]], initial: str) -> go.Figure:
    """The map: trials (trace 0), the search selection (1), regions (2), then paths and concept moves."""
    first = fields[initial]
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=coords(atlas.xy[:, 0]), y=coords(atlas.xy[:, 1]), mode="markers", name="trials", meta="trials",
        showlegend=False, customdata=atlas.ids, text=[hover(t) for t in atlas.texts],
        hovertemplate="<b>%{customdata}</b><br>%{text}<extra></extra>",
        marker={"size": 5, "opacity": 0.75, "color": [first["palette"][c] for c in first["codes"]]}))
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="search", meta="selection", showlegend=False,
                             hoverinfo="skip", marker={"size": 12, "color": "rgba(0,0,0,0)",
                                                       "line": {"width": 2, "color": "black"}}))
    regions = atlas.regions
    fig.add_trace(go.Scatter(
        x=[r.xy[0] for r in regions], y=[r.xy[1] for r in regions], mode="markers+text", meta="regions",
        name="regions (ELM label)", text=[html.escape(short_label(r)) for r in regions], textposition="top center",
        textfont={"size": 11}, cliponaxis=False, hoverinfo="text",
        marker={"symbol": "diamond", "size": 11, "color": "black"},
        hovertext=[f"<b>region {r.index}</b> ({r.size} trials)<br><i>ELM:</i><br>{hover(r.label)}<br><i>true:</i> "
                   f"{hover(truth_text(r))}" for r in regions]))
    colours = concept_colours(atlas)
    for trace in atlas.traces:
        colour = PATH_COLOUR if trace.kind == "path" else colours[trace.group]
        dash = "dot" if trace.kind == "path" else "solid"
        fig.add_trace(go.Scatter(
            x=coords(trace.xy[:, 0]), y=coords(trace.xy[:, 1]), mode="lines+markers", meta=trace.kind,
            name=trace.name, legendgroup=trace.group,
            line={"color": colour, "dash": dash, "width": 2}, marker={"size": 7, "color": colour},
            hoverinfo="text", hovertext=_trace_hover(trace)))
        if trace.kind == "concept":
            lo, hi = trace.arrow()
            fig.add_annotation(x=trace.xy[hi, 0], y=trace.xy[hi, 1], ax=trace.xy[lo, 0], ay=trace.xy[lo, 1],
                               xref="x", yref="y", axref="x", ayref="y", text="", showarrow=True, arrowhead=2,
                               arrowsize=1.3, arrowwidth=2, arrowcolor=colour, name=trace.name)
    ex = atlas.explained
    fig.update_layout(
        template="plotly_white", height=760, hovermode="closest", margin={"l": 50, "r": 20, "t": 30, "b": 50},
        hoverlabel={"align": "left", "font": {"size": 11}}, legend={"font": {"size": 11}},
        xaxis={"title": f"PC 1 ({ex[0]:.1%} of variance)", "zeroline": False},
        yaxis={"title": f"PC 2 ({ex[1]:.1%} of variance)", "zeroline": False})
    return fig


def _rows(cells: Sequence[Sequence[str]]) -> str:
    """HTML table rows of already-escaped cells."""
    return "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells)


def _pre(text: str) -> str:
    """A decoded text as an escaped <pre> block."""
    return f"<pre>{html.escape(text)}</pre>"


def _tables(atlas: Atlas) -> str:
    """The regions, paths and concept-move tables."""
    mark = {True: "yes", False: "no"}
    regions = _rows([[str(r.index), str(r.size), _pre(r.label), html.escape(truth_text(r)),
                      f"conditions: {mark[r.agrees['condition']]}, phase: {mark[r.agrees['phase']]}",
                      html.escape(r.medoid)] for r in atlas.regions])
    traces = {kind: _rows([[html.escape(t.name), f"{s:g}", _pre(text)] for t in atlas.traces if t.kind == kind
                           for s, text in zip(t.settings, t.texts)]) for kind in ("path", "concept")}
    return f"""
<h2>Regions read aloud</h2>
<p>k-means regions of the embeddings (full space), each centroid decoded by the ELM (<code>describe</code>) beside
what is true of the region's trials. The label agrees when its Conditions line names one of the region's top-3
conditions, or its Phase line is the majority phase.</p>
<table id="regions"><thead><tr><th>region</th><th>trials</th><th>ELM label (centroid)</th><th>true majority</th>
<th>label agrees</th><th>medoid</th></tr></thead><tbody>
{regions}
</tbody></table>
<h2>Paths</h2>
<p>Interpolations between two trials (normalised to unit length), each point decoded.</p>
<table id="paths"><thead><tr><th>path</th><th>t</th><th>decoded</th></tr></thead><tbody>
{traces["path"]}
</tbody></table>
<h2>Concept directions</h2>
<p>Trials moved along each concept vector of the run (the summary above says which vectors, and by which method);
arrows point towards positive strength (older / children / women for the built-in concepts).</p>
<table id="moves"><thead><tr><th>concept: trial</th><th>strength</th><th>decoded</th></tr></thead><tbody>
{traces["concept"]}
</tbody></table>"""


_SCRIPT = """
function explorer(gd, data) {
  const field = document.getElementById('field');
  const legend = document.getElementById('legend');
  const search = document.getElementById('search');
  const matches = document.getElementById('matches');
  const neighbours = document.getElementById('neighbours');
  const status = document.getElementById('search-status');
  const ids = data.ids, lowerIds = ids.map(s => s.toLowerCase());
  const plain = gd.data[0].text.map(t => t.replace(/<br>/g, ' ').toLowerCase());
  const esc = s => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

  function colour(name) {
    const f = data.fields[name];
    Plotly.restyle(gd, {'marker.color': [f.codes.map(c => f.palette[c])]}, [0]);
    legend.innerHTML = '';
    f.categories.forEach((cat, c) => {
      const item = document.createElement('span');
      item.className = 'legend-item';
      item.dataset.category = cat;
      item.innerHTML = '<span class="swatch" style="background:' + f.palette[c] + '"></span>' + esc(cat) +
        ' (' + f.counts[c] + ')';
      legend.appendChild(item);
    });
  }

  function item(i, note) {
    const li = document.createElement('li');
    li.dataset.nctid = ids[i];
    li.textContent = ids[i] + (note ? ' ' + note : '') + ': ' + gd.data[0].text[i].split('<br>')[0];
    li.addEventListener('click', () => show(i));
    return li;
  }

  function show(i) {
    const rows = [i].concat(data.neighbours[i]);
    Plotly.restyle(gd, {x: [rows.map(r => gd.data[0].x[r])], y: [rows.map(r => gd.data[0].y[r])]}, [1]);
    neighbours.innerHTML = '<b>Nearest to ' + ids[i] + ' (cosine):</b>';
    const list = document.createElement('ol');
    data.neighbours[i].forEach((j, k) => list.appendChild(item(j, data.cosines[i][k].toFixed(3))));
    neighbours.appendChild(list);
  }

  function find() {
    const q = search.value.trim().toLowerCase();
    matches.innerHTML = '';
    neighbours.innerHTML = '';
    if (!q) { status.textContent = ''; Plotly.restyle(gd, {x: [[]], y: [[]]}, [1]); return; }
    const exact = lowerIds.indexOf(q);
    const hits = [];
    const qe = esc(q);
    for (let i = 0; i < ids.length; i++) if (lowerIds[i].includes(q) || plain[i].includes(qe)) hits.push(i);
    status.textContent = hits.length + ' matching trial' + (hits.length === 1 ? '' : 's');
    hits.slice(0, 20).forEach(i => matches.appendChild(item(i, '')));
    if (exact >= 0) show(exact);
    else if (hits.length) Plotly.restyle(gd, {x: [hits.map(r => gd.data[0].x[r])],
                                              y: [hits.map(r => gd.data[0].y[r])]}, [1]);
  }

  field.addEventListener('change', () => colour(field.value));
  search.addEventListener('input', find);
  colour(field.value);
  document.body.dataset.ready = 'true';
}
"""

# Runs once the plot is drawn, which can be before the page below it is parsed.
_START = """const start = () => explorer(document.getElementById('{plot_id}'), EXPLORE_DATA);
if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start); else start();"""

_CSS = """
body { font-family: sans-serif; margin: 1em 2em; }
#controls { display: flex; gap: 1.5em; align-items: center; flex-wrap: wrap; margin: 0.5em 0; }
.legend-item { margin-right: 1em; white-space: nowrap; font-size: 0.9em; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.3em; border-radius: 50%; }
#results { display: flex; gap: 2em; font-size: 0.85em; }
#results li { cursor: pointer; }
table { border-collapse: collapse; font-size: 0.85em; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.5em; vertical-align: top; text-align: left; }
pre { margin: 0; white-space: pre-wrap; max-width: 60em; }
"""


def _json(value: Any) -> str:
    """JSON safe to inline in a <script> element."""
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def write_page(atlas: Atlas, path: Path, title: str, summary: Sequence[str], workdir: str,
               initial: str = "phase") -> Path:
    """Writes the self-contained explorer page to `path`."""
    fields = field_data(atlas)
    data = {"ids": atlas.ids, "fields": fields, "neighbours": atlas.neighbours.tolist(),
            "cosines": [[round(float(c), 3) for c in row] for row in atlas.cosines]}
    plot = pio.to_html(figure(atlas, fields, initial), include_plotlyjs=True, full_html=False, div_id="map",
                       post_script=_START,
                       config={"displaylogo": False, "responsive": True})
    options = "".join(f'<option value="{html.escape(f)}"{" selected" if f == initial else ""}>{html.escape(f)}'
                      "</option>" for f in FIELDS)
    items = "".join(f"<li>{html.escape(s)}</li>" for s in summary)
    hint = html.escape(SEARCH_HINT.format(workdir=workdir))
    path.write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<ul id="summary">{items}</ul>
<div id="controls">
<label>Colour by <select id="field">{options}</select></label>
<label>Search <input id="search" size="40" placeholder="NCT id or text (substring)"></label>
<span id="search-status"></span>
</div>
<div id="legend"></div>
<script>const EXPLORE_DATA = {_json(data)};{_SCRIPT}</script>
{plot}
<div id="results"><ol id="matches"></ol><div id="neighbours"></div></div>
<p>On this page search matches NCT ids and text substrings, and neighbours are the trials' precomputed cosine
neighbours. Finding trials by the meaning of a free text needs the sentence encoder: <code>{hint}</code>.</p>
{_tables(atlas)}
</body></html>
""")
    return path


def write_png(atlas: Atlas, path: Path, title: str) -> Path:
    """The map as a PNG: trials coloured by region, region labels, paths (dotted) and concept arrows."""
    regions = atlas.categories["cluster"]
    fig, ax = plt.subplots(figsize=(13, 9.5))
    for r in atlas.regions:
        own = [i for i, c in enumerate(regions) if c == f"region {r.index}"]
        ax.scatter(atlas.xy[own, 0], atlas.xy[own, 1], s=4, alpha=0.45, color=PALETTE[r.index % len(PALETTE)],
                   linewidths=0)
    for r in atlas.regions:
        ax.scatter(*r.xy, marker="D", s=30, color="black")
        ax.annotate(short_label(r), r.xy, xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.75, "lw": 0})
    colours = concept_colours(atlas)
    for t in atlas.traces:
        if t.kind == "path":
            ax.plot(t.xy[:, 0], t.xy[:, 1], ":", color=PATH_COLOUR, marker="o", ms=3, lw=1.2)
            continue
        lo, hi = t.arrow()
        ax.annotate("", t.xy[hi], xytext=t.xy[lo],
                    arrowprops={"arrowstyle": "-|>", "color": colours[t.group], "lw": 1.8})
    for concept, colour in colours.items():
        ax.plot([], [], color=colour, lw=2, label=f"concept: {concept}")
    if any(t.kind == "path" for t in atlas.traces):
        ax.plot([], [], ":", color=PATH_COLOUR, label="interpolation path")
    if colours or any(t.kind == "path" for t in atlas.traces):
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(f"PC 1 ({atlas.explained[0]:.1%} of variance)")
    ax.set_ylabel(f"PC 2 ({atlas.explained[1]:.1%} of variance)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with path.open("wb") as f:  # through the path's own file, so a gs:// workdir works
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
