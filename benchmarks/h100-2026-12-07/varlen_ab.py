"""Quick H100 probe of the varlen kernel (2026-12-07; not a suite): bf16 correctness, then default-config timings against
FlashCore dense, padded SDPA, the long sequence alone, and packed vs paged K/V. Ran as: python3 varlen_ab.py"""
import sys, torch, triton, flashcore, itertools
from triton.testing import do_bench
from flashcore.ops.attn_varlen.host import varlen_attention
from flashcore.ops.attn_fwd.host import attention_forward
from flashcore.reference import assert_close_varlen
torch.manual_seed(0)
dev = "cuda"; dt = torch.bfloat16
H, HK, D = 32, 8, 128

def cu(lens): return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=dev)
def flops(lq, lk, causal):
    tot = 0
    for a, b in zip(lq, lk):
        if causal:
            tot += sum(max(0, min(b, i + b - a + 1)) for i in range(a))
        else:
            tot += a * b
    return 4.0 * tot * H * D
def t(fn): return do_bench(fn, warmup=20, rep=120, return_mode="median")

# -- correctness (bf16, small) --
lq = [1, 0, 257, 33, 128]; lk = [5, 3, 257, 100, 128]
q = torch.randn(sum(lq), H, D, device=dev, dtype=dt); k = torch.randn(sum(lk), HK, D, device=dev, dtype=dt); v = torch.randn_like(k)
for causal in (False, True):
    out, lse, _ = flashcore.flash_attn_varlen_func(q, k, v, cu(lq), cu(lk), max(lq), max(lk), causal=causal, return_attn_probs=True)
    assert_close_varlen(out, q, k, v, cu(lq), cu(lk), lse=lse, causal=causal)
for page in (16, 128):
    mb = (max(lk) + page - 1) // page
    nb = len(lk) * mb + 5
    bt = torch.randperm(nb, device=dev)[: len(lk) * mb].reshape(len(lk), mb).to(torch.int32)
    kc = torch.randn(nb, page, HK, D, device=dev, dtype=dt); vc = torch.randn_like(kc)
    out = flashcore.flash_attn_varlen_func(q, kc, vc, cu(lq), cu(lk), max(lq), max(lk), causal=True, block_table=bt)
    assert_close_varlen(out, q, kc, vc, cu(lq), cu(lk), block_table=bt, causal=True)
print("bf16 correctness ok", flush=True)

configs = [None]
def vl(q, k, v, cq, ck, mq, mk, causal, config, bt=None):
    return lambda: varlen_attention(q, k, v, cq, ck, mq, mk, None, causal, -1, 0 if causal else -1, 0.0, False, None, bt, config=config)
def best(fn_of_cfg):
    res = []
    for c in configs:
        try: res.append((t(fn_of_cfg(c)), c))
        except Exception as e: print("  cfg fail", c, type(e).__name__, str(e)[:100])
    return min(res, key=lambda r: r[0]), res[0]

rows = []
# -- uniform: varlen vs dense --
for B, S, causal in ((8, 2048, True),):
    qd = torch.randn(B, S, H, D, device=dev, dtype=dt); kd = torch.randn(B, S, HK, D, device=dev, dtype=dt); vd = torch.randn_like(kd)
    f = flops([S]*B, [S]*B, causal)
    dense = t(lambda: flashcore.flash_attn_func(qd, kd, vd, causal=causal))
    (bv, bc), (dv, _) = best(lambda c: vl(qd.view(-1, H, D), kd.view(-1, HK, D), vd.view(-1, HK, D), cu([S]*B), cu([S]*B), S, S, causal, c))
    rows.append(f"uniform B{B} S{S} causal={causal}: dense {dense:.3f} ms {f/dense/1e9:.0f} TF | varlen default {dv:.3f} ({dense/dv:.2f}x dense) best {bv:.3f} ({dense/bv:.2f}x) {bc}")
    print(rows[-1], flush=True)
