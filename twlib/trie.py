"""Trie packing: the state machine's (context, completion) calls -> one packed training row.

Every call of a trajectory is a token sequence `context + completion`. Inserted into a trie, shared
prefixes (the prompt, the text before a block, a thread's own tokens inside the continuation) become one
node each, so a whole parallel trajectory trains in one row with no recomputation.

Design choices
- Depth-first order. After insertion the nodes are renumbered depth-first, so the subtree of node j is
  the contiguous range [j, exit[j]). Node j is an ancestor of (or equal to) node q exactly when
  `j <= q < exit[j]`: one integer per node describes the whole mask, which is how the FlexAttention
  `BlockMask` is built without ever materialising N x N (only (N/128)^2 block flags).
- Position id of a node = its depth = the position the token has at inference time.
- Parent-pointer targets: node i is predicted from the hidden state of parent(i). The reference code
  shifts the flattened row by one, which trains the wrong target at every branch point; here the packed
  log-probs equal those of every call run alone (tested to 1e-5).
- Two loss policies. `"completions"` (default) trains exactly the completion tokens of the calls, each
  trie node once. `"paper"` reproduces the reference: every response token (everything after the first
  call's context) is trained, so the copy of thread 2 inside the continuation path (where it follows
  thread 1) is trained too: the "autoregressive mode" the paper calls deliberate, in which later threads
  learn to see their siblings.
- Log-probs gather hidden states at the parents and apply the LM head in chunks of nodes, each chunk
  recomputed in the backward (`twlib.lm_head`), so the [tokens x vocab] logits of a 40k-token row with
  Qwen3's 152k vocabulary are never held at once, neither in the forward nor kept for the backward.
- One row format for CPU and GPU: the same `PackedTrie` gives a bool or float dense mask (sdpa/eager on
  CPU, fine to ~8k tokens) or a `BlockMask` (flex_attention on GPU; forward only on CPU in torch 2.13).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

IGNORE = -100
LOSS_POLICIES = ("completions", "paper")


# ----------------------------------------------------------------------------------------------------
# Calls -> token ids


def tokenize_calls(calls, tokenizer, add_eos: bool = True) -> list[tuple[list[int], list[int]]]:
    """Token ids for `twlib.format.Call`s, built exactly as `twlib.decoding.ParallelDecoder` builds them.

    The decoder works on ids: a thread's context is the shared prefix's ids + `encode("\\n<Thread>\\n{n}:")`,
    and the join is thread 1's ids + `encode("<Thread>\\n{n}:")` + thread n's ids ... + `encode("\\n")`. The
    same construction is used here whenever a call has that shape (always, for `engine_calls` output), so
    training contexts are what the model sees at inference token for token, also with a BPE tokenizer:
    re-encoding the join as one string would merge the glue's `:` with a thread body that starts with a
    letter (Qwen3: `2:` + `A` -> `2`, `:A`) or a newline. Every completion is encoded on its own. A context
    of any other shape is the longest already-tokenised context (+ completion) that prefixes it, plus the
    encoding of the rest. With `add_eos`, the last call, when sequential, ends with EOS.
    """
    from twlib.format import THREAD_OPEN, thread_prefix

    cache: dict[str, list[int]] = {}
    known: dict[str, list[int]] = {}
    pairs = []
    shared: tuple[str, list[int]] | None = None  # the sequential call (context + completion) before a block
    threads: list[tuple[object, list[int], list[int]]] = []  # the block's thread calls: (call, context, completion)

    def encode(text: str) -> list[int]:
        if text not in cache:
            cache[text] = list(tokenizer.encode(text, add_special_tokens=False)) if text else []
        return list(cache[text])

    def joined() -> tuple[str, list[int]] | None:
        """The join of the block's threads (phase 4) as text and as the decoder's ids."""
        if shared is None or not threads:
            return None
        first, context, completion = threads[0]
        text, ids = first.context + first.completion, context + completion
        for call, _, completion in threads[1:]:
            glue = f"{THREAD_OPEN}\n{call.thread}:"
            text, ids = text + glue + call.completion, ids + encode(glue) + completion
        return text + "\n", ids + encode("\n")

    for call in calls:
        context_ids = None
        if call.kind == "thread" and shared is not None and call.context == shared[0] + thread_prefix(call.thread):
            context_ids = shared[1] + encode(thread_prefix(call.thread))
        elif call.kind == "sequential":
            join = joined()
            if join is not None and join[0] == call.context:
                context_ids = join[1]
        if context_ids is None:
            base = max((s for s in known if call.context.startswith(s)), key=len, default="")
            context_ids = known.get(base, []) + encode(call.context[len(base):])
        completion_ids = encode(call.completion)
        known.setdefault(call.context, context_ids)
        known.setdefault(call.context + call.completion, context_ids + completion_ids)
        if call.kind == "thread":
            threads.append((call, context_ids, completion_ids))
        else:
            shared, threads = (call.context + call.completion, context_ids + completion_ids), []
        pairs.append((context_ids, completion_ids))
    if add_eos and calls and calls[-1].kind == "sequential" and tokenizer.eos_token_id is not None:
        pairs[-1] = (pairs[-1][0], pairs[-1][1] + [tokenizer.eos_token_id])
    return pairs


# ----------------------------------------------------------------------------------------------------
# The packed row


@dataclass
class PackedTrie:
    """Packed rows, all tensors of shape [rows, length] (rows = 1 from `pack`).

    input_ids     token of each node
    position_ids  depth of the node (= its position at inference)
    parents       index of the parent node in the same row, -1 for a root (and for padding)
    labels        the token where it is trained, -100 elsewhere (node i is predicted from parent(i))
    exits         end of the node's subtree in depth-first order: j sees q iff j <= q < exits[j]
    sample_ids    which packed trajectory a node belongs to (-1 for padding)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    parents: torch.Tensor
    labels: torch.Tensor
    exits: torch.Tensor
    sample_ids: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) nodes."""
        return int((self.sample_ids >= 0).sum())

    @property
    def num_trained(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device) -> "PackedTrie":
        return replace(self, **{k: getattr(self, k).to(device) for k in _FIELDS})

    def ancestors(self, row: int, node: int) -> list[int]:
        """Nodes that `node` attends to (its ancestors and itself), root first."""
        path, j = [], node
        while j >= 0:
            path.append(j)
            j = int(self.parents[row, j])
        return path[::-1]

    # -- masks ---------------------------------------------------------------------------------------

    def attention_mask(self, kind: str = "bool", dtype: torch.dtype = torch.float32, block_size: int = 128):
        """Ancestor-only attention mask.

        - `"bool"`: [rows, 1, L, L], True where query q may attend key k (k is q or an ancestor of q).
          For sdpa. Never give a bool mask to eager attention: it adds the booleans (see cpu-facts).
        - `"float"`: additive, 0 where allowed and `finfo(dtype).min` elsewhere (not -inf, which turns a
          fully masked row into NaN). For eager and sdpa.
        - `"block"`: a FlexAttention `BlockMask` built from the depth-first intervals (see `block_mask`).
        """
        if kind == "block":
            return block_mask(self.exits, block_size)
        if kind not in ("bool", "float"):
            raise ValueError(f"unknown mask kind {kind!r}: expected 'bool', 'float' or 'block'")
        allowed = dense_mask(self.exits)
        if kind == "bool":
            return allowed
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def causal_mask(self, kind: str = "bool", dtype: torch.dtype = torch.float32):
        """A plain causal mask over the same row (for the leakage demonstration): later threads see siblings."""
        rows, length = self.shape
        allowed = torch.ones(length, length, dtype=torch.bool, device=self.exits.device).tril()
        same = self.sample_ids[:, :, None] == self.sample_ids[:, None, :]
        allowed = (allowed & same)[:, None] | torch.eye(length, dtype=torch.bool, device=allowed.device)
        if kind == "bool":
            return allowed
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)


_FIELDS = ("input_ids", "position_ids", "parents", "labels", "exits", "sample_ids")


def dense_mask(exits: torch.Tensor) -> torch.Tensor:
    """[rows, 1, L, L] bool: key k is visible from query q iff k <= q < exits[k]."""
    length = exits.shape[-1]
    idx = torch.arange(length, device=exits.device)
    q, k = idx[:, None], idx[None, :]
    return ((k <= q) & (q < exits[:, None, :]))[:, None]


def block_mask(exits: torch.Tensor, block_size: int = 128):
    """FlexAttention `BlockMask` from the depth-first intervals, never materialising the L x L mask.

    For each (query block, key block) pair we need to know whether it is empty, partial or full:
    - key k reaches the query range [k, exits[k]), so the key block touches query blocks
      k // B ... (exits[k] - 1) // B (a difference array over query blocks, one update per key);
    - the pair is full when every key precedes every query (last key <= first query) and every key's
      subtree covers the whole query block (min exit in the key block > last query).
    Only (L/B)^2 block flags are built. `mask_mod` refines partial blocks on the fly.
    """
    from torch.nn.attention.flex_attention import BlockMask

    rows, length = exits.shape
    device = exits.device
    nblocks = -(-length // block_size)
    padded = nblocks * block_size
    idx = torch.arange(padded, device=device)
    # Padding keys past the end reach nothing.
    ex = torch.cat([exits, idx[length:].expand(rows, -1) + 1], dim=1) if padded > length else exits
    first_q = (idx // block_size).expand(rows, -1)
    last_q = ((ex - 1).clamp(min=0) // block_size)
    key_block = idx // block_size
    # touched[r, kb, qb] via a difference array along qb.
    diff = torch.zeros(rows, nblocks, nblocks + 1, dtype=torch.int32, device=device)
    ones = torch.ones(rows, padded, dtype=torch.int32, device=device)
    flat_kb = key_block.expand(rows, -1)
    diff.view(rows, -1).scatter_add_(1, flat_kb * (nblocks + 1) + first_q, ones)
    diff.view(rows, -1).scatter_add_(1, flat_kb * (nblocks + 1) + last_q + 1, -ones)
    touched = diff.cumsum(-1)[..., :nblocks] > 0  # [rows, kb, qb]
    block_start = torch.arange(nblocks, device=device) * block_size
    block_end = block_start + block_size - 1
    min_exit = ex.view(rows, nblocks, block_size).min(-1).values  # [rows, kb]
    full = (block_end[None, :, None] <= block_start[None, None, :]) & (min_exit[:, :, None] > block_end[None, None, :])
    touched, full = touched.transpose(1, 2), full.transpose(1, 2)  # -> [rows, qb, kb]
    partial = touched & ~full

    def to_indices(flags):
        num = flags.sum(-1, dtype=torch.int32)
        order = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[:, None].contiguous(), order[:, None].contiguous()

    exits_padded = ex

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < exits_padded[b, kv_idx])

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(length, length))


# ----------------------------------------------------------------------------------------------------
# Packing


def insert_calls(calls, loss: str = "completions"):
    """Insert (context, completion) token lists into a trie: one node per distinct prefix.

    Returns per node its token, its parent (-1 for a root), whether it carries a loss, its children
    (token -> node), and the roots (first token -> node). Nodes are numbered in order of creation.
    """
    tokens, parent, trained, children, roots = [], [], [], [], {}
    prompt_len = len(calls[0][0])
    for context, completion in calls:
        node, kids = -1, roots
        for j, t in enumerate(list(context) + list(completion)):
            t = int(t)
            if t not in kids:  # a prefix not seen before: one new node
                kids[t] = len(tokens)
                tokens.append(t)
                parent.append(node)
                trained.append(False)
                children.append({})
            node = kids[t]
            if j >= len(context) or (loss == "paper" and j >= prompt_len):
                trained[node] = True
            kids = children[node]
    return tokens, parent, trained, children, roots


def depth_first_order(children, roots) -> list[int]:
    """Node ids in depth-first order, children in insertion order (an explicit stack: tries get deep)."""
    order, stack = [], list(reversed(list(roots.values())))
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(list(children[node].values())))
    return order


def pack(calls, tokenizer=None, loss: str = "completions", add_eos: bool = True) -> PackedTrie:
    """Pack one trajectory's calls into a trie row.

    `calls` is a list of (context_ids, completion_ids) pairs, or of `twlib.format.Call`s together with
    the `tokenizer` (see `tokenize_calls`; `add_eos` ends the final sequential call with EOS).
    Linear in the number of tokens: one dict lookup per token, one depth-first pass.
    """
    if loss not in LOSS_POLICIES:
        raise ValueError(f"unknown loss policy {loss!r}: expected one of {LOSS_POLICIES}")
    calls = list(calls)
    if calls and not isinstance(calls[0], (tuple, list)):  # Call objects: tokenise them first
        if tokenizer is None:
            raise ValueError("pack(calls) with Call objects needs the tokenizer")
        calls = tokenize_calls(calls, tokenizer, add_eos=add_eos)
    if not calls:
        raise ValueError("pack() needs at least one (context, completion) pair")

    tokens, parent, trained, children, roots = insert_calls(calls, loss)
    order = depth_first_order(children, roots)
    new = {old: i for i, old in enumerate(order)}
    n = len(order)
    parents = [new[parent[o]] if parent[o] >= 0 else -1 for o in order]
    depth = [0] * n
    for i in range(n):  # parents come first: depth = parent's depth + 1
        depth[i] = depth[parents[i]] + 1 if parents[i] >= 0 else 0
    size = [1] * n
    for i in reversed(range(n)):  # children come after: add each subtree to its parent
        if parents[i] >= 0:
            size[parents[i]] += size[i]
    exits = [i + size[i] for i in range(n)]
    labels = [tokens[o] if trained[o] and parent[o] >= 0 else IGNORE for o in order]

    def row(values):
        return torch.tensor([values], dtype=torch.long)

    return PackedTrie(row([tokens[o] for o in order]), row(depth), row(parents), row(labels), row(exits),
                      torch.zeros(1, n, dtype=torch.long))


def path_nodes(packed: PackedTrie, ids: Sequence[int], row: int = 0) -> list[int]:
    """Indices of the nodes that spell `ids` from a root of `row` (e.g. one call's context + completion)."""
    child = {(int(p), int(t)): i for i, (p, t) in enumerate(zip(packed.parents[row], packed.input_ids[row]))
             if int(packed.sample_ids[row, i]) >= 0}
    nodes, node = [], -1
    for j, tok in enumerate(ids):
        node = child.get((node, int(tok)))
        if node is None:
            raise KeyError(f"token {j} ({int(tok)}) of the sequence is not in the trie")
        nodes.append(node)
    return nodes


def pack_text(response: str, prompt: str, tokenizer, loss: str = "completions") -> PackedTrie:
    """Convenience: parse a response, make the state machine's calls and pack them."""
    from twlib.format import engine_calls

    return pack(engine_calls(response, prompt), tokenizer, loss=loss)


def sequential_row(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> PackedTrie:
    """An ordinary causal sequence as a (chain-shaped) trie: the sequential baseline's training row."""
    return pack([(list(prompt_ids), list(response_ids))])


def assign_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indices of items per row, each row's total length <= max_tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > max_tokens:
            raise ValueError(f"trajectory {i} has {lengths[i]} trie tokens, more than max_tokens={max_tokens}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_tokens - lengths[i])
    for r in rows:
        r.sort()
    return rows


def collate(tries: Sequence[PackedTrie], max_tokens: int | None = None, pad_id: int = 0,
            pad_to_multiple_of: int = 1) -> PackedTrie:
    """Pack several single-row tries into rows of at most `max_tokens` tokens, padded to one length.

    Trajectory i of the input keeps `sample_ids == i`. Padding nodes are their own roots that attend
    only to themselves (so no softmax row is empty) and that no real token can see; labels are -100.
    `max_tokens=None` puts each trajectory in a row of its own.
    """
    if not tries:
        raise ValueError("collate() needs at least one trie")
    lengths = [t.shape[1] for t in tries]
    groups = [[i] for i in range(len(tries))] if max_tokens is None else assign_rows(lengths, max_tokens)
    longest = max(sum(lengths[i] for i in g) for g in groups)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    out = {k: torch.empty(len(groups), length, dtype=torch.long) for k in _FIELDS}
    for r, group in enumerate(groups):
        at = 0
        for i in group:
            t, n = tries[i], lengths[i]
            out["input_ids"][r, at:at + n] = t.input_ids[0]
            out["position_ids"][r, at:at + n] = t.position_ids[0]
            out["parents"][r, at:at + n] = torch.where(t.parents[0] >= 0, t.parents[0] + at, -1)
            out["labels"][r, at:at + n] = t.labels[0]
            out["exits"][r, at:at + n] = t.exits[0] + at
            out["sample_ids"][r, at:at + n] = i
            at += n
        pad = torch.arange(at, length)
        out["input_ids"][r, at:] = pad_id
        out["position_ids"][r, at:] = 0
        out["parents"][r, at:] = -1
        out["labels"][r, at:] = IGNORE
        out["exits"][r, at:] = pad + 1
        out["sample_ids"][r, at:] = -1
    return PackedTrie(**out)


# ----------------------------------------------------------------------------------------------------
# Log-probabilities


def _decoder_and_head(model):
    """The transformer body (returns hidden states) and the LM head of a causal LM (also under peft)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, base.base_model_prefix, None)
    head = base.get_output_embeddings()
    if body is None or head is None:
        raise TypeError(f"{type(base).__name__} does not expose a decoder body and an LM head")
    return body, head


def default_mask_kind(model) -> str:
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return {"flex_attention": "block", "eager": "float"}.get(impl, "bool")


def logprobs(model, packed: PackedTrie, mask=None, mask_kind: str | None = None,
             chunk_size: int = 4096, recompute: bool = True) -> torch.Tensor:
    """log p(token_i | ancestors of i) for every node, read at parent(i); 0 where parent(i) = -1.

        log p_i = z[parent(i), x_i] - logsumexp_v z[parent(i), v],   z = lm_head(h)

    Returns a float32 tensor shaped like `packed.input_ids`. The mask defaults to the kind the model's
    attention implementation needs (bool for sdpa, float for eager, BlockMask for flex_attention); pass
    `mask=` to use another one (e.g. `packed.causal_mask()` to show leakage).

    The LM head runs over `chunk_size` nodes at a time. With `recompute=True` (default) autograd keeps only
    each chunk's head input (chunk x hidden) and recomputes its logits in the backward (`twlib.lm_head`):
    one chunk's [chunk x vocab] fp32 buffer at a time, 2.3 GiB at 4,096 x 151,936 instead of every chunk's
    (24.9 GB at 40,960 tokens). `recompute=False` keeps every chunk's fp32 logits for the backward (the
    plain autograd version; same numbers, tested to 1e-6).
    """
    from twlib.lm_head import head_logprobs

    device = next(model.parameters()).device
    packed = packed.to(device)
    if mask is None:
        kind = mask_kind or default_mask_kind(model)
        dtype = next(model.parameters()).dtype
        mask = packed.attention_mask(kind, dtype=dtype if dtype.is_floating_point else torch.float32)
    body, head = _decoder_and_head(model)
    hidden = body(input_ids=packed.input_ids, position_ids=packed.position_ids,
                  attention_mask=mask, use_cache=False).last_hidden_state
    rows, length = packed.shape
    flat = hidden.reshape(rows * length, -1)
    row_offset = torch.arange(rows, device=device)[:, None] * length
    source = (packed.parents.clamp(min=0) + row_offset).reshape(-1)
    targets = packed.input_ids.reshape(-1)
    has_parent = (packed.parents >= 0).reshape(-1)
    out = torch.zeros(rows * length, dtype=torch.float32, device=device)
    where = has_parent.nonzero().squeeze(-1)
    for start in range(0, where.numel(), chunk_size):
        idx = where[start:start + chunk_size]
        out[idx] = head_logprobs(head, flat[source[idx]], targets[idx], recompute=recompute)
    return out.view(rows, length)


def sequence_logprobs(model, context_ids: Sequence[int], completion_ids: Sequence[int]) -> torch.Tensor:
    """Reference: log-probs of a completion run alone as an ordinary causal sequence (plain forward)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(context_ids) + list(completion_ids)], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = logits.log_softmax(-1)
    start = len(context_ids)
    positions = torch.arange(start, ids.shape[1], device=device)
    return logp[positions - 1, ids[0, positions]]
