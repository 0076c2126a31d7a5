"""Figures and widgets for looking at packed tries: masks, one token's view, the trie as a tree.

Design choices
- Plain `plotly.graph_objects.Figure` only, never `FigureWidget`: a `Figure` serialises into an executed
  notebook as JSON (and as HTML with `pio.renderers.default = "notebook"`), while `FigureWidget` needs
  `anywidget` and stores a 5 MB bundle in every notebook (see cpu-facts).
- What a token sees is computed in one small pure function, `visible_tokens`, which the figures and the
  tests share: the trie view is `packed.ancestors(row, token)`, the causal view is every earlier token of
  the same packed sample. `leaked_tokens` is the difference: what a plain causal mask shows a token on
  top of its ancestors (sibling threads, later continuations).
- Token boxes are drawn as one horizontal bar trace (`base` = x start, length = box width), not as one
  layout shape per token: a 400-token row stays a single trace that builds in milliseconds, and every
  box still gets its own colour, border and hover text.
- The token view lays the row out like text: a new line after every newline token, when a line is full,
  and at every branch start (a node whose parent is not the token just before it in the row), so the
  depth-first order of the trie is visible as paragraphs. Each line is labelled with its first node index
  and position id (`↳` marks a branch start).
- Labels: `token_labels` shows `\\n` as `⏎`, a space as `·`, a tab as `⇥`, and tags and special tokens as
  themselves. Plotly reads `<...>` in text as HTML, so every label is escaped before it is drawn.
- The mask heatmap uses categorical axes named `#i label` (unique, so plotly does not merge repeated
  tokens), with the bare label as tick text; a narrow strip on the left marks trained tokens (those
  with a loss), and under the causal mask a second layer colours the leaked cells. The first heatmap
  trace named "mask" holds exactly `packed.attention_mask("bool")` (or `causal_mask`) as 0/1.
- `mask_explorer` is headless-safe: building it and changing its widgets needs no browser or kernel; the
  current figure is kept on `.figure`, and it is displayed into an `ipywidgets.Output` only when an
  IPython shell is running. In JupyterLab the figure is re-displayed on every change. Its widgets carry
  CSS classes (`twlab-mask-explorer`, `twlab-token`, `twlab-mask-kind`, ...) that the browser test finds
  them by, so a notebook can reshape its cells without breaking that test.
- `use_offline_renderer` selects plotly's notebook renderer minus the MathJax `<script src>` from cdnjs that
  it adds to every figure: showing a figure then asks no outside server for anything (no figure here
  uses LaTeX).
- `calls_timeline` places a decoded response's calls on the critical path (`call_spans`): a sequential
  call starts where the previous call (or the previous block's longest thread) ended; the threads of a
  block share a start and sit in parallel lanes. Placement is logical, not wall time.
"""

from __future__ import annotations

import html
import re
from typing import Mapping, Sequence

import plotly.graph_objects as go
import plotly.io as pio
from plotly.io.base_renderers import NotebookRenderer

OFFLINE_RENDERER = "twlab_notebook"
MATHJAX_FROM_CDN = re.compile(r'<script src="https://cdnjs\.cloudflare\.com/ajax/libs/mathjax/[^"]*"></script>')


class OfflineNotebookRenderer(NotebookRenderer):
    """plotly's "notebook" renderer (figures inlined as HTML, shown in an exported page too) without the
    MathJax script it loads from cdnjs for every figure (plotly hard-codes it)."""

    def to_mimebundle(self, fig_dict):
        bundle = super().to_mimebundle(fig_dict)
        bundle["text/html"] = MATHJAX_FROM_CDN.sub("", bundle["text/html"])
        return bundle


def use_offline_renderer() -> str:
    """Register `OfflineNotebookRenderer` and make it plotly's default; returns its name."""
    if OFFLINE_RENDERER not in pio.renderers:
        pio.renderers[OFFLINE_RENDERER] = OfflineNotebookRenderer()
    pio.renderers.default = OFFLINE_RENDERER
    return OFFLINE_RENDERER

from twlib.trie import IGNORE, PackedTrie

KINDS = ("trie", "causal")

