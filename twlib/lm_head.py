"""The LM head's log-probabilities of given tokens, one chunk of positions at a time, recomputed in the backward.

    log p(t | h) = z_t - logsumexp_v z_v,    z = W h (+ b)    (fp32 log-softmax of the head's output)

At Qwen3's vocabulary (151,936) the fp32 logits of a 40,960-token row are 24.9 GB. `twlib.trie.logprobs`
splits the row into chunks of C positions; this module makes each chunk's [C x vocab] logits live only
while that chunk is being computed, in the forward and again in the backward.

Design choices
- A custom autograd function (`ChunkLogprobs`) for a linear head, not `torch.utils.checkpoint`: it saves
  the chunk's head input (C x hidden), the targets and the C log-sum-exps, never a C x vocab tensor. The
  backward recomputes z and forms the gradient in place, d log p_t / dz = onehot(t) - softmax(z), so one
  chunk costs one fp32 C x vocab buffer (+ the head's output before the fp32 cast: 2 bytes per entry in
  bf16): 4 B per entry in fp32, 6 B in bf16, what `twlib.infra.plan.logits_bytes` counts for mode "chunked".
  Autograd's log-softmax keeps the logits and allocates two more C x vocab tensors in its backward.
- Same numbers as the plain version (`logprobs_from_logits` on `head(hidden)`, autograd): the forward
  computes the same max-shifted sum of exponentials; the backward the same products (tested to 1e-6).
- Autocast: the forward records whether autocast was on and with which dtype, and the recompute in the
  backward runs under the same state, so it reproduces the forward's logits. The backward's matmuls run in
  the dtype the head's matmul ran in (bf16 under autocast or a bf16 FSDP policy), as autograd's would.
- Heads that are not a plain `nn.Linear` (a peft-wrapped LM head, say) go through non-reentrant
  `torch.utils.checkpoint` of the plain version instead: recomputed too, with autograd's larger backward.
- Under FSDP2 the head's weight is the root unit's unsharded parameter while the root's forward/backward
  runs; the gradient returned for it is accumulated like nn.Linear's, then reduce-scattered by FSDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ChunkLogprobs", "head_logprobs", "logprobs_from_logits"]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logits from a bf16/fp16 head (a new tensor); fp32 and fp64 ones as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain version (autograd keeps the fp32 logits): z_t - logsumexp(z) in fp32 (fp64 stays), per row."""
    logits = _upcast(logits)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _target_and_lse(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, logsumexp z) of fp32 `logits`, which is overwritten (exponentials computed in place)."""
    target = logits.gather(-1, targets[:, None]).squeeze(-1)
    top = logits.amax(-1, keepdim=True)
    top = torch.where(top.isinf(), torch.zeros_like(top), top)  # as torch.logsumexp: all -inf rows stay -inf
    lse = logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))
    return target, lse


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class ChunkLogprobs(torch.autograd.Function):
    """apply(hidden [C, h], weight [V, h], bias [V] | None, targets [C]) -> log p(targets) [C], fp32.

    Saves hidden, weight, bias, targets and the C log-sum-exps; the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        ctx.amp = _autocast_state(hidden.device.type)
        raw = F.linear(hidden, weight, bias)
        ctx.compute_dtype = raw.dtype
        logits = _upcast(raw)
        del raw
        target, lse = _target_and_lse(logits, targets)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return target - lse

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        device_type, enabled, dtype = ctx.amp
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            raw = F.linear(hidden, weight, bias)
        grad = _upcast(raw)
        del raw
        # d(z_t - lse)/dz = onehot(t) - softmax(z); times the incoming gradient, all in place
        grad.sub_(lse[:, None]).exp_().mul_(-grad_out[:, None])
        grad.scatter_add_(-1, targets[:, None], grad_out[:, None].to(grad.dtype))
        grad = grad.to(ctx.compute_dtype)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad @ weight.to(ctx.compute_dtype)).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.t() @ hidden.to(ctx.compute_dtype)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  recompute: bool = True) -> torch.Tensor:
    """log p(targets) under `head` for one chunk of positions (hidden [C, h], targets [C]) -> [C] fp32.

    `recompute=True`: nothing of size C x vocab is kept for the backward (`ChunkLogprobs` for an nn.Linear
    head, checkpointing otherwise). `recompute=False`: the plain version, autograd keeps the fp32 logits."""
    if not recompute:
        return logprobs_from_logits(head(hidden), targets)
    if type(head) is torch.nn.Linear:
        return ChunkLogprobs.apply(hidden, head.weight, head.bias, targets)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(lambda h, t: logprobs_from_logits(head(h), t), hidden, targets, use_reentrant=False)
