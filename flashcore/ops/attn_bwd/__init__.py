"""attn_bwd: backward attention (flash_attn_func's gradients, and flash_attn_varlen_func's over packed K/V: spec
feature varlen), three kernels run in order, in one of two schemes (host.dq_atomic_for maps flash-attn's
`deterministic` flag to one: atomic dQ only where the flag allows it and host.ATOMIC_DQ_ARCHS lists the card):

    dQ kernel    templates/attn_bwd_preprocess.py.jinja (delta = rowsum(dO * O)), attn_bwd_dkdv.py.jinja (dK, dV) and
                 attn_bwd_dq.py.jinja (dQ, recomputing P and dP). No atomics: every gradient is written once per
                 tile, bit-identical run to run.
    atomic dQ    (spec feature dq_atomic) the preprocess also zeroes dq_acc (fp32, q's shape), the dK/dV kernel adds
                 dS @ K into it with fp32 atomic adds, and attn_bwd_dq_convert (in the preprocess template) scales it
                 into dq. 5 dots and one exp2 a tile pair instead of 7 and two; dq's last bits vary run to run (the
                 order of the adds), dk and dv do not.

    call.py     AttnBwdCall, the call description
    host.py     spec, default tiles, static feasibility, launch (the runtime)
    tuning.py   search space, plan, benchmark problem (flashcore-tune: a study per kernel, dK/dV then dQ)
    bench.py    the backward alone and forward + backward over the prefill matrix, with peak memory (flashcore-bench)
"""
from ..attn_fwd import TILES
from ..base import Axis, Kernel, Op, Param
from .call import AttnBwdCall
from .host import default_config, is_feasible, spec_of


def _tiles(kernel: str) -> tuple[Param, ...]:
    return (Param(f"{kernel}.BLOCK_M", TILES), Param(f"{kernel}.BLOCK_N", TILES),
            Param(f"{kernel}.num_warps", (1, 2, 4, 8, 16)), Param(f"{kernel}.num_stages", tuple(range(1, 9))))


# the dK/dV and dQ kernels tile differently (a key block sweeping queries, a query block sweeping keys) and are
# separate launches: one study each, dK/dV first. The preprocess kernel runs on the dQ kernel's row tile and warps,
# and so does the atomic scheme's convert kernel, which stands in for the dQ kernel there (its study searches
# dq.BLOCK_M and dq.num_warps only: tuning.search_space).
TUNED_KERNELS = (Kernel("dkdv", "attn_bwd_dkdv", _tiles("dkdv")), Kernel("dq", "attn_bwd_dq", _tiles("dq")))

OP = Op(
    name="attn_bwd",
    kernels=("attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"),
    call_type=AttnBwdCall,
    # (next_pow2(seqlen_q), next_pow2(seqlen_k), next_pow2(batch * heads_q)), as attn_fwd (varlen: max_seqlen)
    axes=(Axis("seqlen_q", ("seqlen_q",)), Axis("seqlen_k", ("seqlen_k",)),
          Axis("batch*heads", ("batch", "heads_q"))),
    tunables=tuple(param for kernel in TUNED_KERNELS for param in kernel.tunables),
    tuned_kernels=TUNED_KERNELS,
    default_config=default_config,
    spec_of=spec_of,
    is_feasible=is_feasible,
    tuning="flashcore.ops.attn_bwd.tuning:TUNING",
    bench="flashcore.ops.attn_bwd.bench:SUITES",
    metric_unit="TFLOP/s",
    cli_defaults=dict(batch=1, seqlen_q=4096, seqlen_k=4096, heads_q=32, heads_kv=32, head_dim=128, dtype="bf16"),
)