# -- mixed --
g = torch.Generator().manual_seed(1)
for total in (16384,):
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.randint(64, 4097, (1,), generator=g)))
    lens[-1] -= sum(lens) - total
    lens = [l for l in lens if l > 0]
    B, S = len(lens), max(lens)
    q = torch.randn(total, H, D, device=dev, dtype=dt); k = torch.randn(total, HK, D, device=dev, dtype=dt); v = torch.randn_like(k)
    f = flops(lens, lens, True)
    (bv, bc), (dv, _) = best(lambda c: vl(q, k, v, cu(lens), cu(lens), S, S, True, c))
    qp = torch.randn(B, S, H, D, device=dev, dtype=dt); kp = torch.randn(B, S, HK, D, device=dev, dtype=dt); vp = torch.randn_like(kp)
    padded = t(lambda: flashcore.flash_attn_func(qp, kp, vp, causal=True))
    qs, ks, vs = qp.transpose(1, 2), kp.transpose(1, 2).repeat_interleave(H // HK, 1), vp.transpose(1, 2).repeat_interleave(H // HK, 1)
    from torch.nn.attention import sdpa_kernel, SDPBackend
    sd = {}
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel(be):
                sd[be.name] = t(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        except Exception as e: sd[be.name] = float("nan")
    rows.append(f"mixed {total} tokens B{B} max{S}: varlen default {dv:.3f} ms ({f/dv/1e9:.0f} TF) best {bv:.3f} {bc} | padded dense {padded:.3f} | sdpa padded {sd} (pad fraction {1 - total/(B*S):.2f})")
    print(rows[-1], flush=True)
# -- skewed --
lens = [16384] + [256] * 63
q = torch.randn(sum(lens), H, D, device=dev, dtype=dt); k = torch.randn(sum(lens), HK, D, device=dev, dtype=dt); v = torch.randn_like(k)
(bv, bc), (dv, _) = best(lambda c: vl(q, k, v, cu(lens), cu(lens), 16384, 16384, True, c))
(ba, ac), (da, _) = best(lambda c: vl(q[:16384], k[:16384], v[:16384], cu([16384]), cu([16384]), 16384, 16384, True, c))
lens2 = [256] * 63 + [16384]
(bv2, _), (dv2, _) = best(lambda c: vl(q, k, v, cu(lens2), cu(lens2), 16384, 16384, True, c))
rows.append(f"skewed: long first default {dv:.3f} best {bv:.3f} | long last default {dv2:.3f} best {bv2:.3f} | long alone default {da:.3f} best {ba:.3f} -> ratio {bv/ba:.3f} / {bv2/ba:.3f}")
print(rows[-1], flush=True)
# -- chunked prefill, paged --
for page, B, chunk, prefix in ((16, 8, 2048, 16384), (128, 32, 512, 4096)):
    lk = [prefix + chunk] * B; lq = [chunk] * B
    mb = (prefix + chunk + page - 1) // page
    nb = B * mb + 7
    bt = torch.randperm(nb, device=dev)[: B * mb].reshape(B, mb).to(torch.int32)
    kc = torch.randn(nb, page, HK, D, device=dev, dtype=dt); vc = torch.randn_like(kc)
    q = torch.randn(sum(lq), H, D, device=dev, dtype=dt)
    f = flops(lq, lk, True)
    (bv, bc), (dv, _) = best(lambda c: vl(q, kc, vc, cu(lq), cu(lk), chunk, prefix + chunk, True, c, bt))
    kd = torch.randn(sum(lk), HK, D, device=dev, dtype=dt); vd = torch.randn_like(kd)
    (pv, pc), (pdv, _) = best(lambda c: vl(q, kd, vd, cu(lq), cu(lk), chunk, prefix + chunk, True, c))
    rows.append(f"chunked page{page} B{B} chunk{chunk} prefix{prefix}: paged default {dv:.3f} ({f/dv/1e9:.0f} TF) best {bv:.3f} ({f/bv/1e9:.0f} TF) {bc} | packed k best {pv:.3f} ({f/pv/1e9:.0f} TF)")
    print(rows[-1], flush=True)
print("\n".join(rows))
