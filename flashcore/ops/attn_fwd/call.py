"""The call description of attn_fwd: one forward call's shape and the options that pick its kernel."""
from __future__ import annotations

from dataclasses import dataclass

from ... import checks


@dataclass(frozen=True)
class AttnFwdCall:
    """q (batch, seqlen_q, heads_q, head_dim); k, v (batch, seqlen_k, heads_kv, head_dim)."""
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str = "bf16"          # fp16 | bf16 | fp32
    causal: bool = False
    window: bool = False         # a bounded sliding window on either side
    softcap: bool = False
    alibi: bool = False          # ALiBi slopes given

    def __post_init__(self):
        for name in ("batch", "seqlen_q", "seqlen_k", "heads_q", "heads_kv", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if "seqlen" in name else 1):
                raise ValueError(f"{name} must be a {'non-negative' if 'seqlen' in name else 'positive'} integer, "
                                 f"got {value!r}")
        checks.check_head_dim(self.head_dim)    # what flash_attn_func refuses, in its words
        checks.check_heads(self.heads_q, self.heads_kv)
        if self.dtype not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"dtype must be fp16, bf16 or fp32, got {self.dtype!r}")

    @property
    def gqa_group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def flops(self) -> float:
        """Forward FLOPs as the peers count them: 4 * B * Hq * Sq * Sk * D, halved when causal."""
        total = 4.0 * self.batch * self.heads_q * self.seqlen_q * self.seqlen_k * self.head_dim
        return total / 2 if self.causal else total

    def describe(self) -> str:
        return (f"{self.batch}x{self.seqlen_q}x{self.seqlen_k} heads {self.heads_q}/{self.heads_kv} "
                f"d{self.head_dim} {self.dtype}" + "".join(f" {n}" for n in ("causal", "window", "softcap", "alibi")
                                                            if getattr(self, n)))
