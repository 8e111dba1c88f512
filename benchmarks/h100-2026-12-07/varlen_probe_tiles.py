import torch, itertools
from triton.testing import do_bench
from flashcore.ops.attn_varlen.host import varlen_attention
import flashcore
dev, dt, H, HK, D = "cuda", torch.bfloat16, 32, 8, 128
def cu(l): return torch.tensor([0]+list(itertools.accumulate(l)), dtype=torch.int32, device=dev)
def t(f): return do_bench(f, warmup=10, rep=60, return_mode="median")
B, S = 8, 2048
q = torch.randn(B*S, H, D, device=dev, dtype=dt); k = torch.randn(B*S, HK, D, device=dev, dtype=dt); v = torch.randn_like(k)
dense = t(lambda: flashcore.flash_attn_func(q.view(B,S,H,D), k.view(B,S,HK,D), v.view(B,S,HK,D), causal=True))
for c in (dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3), dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)):
    ms = t(lambda: varlen_attention(q, k, v, cu([S]*B), cu([S]*B), S, S, None, True, -1, 0, 0.0, False, config=c))
    print(f"uniform B8 S2048 causal {c}: varlen {ms:.3f} ms vs dense {dense:.3f} -> {dense/ms:.2f}x", flush=True)
page, Bc, chunk, prefix = 16, 8, 2048, 16384
lk, lq = [prefix+chunk]*Bc, [chunk]*Bc
mb = (prefix+chunk)//page; nb = Bc*mb + 7
bt = torch.randperm(nb, device=dev)[:Bc*mb].reshape(Bc, mb).to(torch.int32)
kc = torch.randn(nb, page, HK, D, device=dev, dtype=dt); vc = torch.randn_like(kc); qc = torch.randn(sum(lq), H, D, device=dev, dtype=dt)
for c in (dict(BLOCK_M=128, BLOCK_N=16, num_warps=8, num_stages=3), dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4), dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)):
    ms = t(lambda: varlen_attention(qc, kc, vc, cu(lq), cu(lk), chunk, prefix+chunk, None, True, -1, 0, 0.0, False, None, bt, config=c))
    print(f"chunked page16 B8 2048/16k {c}: {ms:.3f} ms", flush=True)
