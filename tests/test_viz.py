"""twlib.viz: what a token is shown to see equals the masks; figures and the explorer build headless."""

import plotly.graph_objects as go
import pytest
import torch

from twlib.format import DISTANCE_EXAMPLE, DISTANCE_PROMPT, engine_calls
from twlib.tokenizer import build_tokenizer
from twlib.trie import IGNORE, collate, pack, path_nodes, tokenize_calls
from twlib.viz import (
    leaked_tokens, mask_explorer, mask_figure, token_labels, token_view_figure, trie_figure, trie_segments,
    visible_tokens,
)

SHORT_PROMPT = "A:i4q7 B:p5m9\n"
SHORT = ("<think>\n<Parallel>\n<Outlines>\n<Outline>1:A</Outline>\n<Outline>2:B</Outline>\n</Outlines>\n"
         "<Thread>\n1:A\ni:0+4=4\nq:4+7=1\nA=1\n</Thread><Thread>\n2:B\np:0+5=5\nm:5+9=4\nB=4\n</Thread>\n"
         "</Parallel>\n1+4=5\n</think>\n\\boxed{5}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def short(tok):
    pairs = tokenize_calls(engine_calls(SHORT, SHORT_PROMPT), tok)
    return pairs, pack(pairs)


@pytest.fixture(scope="module")
def batch(tok, short):
    # two trajectories share row 0; row 1 holds one and padding
    return collate([short[1]] * 3, max_tokens=2 * short[1].shape[1], pad_id=tok.pad_token_id)


def test_token_labels(tok):
    ids = tok.encode("<Thread>\n1: a b</Thread>", add_special_tokens=False) + [tok.eos_token_id]
    assert token_labels(tok, ids) == ["<Thread>", "⏎", "1", ":", "·", "a", "·", "b", "</Thread>", "<|endoftext|>"]


def test_visible_tokens_equal_the_masks(batch):
    trie = batch.attention_mask("bool")[:, 0]
    causal = batch.causal_mask("bool")[:, 0]
    rows, length = batch.shape
    for row in range(rows):
        samples = batch.sample_ids[row].tolist()
        for q in range(length):
            seen = visible_tokens(batch, q, row, "trie")
            assert seen == batch.ancestors(row, q)
            assert seen == trie[row, q].nonzero().squeeze(-1).tolist()
            flat = visible_tokens(batch, q, row, "causal")
            assert flat == causal[row, q].nonzero().squeeze(-1).tolist()
            if samples[q] >= 0:
                assert flat == [k for k in range(q + 1) if samples[k] == samples[q]]
            assert leaked_tokens(batch, q, row) == sorted(set(flat) - set(seen))
    with pytest.raises(ValueError, match="kind"):
        visible_tokens(batch, 0, 0, "dense")


def test_thread_two_leaks_only_under_causal(short):
    pairs, packed = short
    context, completion = pairs[2]  # thread 2's call
    node = path_nodes(packed, context + completion)[-1]
    thread1 = path_nodes(packed, pairs[1][0] + pairs[1][1])[len(pairs[1][0]):]
    assert not set(thread1) & set(visible_tokens(packed, node, 0, "trie"))
    assert set(thread1) <= set(leaked_tokens(packed, node, 0))


@pytest.mark.parametrize("kind", ["trie", "causal"])
def test_mask_figure_values_equal_the_mask(tok, short, batch, kind):
    _, packed = short
    for p, row in [(packed, 0), (batch, 1)]:
        fig = mask_figure(p, tok, row=row, kind=kind)
        assert isinstance(fig, go.Figure)
        heat = next(t for t in fig.data if t.name == "mask")
        mask = p.attention_mask("bool") if kind == "trie" else p.causal_mask("bool")
        assert torch.equal(torch.tensor(heat.z, dtype=torch.bool), mask[row, 0])
        trained = next(t for t in fig.data if t.name == "trained")
        assert [r[0] for r in trained.z] == (p.labels[row] != IGNORE).int().tolist()
        assert any(t.name == "leaked" for t in fig.data) == (kind == "causal")
    small = mask_figure(packed, tok, kind=kind, max_tokens=20)
    assert len(small.data[0].z) == 20


@pytest.mark.parametrize("kind", ["trie", "causal"])
def test_token_view_highlights_what_the_token_sees(tok, short, kind):
    pairs, packed = short
    node = path_nodes(packed, pairs[2][0] + pairs[2][1])[-3]
    fig = token_view_figure(packed, tok, node, kind=kind)
    bars = fig.data[0]
    colors = list(bars.marker.color)
    assert len(colors) == packed.shape[1]
    from twlib.viz import COLORS

    parent = int(packed.parents[0, node])
    shown = {i for i, c in enumerate(colors) if c in (COLORS["ancestor"], COLORS["parent"], COLORS["leaked"],
                                                      COLORS["chosen"])}
    assert shown == set(visible_tokens(packed, node, 0, kind))
    assert colors[node] == COLORS["chosen"] and colors[parent] == COLORS["parent"]
    leaked = {i for i, c in enumerate(colors) if c == COLORS["leaked"]}
    assert leaked == (set(leaked_tokens(packed, node)) if kind == "causal" else set())
    assert f"position id {int(packed.position_ids[0, node])}" in fig.layout.title.text
    assert f"parent #{parent}" in fig.layout.title.text
    untrained = int(path_nodes(packed, pairs[2][0])[-1])
    assert "no loss" in token_view_figure(packed, tok, untrained, kind=kind).layout.title.text
    with pytest.raises(IndexError):
        token_view_figure(packed, tok, packed.shape[1], kind=kind)


def test_trie_figure_and_segments(tok, short, batch):
    _, packed = short
    segments = trie_segments(packed)
    covered = [i for s in segments for i in range(s["start"], s["end"] + 1)]
    assert covered == list(range(packed.shape[1]))
    assert max(s["lane"] for s in segments) == 1  # one branch: thread 2 opens a second lane
    for s in segments:
        labels = (packed.labels[0, s["start"]:s["end"] + 1] != IGNORE).tolist()
        assert len(set(labels)) == 1
    assert isinstance(trie_figure(packed, tok), go.Figure)
    assert isinstance(trie_figure(batch, tok, row=1), go.Figure)


def test_mask_explorer_builds_and_updates_headless(tok, short):
    import ipywidgets as widgets

    _, packed = short
    distance = pack(engine_calls(DISTANCE_EXAMPLE, DISTANCE_PROMPT), tok)
    explorer = mask_explorer({"short": packed, "distance": distance}, tok)
    assert isinstance(explorer, widgets.Widget)
    dropdown, slider, toggle = explorer.controls
    assert slider.max == packed.shape[1] - 1
    dropdown.value = "distance"
    assert slider.max == distance.shape[1] - 1
    slider.value = distance.shape[1] - 1
    toggle.value = "causal"
    assert explorer.figure.layout.title.text.startswith(f"#{distance.shape[1] - 1} ")
    assert "causal" in explorer.figure.layout.title.text
    dropdown.value = "short"  # the slider is clamped to the shorter row
    assert slider.value == slider.max == packed.shape[1] - 1
    assert explorer.figure.layout.title.text.startswith(f"#{slider.value} ")
    toggle.value = "trie"
    assert "trie" in explorer.figure.layout.title.text
    with pytest.raises(ValueError):
        mask_explorer({}, tok)


def test_calls_timeline_places_threads_side_by_side(tok):
    from twlib.decoding import Completion, DecodeConfig, ParallelDecoder
    from twlib.viz import call_spans, calls_timeline

    table = {tuple(c): d for c, d in tokenize_calls(engine_calls(SHORT, SHORT_PROMPT), tok, add_eos=True)}

    class Oracle:
        max_context = 10_000

        def generate(self, requests, sampling):
            return [Completion(list(table[tuple(r.prompt_ids)]), "stop") for r in requests]

    result = ParallelDecoder(Oracle(), tok, DecodeConfig(max_new_tokens=2000)).decode(tok.encode(SHORT_PROMPT))
    assert result.text == SHORT
    spans = call_spans(result)
    assert [s["call"].kind for s in spans] == ["sequential", "thread", "thread", "sequential"]
    first, t1, t2, last = spans
    assert t1["start"] == t2["start"] == first["length"]
    assert last["start"] == t1["start"] + max(t1["length"], t2["length"])
    fig = calls_timeline(result, tok)
    assert isinstance(fig, go.Figure)
    assert sum(len(t.x) for t in fig.data) == len(result.calls)
    threads = next(t for t in fig.data if t.name.startswith("thread"))
    assert list(threads.base) == [t1["start"]] * 2 and len(set(threads.y)) == 2
    assert "</Thread>" not in threads.hovertext[0] and "&lt;/Thread&gt;" in threads.hovertext[0]


def test_the_offline_renderer_drops_the_mathjax_script_from_cdnjs():
    """plotly's notebook renderer adds <script src=cdnjs...mathjax> to every figure; ours asks no server."""
    import plotly.io as pio

    from twlib.viz import MATHJAX_FROM_CDN, use_offline_renderer

    figure = go.Figure(go.Bar(x=[1, 2], y=[3, 4])).to_dict()
    before = pio.renderers["notebook"].to_mimebundle(figure)["text/html"]
    assert MATHJAX_FROM_CDN.search(before), "plotly no longer adds the script: this renderer can go"
    default = pio.renderers.default
    try:
        name = use_offline_renderer()
        html = pio.renderers[name].to_mimebundle(figure)["text/html"]
    finally:
        pio.renderers.default = default
    assert "https://" not in html and "Plotly.newPlot" in html
    assert html == MATHJAX_FROM_CDN.sub("", before).replace(_plot_id(before), _plot_id(html))


def _plot_id(html: str) -> str:
    import re

    return re.search(r'id="([0-9a-f-]{36})"', html).group(1)
