"""attn_decode: attention of a few query tokens against a KV cache (flash_attn_with_kvcache), with the in-place
append of new tokens. Kernels: kv_check, kv_append, attn_decode (split-KV) and attn_decode_combine.

    call.py     AttnDecodeCall, the call description
    host.py     spec, defaults, feasibility, split choice, value checks, launch (the runtime)
    tuning.py   search space, plan, benchmark problem (flashcore-tune)
    bench.py    the decode matrix and the decode host-overhead suite (flashcore-bench)
"""
from ..base import Axis, Op, Param
from .call import AttnDecodeCall
from .host import MAX_SPLITS, HOST_POLICY, default_config, is_feasible, spec_of

OP = Op(
    name="attn_decode",
    kernels=("attn_decode", "attn_decode_combine", "kv_append", "kv_check"),
    call_type=AttnDecodeCall,
    # (next_pow2(batch * heads_kv), next_pow2(cache capacity), next_pow2(seqlen_q)): host-known integers only,
    # so a captured decode step replays with any cache_seqlens
    axes=(Axis("batch*heads_kv", ("batch", "heads_kv")), Axis("cache_len", ("cache_len",)),
          Axis("seqlen_q", ("seqlen_q",))),
    tunables=(Param("BLOCK_N", (16, 32, 64, 128, 256)), Param("num_warps", (1, 2, 4, 8)),
              Param("num_stages", tuple(range(1, 7))),
              # 0: the heuristic. A count tuned for one batch and capacity misplaces work at others (16 splits tuned
              # at batch 16 with an 8k cache gave a 1k cache one key tile per program and a combine, 0.90x the
              # heuristic's one split): a neighbour's record lends its tiles, the heuristic its splits
              Param("num_splits", (0,) + tuple(2 ** i for i in range(MAX_SPLITS.bit_length())), per_bucket=True),
              Param("combine.num_warps", (1, 2, 4, 8))),
    default_config=default_config,
    spec_of=spec_of,
    is_feasible=is_feasible,
    tuning="flashcore.ops.attn_decode.tuning:TUNING",
    bench="flashcore.ops.attn_decode.bench:SUITES",
    metric_unit="GB/s",
    cli_defaults=dict(batch=1, seqlen_q=1, heads_q=32, heads_kv=8, head_dim=128, cache_len=8192, dtype="bf16"),
    host_policy=HOST_POLICY,
)
