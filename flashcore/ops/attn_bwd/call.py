"""The call description of attn_bwd: one backward call's shape and the options that pick its kernels."""
from __future__ import annotations

from dataclasses import dataclass

from ..attn_fwd.call import AttnFwdCall


@dataclass(frozen=True)
class AttnBwdCall(AttnFwdCall):
    """The forward call it differentiates: q, dout (batch, seqlen_q, heads_q, head_dim); k, v (batch, seqlen_k,
    heads_kv, head_dim). Same fields, same rules (AttnFwdCall)."""

    @property
    def flops(self) -> float:
        """Backward FLOPs as the peers count them: 2.5x the forward's (five matmuls to the forward's two)."""
        return 2.5 * super().flops
