"""The softmax scale folded into one FMA per score against the multiply and the subtract of today's block loop
(macros/softmax.jinja, plain scores: no softcap, no ALiBi), in the dense forward at equal tiles, cuDNN beside for
scale. Folded: the max over the raw q . k times qk_scale (the scale is > 0: the host checks softmax_scale), then
p = exp2(qk * qk_scale - m), one FMA per score. Prediction: on Hopper the FP32 work between the two GEMMs bounds the
loop (the FlashAttention-3 paper); one fewer FP32 op of about five per score should gain a few percent where the
kernel is compute-bound, little at S = 512.

H100, 2026-12-07: +2.2% geomean over 20 points (0.99-1.07x at 64 x 64 tiles, 0.98-1.05x at 128 x 128;
BENCHMARKS.md). Not in the template yet: the edit changes the rendered code of every attn_fwd and attn_varlen spec
without softcap / ALiBi, which makes their tuned records stale; it lands with the next retune of a card's bundle.

The folded variant is today's rendered source with three lines replaced; both run through attention_forward's
launch path with the same explicit config, in turns, in one process:

    python benchmarks/probes/fold_scale_ab.py        (GPU; one line per shape and config)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from variants import median_ms, module_of

from flashcore import dispatch
from flashcore.generator import render
from flashcore.ops.attn_fwd import host

DEV, DT = "cuda", torch.bfloat16
SEPARATE_TO_FOLDED = (
    ("        qk = qk * qk_scale\n", ""),
    ("m_new = tl.maximum(m_i, tl.max(qk, 1))", "m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)"),
    ("p = tl.math.exp2(qk - m_ref[:, None])", "p = tl.math.exp2(qk * qk_scale - m_ref[:, None])"),
)
# (batch, seqlen, heads, head_dim): 16k tokens, H x D = 2048 (ANCHORS.md's shapes)
SHAPES = ((32, 512, 16, 128), (8, 2048, 16, 128), (4, 4096, 16, 128), (1, 16384, 16, 128), (4, 4096, 32, 64))
CONFIGS = (dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, WARP_SPECIALIZE=0),
           dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, WARP_SPECIALIZE=0))


def main() -> None:
    torch.manual_seed(0)
    original_load = host.load
    print(f"{torch.cuda.get_device_name()}: bf16, TFLOP/s (4 B H S^2 D, half when causal), medians of 3 rounds")
    for batch, seqlen, heads, dim in SHAPES:
        q, k, v = (torch.randn(batch, seqlen, heads, dim, device=DEV, dtype=DT) for _ in range(3))
        for causal in (False, True):
            flop = 4 * batch * heads * seqlen * seqlen * dim / (2 if causal else 1)
            spec = host.runtime_spec(host.call_of(q, k, causal, False, False, False), q, k, v)
            separate = original_load(spec)
            source = render(spec, "attn_fwd")
            for today, folded_line in SEPARATE_TO_FOLDED:
                assert source.count(today) == 1, today
                source = source.replace(today, folded_line)
            folded = module_of(source, f"folded_{seqlen}_{dim}_{int(causal)}")
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

            for config in CONFIGS:
                times = {"folded": [], "separate": [], "cudnn": []}
                outs = {}
                for _ in range(3):
                    for name, module in (("folded", folded), ("separate", separate)):
                        host.load = lambda s, t=None, m=module: m if s.op == "attn_fwd" else original_load(s, t)
                        dispatch.clear()

                        def run():
                            return host.attention_forward(q, k, v, None, causal, -1, 0 if causal else -1, 0.0, False,
                                                          config=config)[0]
                        outs[name] = run()
                        times[name].append(median_ms(run))
                    times["cudnn"].append(median_ms(cudnn))
                host.load = original_load
                dispatch.clear()
                tf = {name: flop / sorted(t)[1] / 1e9 for name, t in times.items()}
                err = (outs["folded"].float() - outs["separate"].float()).abs().max().item()
                print(f"B{batch} S{seqlen} H{heads} D{dim} {'causal' if causal else 'full  '} "
                      f"{config['BLOCK_M']}x{config['BLOCK_N']} w{config['num_warps']} s{config['num_stages']}: "
                      f"folded {tf['folded']:.0f}, separate {tf['separate']:.0f} -> {tf['folded'] / tf['separate']:.3f}x; "
                      f"cuDNN {tf['cudnn']:.0f} (folded {tf['folded'] / tf['cudnn']:.2f}x); max |diff| {err:.2e}",
                      flush=True)


if __name__ == "__main__":
    main()