COLORS = {
    "chosen": "#1d3557",
    "ancestor": "#9ecae1",
    "parent": "#4a90c8",
    "leaked": "#f4a261",
    "hidden": "#eeeeee",
    "padding": "#ffffff",
    "trained": "#2a9d8f",
    "untrained": "#c9c9c9",
    "parent_border": "#7b2cbf",
    "shift_border": "#d62828",
}

_WHITESPACE = {"\n": "⏎", " ": "·", "\t": "⇥", "\r": "␍"}


# ----------------------------------------------------------------------------------------------------
# Labels and the visibility computation


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable token strings: `\\n` -> `⏎`, space -> `·`, tab -> `⇥`; tags and specials as themselves."""
    cache: dict[int, str] = {}
    out = []
    for i in ids:
        i = int(i)
        if i not in cache:
            text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            cache[i] = "".join(_WHITESPACE.get(c, c) for c in text) if text else "∅"
        out.append(cache[i])
    return out


def _esc(s: str) -> str:
    return html.escape(s, quote=False)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected 'trie' or 'causal'")


def visible_tokens(packed: PackedTrie, token: int, row: int = 0, kind: str = "trie") -> list[int]:
    """Keys that `token` attends to, ascending: its ancestors and itself ("trie"), or every earlier token
    of the same packed sample and itself ("causal", i.e. a plain causal mask over the packed row)."""
    _check_kind(kind)
    if kind == "trie":
        return packed.ancestors(row, token)
    sample = packed.sample_ids[row, :token + 1]
    return (sample == sample[token]).nonzero().squeeze(-1).tolist()


def leaked_tokens(packed: PackedTrie, token: int, row: int = 0) -> list[int]:
    """What a causal mask shows `token` beyond its ancestors: the tokens it must not see."""
    return sorted(set(visible_tokens(packed, token, row, "causal")) - set(packed.ancestors(row, token)))


def _mask(packed: PackedTrie, kind: str):
    _check_kind(kind)
    return packed.attention_mask("bool") if kind == "trie" else packed.causal_mask("bool")


def _row_length(packed: PackedTrie, row: int) -> int:
    """Length of the row without trailing padding."""
    real = (packed.sample_ids[row] >= 0).nonzero()
    return int(real.max()) + 1 if real.numel() else 0


# ----------------------------------------------------------------------------------------------------
# The mask as a heatmap


def mask_figure(packed: PackedTrie, tokenizer, row: int = 0, kind: str = "trie",
                max_tokens: int | None = None) -> go.Figure:
    """Heatmap of the attention mask of one row: query tokens down, key tokens across, 1 = may attend.

    A strip on the left marks trained queries; under `kind="causal"` the cells a causal mask allows but
    the trie mask forbids (leakage) are drawn in the warning colour on top.
    """
    from plotly.subplots import make_subplots

    n = packed.shape[1] if max_tokens is None else min(max_tokens, packed.shape[1])
    allowed = _mask(packed, kind)[row, 0, :n, :n]
    ids = packed.input_ids[row, :n].tolist()
    labels = [_esc(s) for s in token_labels(tokenizer, ids)]
    trained = (packed.labels[row, :n] != IGNORE).tolist()
    names = [f"#{i} {s}" for i, s in enumerate(labels)]
    z = allowed.int().tolist()
    text = [["yes" if v else "no" for v in r] for r in z] if n <= 256 else None

    fig = make_subplots(rows=1, cols=2, column_widths=[0.025, 0.975], shared_yaxes=True,
                        horizontal_spacing=0.004)
    fig.add_trace(go.Heatmap(z=z, x=names, y=names, name="mask", text=text, showscale=False, zmin=0, zmax=1,
                             colorscale=[[0, COLORS["hidden"]], [1, COLORS["parent"]]], xgap=0.5, ygap=0.5,
                             hovertemplate=("query %{y}<br>key %{x}<br>allowed: "
                                            + ("%{text}" if text else "%{z}") + "<extra></extra>")),
                  row=1, col=2)
    if kind == "causal":
        trie = packed.attention_mask("bool")[row, 0, :n, :n]
        leak = (allowed & ~trie).tolist()
        fig.add_trace(go.Heatmap(z=[[1 if v else None for v in r] for r in leak], x=names, y=names,
                                 name="leaked", showscale=False, zmin=0, zmax=1, xgap=0.5, ygap=0.5,
                                 colorscale=[[0, COLORS["leaked"]], [1, COLORS["leaked"]]],
                                 hovertemplate="query %{y}<br>key %{x}<br>LEAKED: not an ancestor<extra></extra>"),
                      row=1, col=2)
    fig.add_trace(go.Heatmap(z=[[int(t)] for t in trained], x=["trained"], y=names, name="trained",
                             showscale=False, zmin=0, zmax=1, ygap=0.5,
                             colorscale=[[0, COLORS["untrained"]], [1, COLORS["trained"]]],
                             hovertemplate="%{y}<br>trained: %{z}<extra></extra>"), row=1, col=1)
    tick = dict(tickmode="array", tickvals=names, ticktext=labels, tickfont=dict(size=7, family="monospace"))
    fig.update_yaxes(autorange="reversed", **tick)
    fig.update_yaxes(showticklabels=False, row=1, col=2)
    fig.update_xaxes(side="top", tickangle=-90, **tick, row=1, col=2)
    fig.update_xaxes(side="top", tickfont=dict(size=8), row=1, col=1)
    title = ("trie mask: a query sees its ancestors and itself" if kind == "trie"
             else "causal mask over the same row: orange = leaked (seen, but not an ancestor)")
    size = int(min(1000, 260 + 6 * n))
    fig.update_layout(title=dict(text=title, y=0.99), width=size + 40, height=size + 60,
                      margin=dict(l=60, r=20, t=110, b=20), plot_bgcolor="white")
    return fig


# ----------------------------------------------------------------------------------------------------
# One token's view of the row


def _token_layout(packed: PackedTrie, labels: list[str], row: int, n: int, width: int):
    """(line, x, w) per token and the first token of every line: text-like flow, new line after `⏎`,
    when full, and at every branch start."""
    parents = packed.parents[row].tolist()
    place, starts = [], []
    line, x = -1, width  # forces a new line at token 0
    for i in range(n):
        w = max(1, min(len(labels[i]), 14))
        branch = i > 0 and parents[i] != i - 1
        if x + w > width or branch or (i > 0 and labels[i - 1] == "⏎"):
            line, x = line + 1, 0
            starts.append(i)
        place.append((line, x, w))
        x += w
    return place, starts


def token_view_figure(packed: PackedTrie, tokenizer, token: int, row: int = 0, kind: str = "trie",
                      width: int = 64) -> go.Figure:
    """The packed row as text, seen from `token`: what it attends to, its parent, its target.

    Colours: the chosen token; the tokens it attends to (its ancestors); under `kind="causal"` the extra
    tokens a causal mask shows it (leaked: siblings and later branches, in the warning colour); its parent
    (purple border: the position its target is read from). Bold text marks trained tokens.
    """
    _check_kind(kind)
    n = _row_length(packed, row)
    if not 0 <= token < n:
        raise IndexError(f"token {token} outside row {row} (length {n})")
    ids = packed.input_ids[row, :n].tolist()
    raw = token_labels(tokenizer, ids)
    labels = [_esc(s) for s in raw]
    parents = packed.parents[row, :n].tolist()
    positions = packed.position_ids[row, :n].tolist()
    trained = (packed.labels[row, :n] != IGNORE).tolist()
    ancestors = set(packed.ancestors(row, token))
    visible = set(visible_tokens(packed, token, row, kind))
    leaked = visible - ancestors
    parent = parents[token]
    shift = token - 1 if kind == "causal" and token > 0 and parent != token - 1 else None

    place, starts = _token_layout(packed, raw, row, n, width)
    fills, line_colors, line_widths, font_colors, texts, hovers = [], [], [], [], [], []
    for i in range(n):
        if i == token:
            state = "chosen"
        elif i == parent:
            state = "parent"
        elif i in leaked:
            state = "leaked"
        elif i in visible:
            state = "ancestor"
        else:
            state = "hidden"
        fills.append(COLORS[state])
        border = COLORS["parent_border"] if i == parent else COLORS["shift_border"] if i == shift else "white"
        line_colors.append(border)
        line_widths.append(3 if border != "white" else 1)
        font_colors.append("white" if state == "chosen" else "black" if trained[i] else "#555555")
        shown = labels[i] if len(raw[i]) <= 14 else _esc(raw[i][:13]) + "…"
        texts.append(f"<b>{shown}</b>" if trained[i] else shown)
        target = _esc(raw[i]) if trained[i] else "no loss"
        hovers.append(f"#{i} {labels[i]}<br>position id {positions[i]}<br>parent #{parents[i]}"
                      f"<br>target: {target}<br>{'sees' if i in visible else 'hidden from'} #{token}: {state}")

    fig = go.Figure()
    fig.add_trace(go.Bar(
        orientation="h", base=[p[1] for p in place], x=[p[2] for p in place], y=[p[0] for p in place],
        width=0.82, marker=dict(color=fills, line=dict(color=line_colors, width=line_widths)),
        text=texts, textposition="inside", insidetextanchor="middle", textangle=0,
        textfont=dict(family="monospace", size=11, color=font_colors), constraintext="none",
        hovertext=hovers, hovertemplate="%{hovertext}<extra></extra>", showlegend=False, name="tokens"))
    legend = [("chosen token", COLORS["chosen"]), ("attends to (ancestor)", COLORS["ancestor"]),
              ("parent: its target is read here", COLORS["parent"])]
    if kind == "causal":
        legend.append(("LEAKED: seen but not an ancestor", COLORS["leaked"]))
    legend.append(("hidden", COLORS["hidden"]))
    for name, color in legend:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 marker=dict(symbol="square", size=12, color=color)))
    if shift is not None:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="a flat shift would read here",
                                 marker=dict(symbol="square-open", size=12, color=COLORS["shift_border"])))
    lines = len(starts)
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=list(range(lines)),
                     ticktext=[("↳ " if s > 0 and parents[s] != s - 1 else "") + f"#{s} d{positions[s]}" for s in starts],
                     tickfont=dict(size=9, family="monospace"),
                     showgrid=False, zeroline=False)
    fig.update_xaxes(visible=False, range=[-0.5, width + 0.5])
    target = f"'{_esc(raw[token])}'" if trained[token] else "no loss"
    read_from = f"#{parent}" if parent >= 0 else "none (a root)"
    title = (f"#{token} '{labels[token]}' ({kind} mask) · position id {positions[token]} · parent {read_from} · "
             f"target {target} · sees {len(visible)} tokens")
    if kind == "causal":
        title += f", {len(leaked)} leaked"
    fig.update_layout(title=dict(text=title, font=dict(size=13)), barmode="overlay", bargap=0,
                      width=1000, height=150 + 22 * lines, margin=dict(l=80, r=20, t=60, b=10),
                      plot_bgcolor="white", uniformtext=dict(minsize=9, mode="show"),
                      legend=dict(orientation="h", y=-0.01, yanchor="top", x=0, font=dict(size=11)))
    fig.update_layout(height=fig.layout.height + 30)
    return fig


# ----------------------------------------------------------------------------------------------------
# The trie as a tree


def trie_segments(packed: PackedTrie, row: int = 0) -> list[dict]:
    """Runs of single-child nodes (with one trained status) in depth-first order, each with a lane.

    A segment breaks where a node has several children, where a new branch starts, and where training
    switches on or off. The first child continues its parent's lane; every other branch opens a new lane.
    """
    n = _row_length(packed, row)
    parents = packed.parents[row, :n].tolist()
    trained = (packed.labels[row, :n] != IGNORE).tolist()
    children = [0] * n
    for p in parents:
        if p >= 0:
            children[p] += 1
    segments: list[dict] = []
    seg_of = [0] * n
    lanes = 0
    for i in range(n):
        p = parents[i]
        continues = p == i - 1 and p >= 0 and children[p] == 1 and trained[p] == trained[i]
        if continues:
            segments[-1]["end"] = i
        else:
            if p >= 0 and p == i - 1:
                lane = segments[seg_of[p]]["lane"]
            else:
                lane, lanes = lanes, lanes + 1
            segments.append(dict(start=i, end=i, lane=lane, parent=p, trained=trained[i]))
        seg_of[i] = len(segments) - 1
    for s in segments:
        s["parent_lane"] = segments[seg_of[s["parent"]]]["lane"] if s["parent"] >= 0 else None
    return segments


def trie_figure(packed: PackedTrie, tokenizer, row: int = 0, width: int = 1000) -> go.Figure:
    """The trie of one row as a tree: x = position id (depth), one lane per branch, text segments for runs
    of single-child nodes, coloured by trained / context."""
    n = _row_length(packed, row)
    raw = token_labels(tokenizer, packed.input_ids[row, :n].tolist())
    depth = packed.position_ids[row, :n].tolist()
    segments = trie_segments(packed, row)
    max_depth = max(depth) + 1 if depth else 1
    px_per_unit = (width - 100) / max_depth
    fig = go.Figure()
    for trained in (False, True):
        segs = [s for s in segments if s["trained"] == trained]
        texts, hovers = [], []
        for s in segs:
            full = "".join(raw[s["start"]:s["end"] + 1])
            fit = max(1, int((s["end"] - s["start"] + 1) * px_per_unit / 6.2))
            texts.append(_esc(full if len(full) <= fit else full[:max(fit - 1, 0)] + "…"))
            hovers.append(f"nodes #{s['start']}..#{s['end']} · depth {depth[s['start']]}..{depth[s['end']]}"
                          f"<br>{'trained' if trained else 'context (no loss)'}<br>{_esc(full[:300])}")
        fig.add_trace(go.Bar(
            orientation="h", base=[depth[s["start"]] for s in segs], x=[s["end"] - s["start"] + 1 for s in segs],
            y=[s["lane"] for s in segs], width=0.6, name="trained (completion)" if trained else "context (no loss)",
            marker=dict(color=COLORS["trained"] if trained else COLORS["untrained"], line=dict(color="white", width=1)),
            text=texts, textposition="inside", insidetextanchor="start", textangle=0,
            textfont=dict(family="monospace", size=10, color="white" if trained else "black"), constraintext="none",
            hovertext=hovers, hovertemplate="%{hovertext}<extra></extra>"))
    xs, ys = [], []
    for s in segments:
        if s["parent"] >= 0 and s["lane"] != s["parent_lane"]:
            x = depth[s["parent"]] + 1
            xs += [x, x, None]
            ys += [s["parent_lane"], s["lane"], None]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="#555555", width=1.5),
                             name="branch", hoverinfo="skip"))
    lanes = 1 + max((s["lane"] for s in segments), default=0)
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=list(range(lanes)),
                     ticktext=[f"lane {i}" for i in range(lanes)], showgrid=False, zeroline=False)
    fig.update_xaxes(title="position id = depth in the trie", range=[-0.5, max_depth + 0.5])
    fig.update_layout(title=f"the trie of row {row}: {n} nodes, {len(segments)} segments, {lanes} lanes",
                      barmode="overlay", width=width, height=160 + 45 * lanes, plot_bgcolor="white",
                      uniformtext=dict(minsize=8, mode="show"), margin=dict(l=60, r=20, t=50, b=40),
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))
    return fig


# ----------------------------------------------------------------------------------------------------
# The interactive explorer


def mask_explorer(samples: Mapping[str, PackedTrie], tokenizer, row: int = 0, token: int | None = None):
    """A sample dropdown, a token slider and a trie/causal toggle over `token_view_figure`.

    Returns an `ipywidgets.VBox`; `.figure` holds the current figure and `.controls` the three widgets
    (set their `.value` to drive it from code). Displays into an `Output` only inside IPython.
    """
    import ipywidgets as widgets
    from IPython import get_ipython
    from IPython.display import display

    if not samples:
        raise ValueError("mask_explorer needs at least one packed sample")
    names = list(samples)
    length = _row_length(samples[names[0]], row)
    dropdown = widgets.Dropdown(options=names, value=names[0], description="sample")
    slider = widgets.IntSlider(value=min(token if token is not None else length // 2, length - 1), min=0,
                               max=length - 1, description="token", continuous_update=False,
                               layout=widgets.Layout(width="600px"))
    toggle = widgets.ToggleButtons(options=list(KINDS), value="trie", description="mask")
    out = widgets.Output()
    box = widgets.VBox([widgets.HBox([dropdown, toggle]), slider, out])
    # stable CSS classes: the browser test (tests/test_browser.py) finds the explorer by these
    for widget, name in ((box, "twlab-mask-explorer"), (dropdown, "twlab-sample"), (slider, "twlab-token"),
                         (toggle, "twlab-mask-kind"), (out, "twlab-figure")):
        widget.add_class(name)
    box.controls = (dropdown, slider, toggle)
    box.figure = None
    busy = [False]

    def render(*_):
        if busy[0]:
            return
        packed = samples[dropdown.value]
        box.figure = token_view_figure(packed, tokenizer, slider.value, row=row, kind=toggle.value)
        if get_ipython() is not None:
            out.clear_output(wait=True)
            with out:
                display(box.figure)

    def on_sample(change):
        busy[0] = True
        try:
            n = _row_length(samples[change["new"]], row)
            slider.value = min(slider.value, n - 1)
            slider.max = n - 1
        finally:
            busy[0] = False
        render()

    dropdown.observe(on_sample, names="value")
    slider.observe(render, names="value")
    toggle.observe(render, names="value")
    render()
    return box


# ----------------------------------------------------------------------------------------------------
# The state machine's calls on a timeline

CALL_COLORS = {"sequential": "#1d3557", "continuation": "#457b9d", "thread": "#2a9d8f"}


def call_spans(result) -> list[dict]:
    """Where each call of a `DecodeResult` sits on the critical path: a dict per call with `start` (decode
    step at which its first token is written), `length` (tokens it generated), `lane` (its row) and the
    call. Threads of a block all start where the block's outlines end; the next sequential call starts
    after the longest of them. Placement is logical (what an engine running the threads side by side
    does), whatever `thread_mode` the result was decoded with."""
    spans, step, block_end, lane = [], 0, None, 0
    for call in result.calls:
        if call.kind == "thread":
            if block_end is None:
                start, block_end = step, step
            block_end = max(block_end, start + len(call.completion_ids))
        else:
            if block_end is not None:
                step, block_end = block_end, None
            start = step
            step += len(call.completion_ids)
        spans.append({"start": start, "length": len(call.completion_ids), "lane": lane, "call": call})
        lane += 1
    return spans


def calls_timeline(result, tokenizer, width: int = 900) -> go.Figure:
    """The calls of one decoded response as bars: x = decode step along the critical path, one row per call
    (the threads of a block side by side in parallel lanes), coloured by kind, hover = the completion."""
    spans = call_spans(result)
    fig = go.Figure()
    names = []
    for s in spans:
        c = s["call"]
        if c.kind == "thread":
            names.append(f"block {c.block} · thread {c.thread}")
        else:
            names.append("sequential" if c.phase == 1 else "continuation")
    for kind, label in (("sequential", "sequential (phase 1)"), ("continuation", "continuation (phase 5)"),
                        ("thread", "thread (phase 3)")):
        rows = [i for i, s in enumerate(spans)
                if (s["call"].kind == "thread") == (kind == "thread")
                and (kind == "thread" or (s["call"].phase == 1) == (kind == "sequential"))]
        if not rows:
            continue
        hovers = []
        for i in rows:
            c = spans[i]["call"]
            text = tokenizer.decode(c.completion_ids, skip_special_tokens=False)
            hovers.append(f"call {i}: {names[i]} · steps {spans[i]['start']}..{spans[i]['start'] + spans[i]['length']}"
                          f" · {spans[i]['length']} tokens · finish {c.finish}<br>"
                          + _esc(text[:400]).replace("\n", "⏎<br>"))
        fig.add_trace(go.Bar(
            orientation="h", base=[spans[i]["start"] for i in rows], x=[spans[i]["length"] for i in rows],
            y=[spans[i]["lane"] for i in rows], width=0.7, name=label,
            marker=dict(color=CALL_COLORS[kind],
                        line=dict(color=["#d62828" if spans[i]["call"].finish != "stop" else "white" for i in rows],
                                  width=2)),
            hovertext=hovers, hovertemplate="%{hovertext}<extra></extra>"))
    steps = max((s["start"] + s["length"] for s in spans), default=0)
    generated = sum(s["length"] for s in spans)
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=[s["lane"] for s in spans],
                     ticktext=[f"{i}: {n}" for i, n in enumerate(names)], showgrid=False, zeroline=False)
    fig.update_xaxes(title="decode step along the critical path", range=[-1, steps + 1])
    fig.update_layout(title=f"{len(spans)} calls: {steps} decode steps on the critical path, {generated} tokens generated",
                      barmode="overlay", width=width, height=140 + 28 * max(len(spans), 1), plot_bgcolor="white",
                      margin=dict(l=170, r=20, t=50, b=40),
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))
    return fig
