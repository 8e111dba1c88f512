"""Public API: flash-attn's names, layouts and argument meanings.

Eager calls go straight to the op's host code (flashcore/ops/<op>/host.py), whose hot path is a dict lookup
and a launch: scalar arguments are checked on every call, tensors on the first call of each signature (their
checks read only metadata that the signature holds). Under torch.compile the call is a torch.library custom op
with a fake implementation, so torch.compile(fullgraph=True) traces through it; eager calls skip the op's
dispatcher (about 70 us), which only the compiler needs. Both capture in CUDA graphs (no host sync, no
data-dependent allocation).
"""
from __future__ import annotations

import torch

from . import checks
from .ops.attn_bwd.host import attention_backward, dq_atomic_for
from .ops.attn_fwd.host import attention_forward


@torch.library.custom_op("flashcore::attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                 window_left: int, window_right: int, softcap: float, return_lse: bool,
                 alibi_slopes: torch.Tensor | None,
                 deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    # (the tensor checks run on a signature's first call, as on the eager path: this op is how training calls run;
    # deterministic only picks the backward's scheme)
    out, lse = attention_forward(q, k, v, softmax_scale, causal, window_left, window_right, softcap, return_lse,
                                 alibi_slopes, check=_check_tensors)
    return out, lse if lse is not None else q.new_empty((0,), dtype=torch.float32)


@_attn_fwd_op.register_fake
def _(q, k, v, softmax_scale, causal, window_left, window_right, softcap, return_lse, alibi_slopes,
      deterministic=False):
    batch, seqlen_q, heads_q, _ = q.shape
    lse_shape = (batch, heads_q, seqlen_q) if return_lse else (0,)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("flashcore::attn_bwd", mutates_args=())
def _attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, dlse: torch.Tensor | None, softmax_scale: float, causal: bool, window_left: int,
                 window_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
                 deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap,
                              alibi_slopes, dlse, dq_atomic_for(deterministic, q))


@_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
      deterministic=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_backward(ctx, inputs, output) -> None:
    """Saves what the backward recomputes P from: q, k, v, alibi_slopes, and the forward's out and fp32 lse (the
    caller asks for the lse whenever a gradient is needed: return_lse=True), and which backward to run
    (deterministic)."""
    q, k, v, softmax_scale, causal, window_left, window_right, softcap, _, alibi_slopes, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.options = (softmax_scale, causal, window_left, window_right, softcap)
    ctx.deterministic = deterministic
    ctx.set_materialize_grads(False)     # an unused lse (or out) gets None, not a tensor of zeros to read


def _backward(ctx, dout, dlse):
    """(dq, dk, dv) in q's, k's and v's shapes and dtypes; the options and alibi_slopes get none (flash-attn's
    ALiBi slopes are not trained either)."""
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    if dout is None:      # only the lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv = _attn_bwd_op(dout, q, k, v, out, lse, dlse, *ctx.options, alibi_slopes, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attn_fwd_op.register_autograd(_backward, setup_context=_setup_backward)


