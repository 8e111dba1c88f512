"""attn_varlen: forward attention over packed sequences of mixed lengths (flash_attn_varlen_func), K/V packed or
in a paged cache (chunked prefill). One kernel: templates/attn_varlen.py.jinja, the forward family's core.

    call.py     AttnVarlenCall, the call description
    host.py     spec, default tiles, static feasibility, value checks, launch (the runtime)
    workload.py batches of lengths, their inputs, useful FLOPs, the check (shared by tuning and bench; tools only)
    tuning.py   search space, plan, benchmark problem (flashcore-tune)
    bench.py    the mixed, skewed and chunked-prefill suites (flashcore-bench)
"""
from ..base import Axis, Op, Param
from .call import AttnVarlenCall
from .host import default_config, is_feasible, spec_of

TILES = (16, 32, 64, 128, 256)

OP = Op(
    name="attn_varlen",
    kernels=("attn_varlen",),
    call_type=AttnVarlenCall,
    # (next_pow2(total_q * heads_q), next_pow2(max_seqlen_q), next_pow2(max_seqlen_k)): host-known integers only, so
    # a captured call replays with any lengths within them
    axes=(Axis("tokens*heads", ("total_q", "heads_q")), Axis("max_seqlen_q", ("max_seqlen_q",)),
          Axis("max_seqlen_k", ("max_seqlen_k",))),
    tunables=(Param("BLOCK_M", TILES), Param("BLOCK_N", TILES), Param("num_warps", (1, 2, 4, 8, 16)),
              Param("num_stages", tuple(range(1, 9)))),
    default_config=default_config,
    spec_of=spec_of,
    is_feasible=is_feasible,
    tuning="flashcore.ops.attn_varlen.tuning:TUNING",
    bench="flashcore.ops.attn_varlen.bench:SUITES",
    metric_unit="TFLOP/s",
    cli_defaults=dict(batch=16, total_q=16384, max_seqlen_q=2048, max_seqlen_k=2048, heads_q=32, heads_kv=8,
                      head_dim=128, dtype="bf16"),
)
