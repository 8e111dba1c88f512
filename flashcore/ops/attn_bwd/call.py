"""The call description of attn_bwd: one backward call's shape and the options that pick its kernels."""
from __future__ import annotations

from dataclasses import dataclass

from ...counts import BACKWARD_FLOPS
from ..attn_fwd.call import AttnFwdCall


@dataclass(frozen=True)
class AttnBwdCall(AttnFwdCall):
    """The forward call it differentiates: q, dout (batch, seqlen_q, heads_q, head_dim); k, v (batch, seqlen_k,
    heads_kv, head_dim). Same fields, same rules (AttnFwdCall), and `varlen`: packed sequences
    (flash_attn_varlen_func's, K/V packed), `batch` of them with at most seqlen_q / seqlen_k tokens (the call's
    max_seqlen_q / max_seqlen_k: what its bucket holds, since the lengths are device values), and `dq_atomic`: the
    backward's scheme (dq summed with fp32 atomics by the dK/dV kernel, no dQ kernel; False: the dQ kernel,
    bit-identical runs; host.dq_atomic_for says which one flash-attn's `deterministic` runs)."""
    varlen: bool = False
    dq_atomic: bool = False

    @property
    def flops(self) -> float:
        """Backward FLOPs as the peers count them (counts.BACKWARD_FLOPS x the forward's); varlen: a bound (every
        sequence at max_seqlen)."""
        return BACKWARD_FLOPS * super().flops

    def describe(self) -> str:
        return super().describe() + " varlen" * self.varlen + " dq_atomic" * self.dq_atomic