def _check_tensors(q, k, v, alibi_slopes) -> None:
    """flash_attn_func's tensor checks. They read only the tensors' types, shapes, strides, dtypes and devices
    (and TRITON_INTERPRET), which is what lets eager calls run them once per call signature."""
    checks.check_attention_inputs(q, k, v)
    if alibi_slopes is not None:
        checks.check_alibi_slopes(alibi_slopes, q)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, return_lse: bool = False):
    """Scaled dot-product attention over (batch, seqlen, heads, head_dim) tensors; flash-attn's
    `flash_attn_func`, argument for argument and in its order.

    Args:
        q: (B, Sq, Hq, D), float16 / bfloat16 / float32, CUDA (CPU under TRITON_INTERPRET=1: fp16 / fp32).
        k: (B, Sk, Hkv, D), same dtype and device as q. Hq must be a multiple of Hkv (MQA / GQA: query head h
           reads key/value head h // (Hq // Hkv); nothing is expanded in memory).
        v: (B, Sk, Hkv, D), like k.
           Any strides with a unit stride on D work (e.g. q, k, v sliced out of a packed qkv tensor).
           D: multiple of 8 in [16, 256]; 64, 80, 96, 128, 192, 256 are the usual ones.
        dropout_p: must be 0.0 (inference; dropout is not implemented: NotImplementedError otherwise).
        softmax_scale: scale applied to q @ k^T before the softmax; default 1 / sqrt(D).
        causal: mask future keys. With Sq != Sk the mask is aligned to the bottom-right corner (flash-attn's
           convention): query i sits at position i + Sk - Sq and sees keys j <= i + Sk - Sq. When Sq > Sk,
           the first Sq - Sk query rows see no key; their output is 0 (and their lse -inf).
        window_size: (left, right) sliding window, -1 = unbounded on that side: query i sees keys j with
           i + Sk - Sq - left <= j <= i + Sk - Sq + right. causal=True is the same as right = 0.
        softcap: if > 0, scores s become softcap * tanh(s / softcap) (after scaling, before masking).
        alibi_slopes: (Hq,) or (B, Hq), float32, on q's device: a bias of -slope * |i + Sk - Sq - j| is added
           to the score of query i and key j (after the softcap).
        deterministic: as flash-attn's. True: gradients bit-identical run to run (dq from its own kernel). False
           (default) allows the atomic-dQ backward (the dK/dV kernel also sums dq's parts with fp32 atomic adds, so
           dq's last bits may differ run to run), which runs only on cards where it was measured faster
           (attn_bwd.host.ATOMIC_DQ_ARCHS: none yet); elsewhere False gives True's gradients. The forward is
           deterministic either way.
        return_attn_probs: also return the log-sum-exp and, as flash-attn does without dropout, None in place
           of the attention probabilities: (out, lse, None).
        return_lse (keyword only, FlashCore's): return (out, lse).

    Returns:
        out: (B, Sq, Hq, D), dtype of q, contiguous.
        lse (with return_lse / return_attn_probs): (B, Hq, Sq), float32, natural log.

    Backward: when grad mode is on and q, k or v requires grad, the call is recorded by autograd (through the
    custom op flashcore::attn_fwd, which torch.compile traces too) and backward() gives dq (B, Sq, Hq, D), dk and
    dv (B, Sk, Hkv, D) in the inputs' dtypes, for every option above: causal, window_size, softcap, softmax_scale,
    GQA / MQA (dk, dv summed over each kv head's query heads), any head_dim; alibi_slopes get no gradient
    (flash-attn's behaviour); a returned lse that the loss reads is differentiated too. The forward then also
    computes the lse (saved for the backward). Under torch.no_grad() / torch.inference_mode(), or when no input
    requires grad, nothing is recorded and the eager fast path runs as before.
    """
    checks.check_dropout(dropout_p)
    checks.check_softmax_scale(softmax_scale)
    checks.check_window(window_size)
    checks.check_softcap(softcap)
    checks.check_flags(causal=causal, deterministic=deterministic, return_attn_probs=return_attn_probs,
                       return_lse=return_lse)
    window_left, window_right = window_size
    if causal:
        window_right = 0
    want_lse = return_lse or return_attn_probs
    # autograd records the custom op (its backward: _backward); the eager fast path below records nothing
    needs_grad = checks.needs_grad(q, k, v)
    if needs_grad or torch.compiler.is_compiling():
        # the op's tensor checks run on a signature's first call; here only where they would not: in a trace (the
        # fake implementation checks nothing) and for a non-tensor, which the op's schema would meet first
        if torch.compiler.is_compiling() or not checks.all_tensors(q, k, v, alibi_slopes):
            _check_tensors(q, k, v, alibi_slopes)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        out, lse = _attn_fwd_op(q, k, v, scale, causal, int(window_left), int(window_right), float(softcap),
                                want_lse or needs_grad, alibi_slopes, deterministic)
    else:   # the tensors' checks run on the first call of each signature (attention_forward's `check`)
        out, lse = attention_forward(q, k, v, softmax_scale, causal, window_left, window_right, softcap, want_lse,
                                     alibi_slopes, check=_check_tensors)
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                              return_attn_probs: bool = False):
    """flash_attn_func with q, k, v packed (self-attention); flash-attn's `flash_attn_qkvpacked_func`, argument for
    argument and in its order.

    Args:
        qkv: (B, S, 3, H, D), float16 / bfloat16 / float32 (CPU under TRITON_INTERPRET=1: fp16 / fp32); q, k, v =
           qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], strided views (no copy), so backward() gives qkv.grad
           (B, S, 3, H, D), packed the same way.
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes ((H,) or (B, H) float32),
           deterministic, return_attn_probs: as flash_attn_func's.

    Returns:
        out (B, S, H, D), or with return_attn_probs (out, lse (B, H, S) fp32, None).
    """
    checks.check_packed("qkv", qkv, 3, batched=True)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False):
    """flash_attn_func with k and v packed; flash-attn's `flash_attn_kvpacked_func`, argument for argument and in its
    order.

    Args:
        q: (B, Sq, Hq, D), float16 / bfloat16 / float32 (CPU under TRITON_INTERPRET=1: fp16 / fp32).
        kv: (B, Sk, 2, Hkv, D), q's dtype and device; k, v = kv[:, :, 0], kv[:, :, 1], strided views (no copy), so
           backward() gives kv.grad (B, Sk, 2, Hkv, D), packed the same way. Hq a multiple of Hkv (MQA / GQA).
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes ((Hq,) or (B, Hq) float32),
           deterministic, return_attn_probs: as flash_attn_func's.

    Returns:
        out (B, Sq, Hq, D), or with return_attn_probs (out, lse (B, Hq, Sq) fp32, None).
    """
    checks.check_packed("kv", kv, 2, batched=True)
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)
