"""Probe (2026-12-07, not a suite): attn_varlen's sm90 descriptor path against its pointer path, in one process
on one card, default tiles and a few others; FlashCore dense beside the uniform batch. Writes $OUT/varlen-tma-ab.txt.
    python3 benchmarks/probes/varlen_tma_ab.py"""
import itertools, os
import torch
from triton.testing import do_bench
import flashcore
from flashcore.ops.attn_varlen import host
from flashcore.reference import assert_close_varlen

dev, dt = "cuda", torch.bfloat16
H, HK, D = 32, 8, 128
out_lines = []
def say(line):
    print(line, flush=True); out_lines.append(line)
def cu(lens): return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=dev)
def t(fn): return do_bench(fn, warmup=20, rep=100, return_mode="median")
def flops(lq, lk, causal=True):
    tot = 0
    for a, b in zip(lq, lk):
        tot += sum(max(0, min(b, i + b - a + 1)) for i in range(a)) if causal else a * b
    return 4.0 * tot * H * D

runtime_spec = host.make_spec
def path(tma):
    """make_spec forcing the pointer path (tma False) or leaving the runtime's choice."""
    def make_spec(q, k, v, call):
        spec = runtime_spec(q, k, v, call)
        if not tma:
            spec = host.spec_of(call, spec["arch"], aligned=False)
        return spec
    host.make_spec = make_spec
    flashcore.dispatch.clear()

def call(q, k, v, lq, lk, config=None, bt=None, causal=True):
    cq, ck = cu(lq), cu(lk)
    return lambda: host.varlen_attention(q, k, v, cq, ck, max(lq), max(lk), None, causal, -1, 0 if causal else -1,
                                         0.0, False, None, bt, config=config)

def paged(lq, lk, page):
    mb = max((n + page - 1) // page for n in lk)
    nb = len(lk) * mb
    bt = torch.randperm(nb, device=dev)[: len(lk) * mb].reshape(len(lk), mb).to(torch.int32)
    kc = torch.randn(nb, page, HK, D, device=dev, dtype=dt); vc = torch.randn_like(kc)
    return kc, vc, bt

torch.manual_seed(0)
say(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
# -- correctness of both paths, bf16 --
lq, lk = [1, 0, 257, 33, 128, 700], [5, 3, 257, 100, 128, 900]
q = torch.randn(sum(lq), H, D, device=dev, dtype=dt); k = torch.randn(sum(lk), HK, D, device=dev, dtype=dt)
v = torch.randn_like(k)
for tma in (True, False):
    path(tma)
    for causal in (False, True):
        o, lse = call(q, k, v, lq, lk, causal=causal)()[0], None
        assert_close_varlen(o, q, k, v, cu(lq), cu(lk), causal=causal)
    for page in (16, 64, 128):
        kc, vc, bt = paged(lq, lk, page)
        o = call(q, kc, vc, lq, lk, bt=bt)()[0]
        assert_close_varlen(o, q, kc, vc, cu(lq), cu(lk), block_table=bt, causal=True)
say("bf16 correctness ok (both paths, packed and paged 16 / 64 / 128)")

CONFIGS = [None, dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
           dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
           dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)]
def sweep(name, make, work, baseline=None):
    for tma in (True, False):
        path(tma)
        res = []
        for c in CONFIGS:
            try:
                res.append((t(make(c)), c))
            except Exception as e:
                res.append((float("nan"), c)); say(f"  {name} tma={tma} {c}: {type(e).__name__} {str(e)[:120]}")
        d = res[0][0]
        b = min((r for r in res if r[0] == r[0]), key=lambda r: r[0])
        extra = f" | {baseline[0]} {baseline[1]:.3f} ms: default {baseline[1] / d:.3f}x, best {baseline[1] / b[0]:.3f}x" if baseline else ""
        say(f"{name} tma={tma}: default {d:.3f} ms ({work / d / 1e9:.0f} TF/s), best {b[0]:.3f} ms {b[1]}; all "
            + " ".join(f"{r[0]:.3f}" for r in res) + extra)

for B, S, causal in ((8, 2048, True), (8, 2048, False), (4, 4096, True)):
    qd = torch.randn(B, S, H, D, device=dev, dtype=dt); kd = torch.randn(B, S, HK, D, device=dev, dtype=dt); vd = torch.randn_like(kd)
    dense = t(lambda: flashcore.flash_attn_func(qd, kd, vd, causal=causal))
    sweep(f"uniform {B}x{S} causal={causal}",
          lambda c: call(qd.view(-1, H, D), kd.view(-1, HK, D), vd.view(-1, HK, D), [S] * B, [S] * B, c, causal=causal),
          flops([S] * B, [S] * B, causal), ("dense", dense))

g = torch.Generator().manual_seed(1)
lens = []
while sum(lens) < 16384:
    lens.append(int(torch.randint(64, 4097, (1,), generator=g)))
lens[-1] -= sum(lens) - 16384
q = torch.randn(16384, H, D, device=dev, dtype=dt); k = torch.randn(16384, HK, D, device=dev, dtype=dt); v = torch.randn_like(k)
sweep(f"mixed 16k {len(lens)} seqs", lambda c: call(q, k, v, lens, lens, c), flops(lens, lens))
skew = [16384] + [256] * 63
q = torch.randn(sum(skew), H, D, device=dev, dtype=dt); k = torch.randn(sum(skew), HK, D, device=dev, dtype=dt); v = torch.randn_like(k)
path(True)
alone = t(call(q[:16384], k[:16384], v[:16384], [16384], [16384]))
sweep("skewed 16k+63x256", lambda c: call(q, k, v, skew, skew, c), flops(skew, skew), ("alone (tma)", alone))

for B, chunk, prefix, page in ((8, 2048, 16384, 16), (8, 2048, 16384, 128), (32, 512, 4096, 16), (32, 512, 4096, 128)):
    lq, lk = [chunk] * B, [prefix + chunk] * B
    q = torch.randn(sum(lq), H, D, device=dev, dtype=dt)
    kc, vc, bt = paged(lq, lk, page)
    k = torch.randn(sum(lk), HK, D, device=dev, dtype=dt); v = torch.randn_like(k)
    path(True)
    packed = t(call(q, k, v, lq, lk))
    sweep(f"chunked B{B} chunk{chunk} prefix{prefix} page{page}", lambda c: call(q, kc, vc, lq, lk, c, bt=bt),
          flops(lq, lk), ("packed (tma)", packed))

os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
open(os.path.join(os.environ.get("OUT", "."), "varlen-tma-ab.txt"), "w").write("\n".join(out_lines) + "\n")
