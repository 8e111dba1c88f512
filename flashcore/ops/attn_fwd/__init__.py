"""attn_fwd: dense forward attention (flash_attn_func), one kernel: templates/attn_fwd.py.jinja.

    call.py     AttnFwdCall, the call description
    host.py     spec, default tiles, static feasibility, launch (the runtime)
    tuning.py   search space, plan, benchmark problem (flashcore-tune)
    bench.py    the prefill matrix and the host-overhead suite (flashcore-bench)
"""
from ..base import Axis, Op, Param
from .call import AttnFwdCall
from .host import default_config, is_feasible, spec_of

TILES = (16, 32, 64, 128, 256)

OP = Op(
    name="attn_fwd",
    kernels=("attn_fwd",),
    call_type=AttnFwdCall,
    # (next_pow2(seqlen_q), next_pow2(seqlen_k), next_pow2(batch * heads_q))
    axes=(Axis("seqlen_q", ("seqlen_q",)), Axis("seqlen_k", ("seqlen_k",)),
          Axis("batch*heads", ("batch", "heads_q"))),
    tunables=(Param("BLOCK_M", TILES), Param("BLOCK_N", TILES), Param("num_warps", (1, 2, 4, 8, 16)),
              Param("num_stages", tuple(range(1, 9))), Param("WARP_SPECIALIZE", (0, 1))),
    default_config=default_config,
    spec_of=spec_of,
    is_feasible=is_feasible,
    tuning="flashcore.ops.attn_fwd.tuning:TUNING",
    bench="flashcore.ops.attn_fwd.bench:SUITES",
    metric_unit="TFLOP/s",
    cli_defaults=dict(batch=1, seqlen_q=4096, seqlen_k=4096, heads_q=32, heads_kv=32, head_dim=128, dtype="bf16"),
)
