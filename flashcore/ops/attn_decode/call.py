"""The call description of attn_decode: one flash_attn_with_kvcache call's shape and the options that pick its
kernels."""
from __future__ import annotations

from dataclasses import dataclass

from ... import checks
from ...dtypes import ELEM_BYTES


@dataclass(frozen=True)
class AttnDecodeCall:
    """q (batch, seqlen_q, heads_q, head_dim) against a cache of cache_len keys per sequence (its capacity: S_cache,
    or max_blocks * page_size for a paged cache), after appending seqlen_new tokens."""
    batch: int
    seqlen_q: int
    heads_q: int
    heads_kv: int
    head_dim: int
    cache_len: int
    dtype: str = "bf16"          # fp16 | bf16 | fp32
    page_size: int = 0           # 0: contiguous cache; n: paged cache of n-token blocks
    seqlen_new: int = 0          # tokens appended by the call (k, v)
    causal: bool = False         # (folded away when it masks nothing: one query token, no window)
    window: bool = False
    softcap: bool = False
    alibi: bool = False

    def __post_init__(self):
        for name in ("batch", "seqlen_q", "heads_q", "heads_kv", "head_dim", "cache_len", "page_size", "seqlen_new"):
            value = getattr(self, name)
            low = 0 if name in ("page_size", "seqlen_new") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        checks.check_head_dim(self.head_dim)    # what flash_attn_with_kvcache refuses, in its words
        checks.check_heads(self.heads_q, self.heads_kv, "k_cache")
        checks.check_decode_rows(self.seqlen_q, self.heads_q, self.heads_kv)
        if self.dtype not in ELEM_BYTES:
            raise ValueError(f"dtype must be fp16, bf16 or fp32, got {self.dtype!r}")

    @property
    def gqa_group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def kv_bytes(self) -> float:
        """Bytes of K and V one call reads when every sequence fills its cache (GB/s counts these)."""
        return 2.0 * self.batch * self.cache_len * self.heads_kv * self.head_dim * ELEM_BYTES[self.dtype]

    def describe(self) -> str:
        layout = f"paged {self.page_size}" if self.page_size else "contiguous"
        return (f"B{self.batch} q{self.seqlen_q} cache {self.cache_len} ({layout}) heads {self.heads_q}/{self.heads_kv} "
                f"d{self.head_dim} {self.dtype}" + (f" +{self.seqlen_new} new" if self.seqlen_new else "")
                + "".join(f" {n}" for n in ("causal", "window", "softcap", "alibi") if getattr(self, n)))
