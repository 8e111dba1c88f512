"""The call description of attn_varlen: a packed batch's host-known sizes and the options that pick its kernel."""
from __future__ import annotations

from dataclasses import dataclass

from ... import checks


@dataclass(frozen=True)
class AttnVarlenCall:
    """q (total_q, heads_q, head_dim) holding `batch` sequences of at most max_seqlen_q tokens; k, v packed the same
    way (page_size 0) or a paged cache (num_blocks, page_size, heads_kv, head_dim) read through a block table."""
    batch: int
    total_q: int
    max_seqlen_q: int
    max_seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str = "bf16"          # fp16 | bf16 | fp32
    page_size: int = 0           # 0: packed k / v; n: a paged cache of blocks of n tokens
    causal: bool = False
    window: bool = False         # a bounded sliding window on either side
    softcap: bool = False
    alibi: bool = False          # ALiBi slopes given

    def __post_init__(self):
        for name in ("batch", "total_q", "max_seqlen_q", "max_seqlen_k", "heads_q", "heads_kv", "head_dim",
                     "page_size"):
            value = getattr(self, name)
            low = 1 if name.startswith(("heads", "head_dim")) else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        checks.check_head_dim(self.head_dim)
        checks.check_heads(self.heads_q, self.heads_kv)
        if self.dtype not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"dtype must be fp16, bf16 or fp32, got {self.dtype!r}")

    @property
    def gqa_group(self) -> int:
        return self.heads_q // self.heads_kv

    def describe(self) -> str:
        layout = f" paged {self.page_size}" if self.page_size else ""
        return (f"{self.batch} seqs {self.total_q} tokens max {self.max_seqlen_q}/{self.max_seqlen_k} heads "
                f"{self.heads_q}/{self.heads_kv} d{self.head_dim} {self.dtype}{layout}"
                + "".join(f" {n}" for n in ("causal", "window", "softcap", "alibi") if getattr(self, n)))
