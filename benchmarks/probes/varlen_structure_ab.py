"""Where the varlen forward loses to the dense one at equal tiles (H100, 2026-12-07: 0.73-0.77x on 8 x 2048 causal).

The two kernels share the key sweep; varlen adds the value check (CHECK), the device-side tile search over
cu_seqlens (_varlen_tile) and data-dependent sequence bounds. Each variant removes one of them from the rendered
source (a probe only: the uniform-length variants are wrong for mixed batches) and is timed beside the dense
kernel on the same data, in one process:

    python benchmarks/probes/varlen_structure_ab.py        (GPU; prints one line per variant)
"""
from __future__ import annotations

import itertools
import os

import torch
from variants import median_ms, module_of

import flashcore
from flashcore import dispatch
from flashcore.generator import render
from flashcore.ops.attn_varlen import host

DEV, DT, H, HKV, D = "cuda", torch.bfloat16, 32, 8, 128
SEARCH = "    seq, start_m = _varlen_tile(CuSeqlensQ, batch, tile, BLOCK_M, SEQ_CHUNK)\n"
UNIFORM = ("    blocks = max_seqlen_q // BLOCK_M\n"
           "    seq = tile // blocks\n"
           "    start_m = blocks - 1 - tile % blocks\n")
# the sequence bounds as kernel arguments (uniform lengths), not loads: what the dense kernel's compiler sees
BOUNDS = ("    q_start = tl.minimum(tl.maximum(tl.load(CuSeqlensQ + seq), 0), total_q)\n")
BOUNDS_ARG = ("    q_start = seq * max_seqlen_q\n")


def main() -> None:
    torch.manual_seed(0)
    original_load = host.load
    for batch, seqlen in ((8, 2048), (2, 8192)):
        cu = torch.tensor([0] + list(itertools.accumulate([seqlen] * batch)), dtype=torch.int32, device=DEV)
        q = torch.randn(batch * seqlen, H, D, device=DEV, dtype=DT)
        k, v = (torch.randn(batch * seqlen, HKV, D, device=DEV, dtype=DT) for _ in range(2))
        for config in (dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                       dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)):
            dense = median_ms(lambda: flashcore.ops.attn_fwd.host.attention_forward(
                q.view(batch, seqlen, H, D), k.view(batch, seqlen, HKV, D), v.view(batch, seqlen, HKV, D), None,
                True, -1, 0, 0.0, False, config=dict(config, WARP_SPECIALIZE=0)))
            reference = host.varlen_attention(q, k, v, cu, cu, seqlen, seqlen, None, True, -1, 0, 0.0, False,
                                              config=config)[0]
            spec = host.make_spec(q, k, v, host.call_of(q, k, cu, seqlen, seqlen, None, True, False, False, False))
            base = render(spec, "attn_varlen")
            assert SEARCH in base and BOUNDS in base
            variants = {"varlen": None, "no tile search": base.replace(SEARCH, UNIFORM),
                        "no search, bounds from args": base.replace(SEARCH, UNIFORM).replace(BOUNDS, BOUNDS_ARG)}
            for checks in ("auto", "0"):
                os.environ["FLASHCORE_KV_CHECKS"] = checks
                for name, source in variants.items():
                    module = original_load(spec) if source is None else module_of(source, name.replace(" ", "_")
                                                                                  .replace(",", ""))
                    host.load = lambda s, t=None, m=module: m if s.op == "attn_varlen" else original_load(s, t)
                    dispatch.clear()
                    out = host.varlen_attention(q, k, v, cu, cu, seqlen, seqlen, None, True, -1, 0, 0.0, False,
                                                config=config)[0]
                    same = torch.equal(out, reference)
                    ms = median_ms(lambda: host.varlen_attention(q, k, v, cu, cu, seqlen, seqlen, None, True, -1, 0,
                                                             0.0, False, config=config))
                    print(f"B{batch} S{seqlen} {config['BLOCK_M']}x{config['BLOCK_N']} w{config['num_warps']} "
                          f"checks={checks:4} {name:28}: {ms:.3f} ms, dense {dense:.3f} ms -> {dense / ms:.2f}x "
                          f"dense (output {'identical' if same else 'DIFFERS'})", flush=True)
            host.load = original_load
    os.environ.pop("FLASHCORE_KV_CHECKS")


if __name__ == "__main__":
    main()
