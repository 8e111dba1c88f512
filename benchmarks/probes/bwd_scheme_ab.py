"""The backward's two schemes and two load paths at equal dK/dV tiles, cuDNN beside: the dQ kernel (preprocess,
dK/dV with 4 dots per tile pair, then a dQ kernel recomputing qk^T and dO v^T for 3 more and a second exp2;
deterministic=True's, and every call's today) against atomic dQ (spec feature dq_atomic: the dK/dV kernel adds
dS @ K into an fp32 dq_acc with atomics, 5 dots and one exp2 per tile pair, then a small convert kernel); each
with pointer loads (today's) and with tensor descriptors (spec feature tma: q, dO, k, v tiles by bulk tensor copy).
The result decides attn_bwd.host.ATOMIC_DQ_ARCHS (whether deterministic=False runs atomic dQ on the card) and
attn_bwd.host.TMA_ARCHS (whether the dense backward loads through descriptors there).

Predictions. Atomic: up to about 1.4x where the dots bound the loop (flash-attn 2/3 and cuDNN sum dq this way),
less what the reductions cost: each dq element takes Sk / BLOCK_N scalar fp32 reductions (at 16k tokens of 16
heads, S 16k and 64-key tiles, 8.6 G of them per backward), which L2 may not absorb at 64-key tiles; 128-key
tiles halve them. Descriptors: +5-10%, as the forward gained from them (fewer address registers, asynchronous
copies the pipeliner overlaps with the dots).

bf16, D 128, MHA 16 heads, B x S = 16k tokens (S 2k / 4k / 8k / 16k), causal and not. The backward alone: each
forward's out and lse computed once, then host.attention_backward timed with an explicit config (the variant's
dK/dV tiles (BLOCK_M swept rows, BLOCK_N kept keys, warps, stages); the dq.* tunables at the sm90 default: the dQ
kernel's tiles, or the convert kernel's row tile and warps). cuDNN: SDPA's CUDNN_ATTENTION forward run once on
inputs that require grad, its backward timed through torch.autograd.grad(retain_graph=True). All timed with
triton.testing.do_bench in one process, in turns per shape. TFLOP/s over 2.5x the forward's 4 B H S^2 D FLOPs,
halved when causal; "x cuDNN": cuDNN's ms over the row's (above 1: faster than cuDNN). Each run's dq and dk are
compared with the first variant's (max |diff|: rounding, a few bf16 ulps; an unwritten or doubled tile would show
as O(1)). $BWD_PROBE_SEQLENS (comma-separated) restricts the sequence lengths.

    python benchmarks/probes/bwd_scheme_ab.py        (GPU, about 4 minutes on an H100: mostly compiles)
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashcore.device import arch
from flashcore.ops.attn_bwd import OP, host
from flashcore.ops.attn_fwd.host import attention_forward

DEV, DT = "cuda", torch.bfloat16
HEADS, DIM, TOKENS = 16, 128, 16384
SEQLENS = tuple(int(s) for s in os.environ.get("BWD_PROBE_SEQLENS", "2048,4096,8192,16384").split(","))
# (name, dq_atomic, tma, dK/dV tiles (BLOCK_M, BLOCK_N, num_warps, num_stages)): both schemes and load paths at the
# sm90 default's 64 x 64 tiles; atomic dQ also at 128-key tiles, which halve its reductions
VARIANTS = (("dQ kernel", False, False, (64, 64, 4, 2)), ("dQ kernel, tma", False, True, (64, 64, 4, 2)),
            ("atomic", True, False, (64, 64, 4, 2)), ("atomic, tma", True, True, (64, 64, 4, 2)),
            ("atomic", True, False, (64, 128, 8, 2)), ("atomic, tma", True, True, (64, 128, 8, 2)))


def config_for(causal: bool, dq_atomic: bool, tiles: tuple, q, k) -> dict:
    """The spec's default config (its dq.* tunables: sm90's) with the dK/dV tiles `tiles`."""
    spec = host.spec_of(host.call_of(q, k, causal, False, False, False, dq_atomic), arch(q.device.index or 0))
    config = OP.default_config(spec)
    config.update(zip(("dkdv.BLOCK_M", "dkdv.BLOCK_N", "dkdv.num_warps", "dkdv.num_stages"), tiles))
    assert OP.check_config(spec, config) is None, config
    return config


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}: backward alone, bf16 D {DIM} MHA {HEADS} heads, {TOKENS} tokens; "
          "ms (do_bench), TFLOP/s (2.5 x 4 B H S^2 D, half when causal)\n")
    print("| S | batch | causal | scheme | dK/dV tiles | ms | TFLOP/s | x cuDNN | max abs diff dq, dk |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seqlen in SEQLENS:
        batch = TOKENS // seqlen
        q, k, v, dout = (torch.randn(batch, seqlen, HEADS, DIM, device=DEV, dtype=DT) for _ in range(4))
        scale = DIM ** -0.5
        for causal in (False, True):
            flop = 2.5 * 4 * batch * HEADS * seqlen * seqlen * DIM / (2 if causal else 1)
            window_right = 0 if causal else -1
            out, lse = attention_forward(q, k, v, scale, causal, -1, window_right, 0.0, True)

            # -- cuDNN: its own forward once, its backward timed --
            leaves = [t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v)]
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ref_out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
            ref_dout = dout.transpose(1, 2)
            cudnn_ms = triton.testing.do_bench(
                lambda: torch.autograd.grad(ref_out, leaves, ref_dout, retain_graph=True))
            rows = [("cuDNN", "-", cudnn_ms, "")]

            reference = None
            for name, dq_atomic, tma, tiles in VARIANTS:
                host.TMA_ARCHS = frozenset({arch(q.device.index or 0)}) if tma else frozenset()   # the load path
                config = config_for(causal, dq_atomic, tiles, q, k)

                def run(dq_atomic=dq_atomic, config=config):
                    return host.attention_backward(dout, q, k, v, out, lse, scale, causal, -1, window_right,
                                                   0.0, dq_atomic=dq_atomic, config=config)
                grads = run()
                reference = reference or grads     # the first variant's
                diff = ", ".join(f"{(g.float() - r.float()).abs().max().item():.1e}"
                                 for g, r in zip(grads[:2], reference[:2]))
                rows.append((name, "{}x{} w{} s{}".format(*tiles), triton.testing.do_bench(run), diff))
            for name, tiles, ms, diff in rows:
                print(f"| {seqlen} | {batch} | {causal} | {name} | {tiles} | {ms:.3f} | {flop / ms / 1e9:.0f} | "
                      f"{cudnn_ms / ms:.2f} | {diff} |", flush=True)
            del leaves, ref_out, out, lse
        del q, k, v, dout
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
