"""GPU suite of flash_attn_varlen_func (marker `gpu`: `pytest -m gpu tests/test_varlen_gpu.py` on a CUDA machine).

bf16 (the interpreter's tl.dot is wrong for bf16, so only here) and fp16 at prefill sizes: Hq 32 / Hkv 8, D 128 (and
64, 80, 256), mixed lengths with empty and one-token sequences, packed and paged K/V (blocks of 16 and 128, shuffled
tables), chunked prefill against a longer prefix; a CUDA graph replayed with new cu_seqlens and block tables (same
totals and max_seqlen) bit for bit equal to eager calls; torch.compile(fullgraph=True); packed offsets past 2^31
elements; the deferred value check (no sync) on the GPU. Checked against the float64 reference
(flashcore/reference.py: assert_close_varlen).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import flashcore
from flashcore.reference import assert_close_varlen

pytestmark = pytest.mark.gpu

DEV = "cuda"
HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128


def cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEV)


def packed(lengths_q, lengths_k, dtype=torch.bfloat16, head_dim=HEAD_DIM, heads_kv=HEADS_KV):
    q = torch.randn(sum(lengths_q), HEADS_Q, head_dim, device=DEV, dtype=dtype)
    k, v = torch.randn(2, sum(lengths_k), heads_kv, head_dim, device=DEV, dtype=dtype).unbind(0)
    return q, k, v


def paged(lengths_k, block_size, dtype=torch.bfloat16, spare=2):
    """(k_cache, v_cache, block_table): a shuffled paged cache holding the sequences' keys, `spare` extra blocks
    per row whose table entries point at garbage (unread), NaN in every slot no sequence owns."""
    batch = len(lengths_k)
    width = max(-(-max(lengths_k) // block_size), 1) + spare
    num_blocks = batch * width + 3
    table = torch.randperm(num_blocks, device=DEV)[: batch * width].reshape(batch, width).to(torch.int32)
    k_cache, v_cache = torch.full((2, num_blocks, block_size, HEADS_KV, HEAD_DIM), float("nan"), device=DEV,
                                  dtype=dtype).unbind(0)
    for b, n in enumerate(lengths_k):
        for position in range(0, n, block_size):
            rows = min(block_size, n - position)
            block = table[b, position // block_size]
            k_cache[block, :rows] = torch.randn(rows, HEADS_KV, HEAD_DIM, device=DEV, dtype=dtype)
            v_cache[block, :rows] = torch.randn(rows, HEADS_KV, HEAD_DIM, device=DEV, dtype=dtype)
    if spare:
        table[:, -spare:] = 10**6                      # past every sequence's keys: never read
    return k_cache, v_cache, table


MIXED_Q = [0, 1, 777, 2048, 130, 0, 1500]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mixed_lengths_packed(dtype, causal):
    lengths_k = [n + extra for n, extra in zip(MIXED_Q, [5, 0, 0, 100, 3000, 7, 1])]     # chunked-prefill shapes
    q, k, v = packed(MIXED_Q, lengths_k, dtype)
    out, lse, _ = flashcore.flash_attn_varlen_func(q, k, v, cu(MIXED_Q), cu(lengths_k), max(MIXED_Q),
                                                   max(lengths_k), causal=causal, return_attn_probs=True)
    assert_close_varlen(out, q, k, v, cu(MIXED_Q), cu(lengths_k), lse=lse, causal=causal)


@pytest.mark.parametrize("block_size", [16, 128])
def test_chunked_prefill_on_a_paged_cache(block_size):
    """New chunks of 512 and 100 tokens against prefixes of 4k and 1k, a sequence decoding one token, an empty
    one: GQA 4, causal, bf16."""
    lengths_q = [512, 100, 1, 0]
    lengths_k = [4096 + 512, 1000 + 100, 3000, 17]
    k_cache, v_cache, table = paged(lengths_k, block_size)
    q = torch.randn(sum(lengths_q), HEADS_Q, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
    out = flashcore.flash_attn_varlen_func(q, k_cache, v_cache, cu(lengths_q), cu(lengths_k), max(lengths_q),
                                           max(lengths_k), causal=True, block_table=table)
    assert_close_varlen(out, q, k_cache, v_cache, cu(lengths_q), cu(lengths_k), block_table=table, causal=True)


@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_head_dims_window_softcap(head_dim):
    lengths = [300, 1, 1024]
    q, k, v = packed(lengths, lengths, head_dim=head_dim, heads_kv=4)
    kw = dict(causal=True, window_size=(200, 0), softcap=30.0)
    out = flashcore.flash_attn_varlen_func(q, k, v, cu(lengths), cu(lengths), max(lengths), max(lengths), **kw)
    assert_close_varlen(out, q, k, v, cu(lengths), cu(lengths), **kw)


def test_uniform_lengths_match_the_dense_kernel():
    """Equal lengths: the varlen call gives what flash_attn_func gives on the same data (both within the
    reference's tolerance; equal to within one rounding of the output)."""
    batch, seqlen = 4, 1000
    q, k, v = packed([seqlen] * batch, [seqlen] * batch)
    out = flashcore.flash_attn_varlen_func(q, k, v, cu([seqlen] * batch), cu([seqlen] * batch), seqlen, seqlen,
                                           causal=True)
    dense = flashcore.flash_attn_func(q.view(batch, seqlen, HEADS_Q, HEAD_DIM),
                                      k.view(batch, seqlen, HEADS_KV, HEAD_DIM),
                                      v.view(batch, seqlen, HEADS_KV, HEAD_DIM), causal=True)
    torch.testing.assert_close(out.view_as(dense), dense, atol=2e-2, rtol=0)


def test_cuda_graph_replays_with_new_lengths_and_block_tables():
    """One captured call (fixed total_q, batch and max_seqlen) replayed as cu_seqlens and the block table change in
    place: each replay matches the reference and an eager call, bit for bit."""
    lengths_q, lengths_k = [100, 28, 0, 128], [900, 28, 50, 1128]
    k_cache, v_cache, table = paged([1200] * 4, 16, spare=0)
    q = torch.randn(sum(lengths_q), HEADS_Q, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)
    max_q, max_k = 256, 1200

    def call():
        return flashcore.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, causal=True,
                                                block_table=table, return_attn_probs=True)[:2]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = call()
    for lengths_q, lengths_k in (([100, 28, 0, 128], [900, 28, 50, 1128]), ([1, 255, 0, 0], [1, 1200, 0, 3]),
                                 ([64, 64, 64, 64], [64, 1000, 128, 1200])):
        cu_q.copy_(cu(lengths_q))
        cu_k.copy_(cu(lengths_k))
        table.copy_(table[torch.randperm(4, device=DEV)])
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        out, lse = static_out.clone(), static_lse.clone()
        assert_close_varlen(out, q, k_cache, v_cache, cu_q, cu_k, lse=lse, block_table=table, causal=True)
        eager_out, eager_lse = call()
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse), "replay and eager call differ"


def test_torch_compile_fullgraph():
    import torch._dynamo
    torch._dynamo.reset()
    lengths = [513, 1, 2000]
    q, k, v = packed(lengths, lengths)
    cu_seqlens = cu(lengths)

    def layer(x, k, v, cu_seqlens):
        out = flashcore.flash_attn_varlen_func(x * 0.5, k, v, cu_seqlens, cu_seqlens, 2048, 2048, causal=True)
        return out.float().sum(dim=-1), out

    compiled = torch.compile(layer, fullgraph=True)
    got_sum, got = compiled(q, k, v, cu_seqlens)
    want_sum, want = layer(q, k, v, cu_seqlens)
    assert torch.equal(got, want), "compiled and eager outputs differ"
    torch.testing.assert_close(got_sum, want_sum)
    assert_close_varlen(got, q * 0.5, k, v, cu_seqlens, cu_seqlens, causal=True)


def test_packed_offsets_past_2_to_the_31_elements():
    """A first sequence of 2^19 query rows (x Hq 32 x D 128 = 2^31 elements) against one key, then a short one:
    the second sequence's rows live past 2^31 elements of q and out (int64 offsets)."""
    first = 2**19
    lengths_q, lengths_k = [first, 77], [1, 300]
    q, k, v = packed(lengths_q, lengths_k, dtype=torch.float16)
    out = flashcore.flash_attn_varlen_func(q, k, v, cu(lengths_q), cu(lengths_k), first, 300)
    tail = slice(first, first + 77)
    assert_close_varlen(out[tail], q[tail], k[1:], v[1:], cu([77]), cu([300]))
    assert torch.equal(out[:first].float(), v[:1].repeat_interleave(HEADS_Q // HEADS_KV, 1).float().expand(
        first, HEADS_Q, HEAD_DIM)), "one key: every row of the first sequence is that key's value"


def test_deferred_check_on_the_gpu_raises_at_the_next_call():
    """No sync: a sequence longer than max_seqlen_q gets NaN, the others are right, the next call raises."""
    lengths = [40, 300, 20]
    q, k, v = packed(lengths, lengths)
    out = flashcore.flash_attn_varlen_func(q, k, v, cu(lengths), cu(lengths), 256, 300, causal=True)
    torch.cuda.synchronize()
    assert torch.isnan(out[40:340].float()).all()
    assert_close_varlen(out[:40], q[:40], k[:40], v[:40], cu([40]), cu([40]), causal=True)
    assert_close_varlen(out[340:], q[340:], k[340:], v[340:], cu([20]), cu([20]), causal=True)
    with pytest.raises(ValueError, match=r"sequence 1 has 300 query tokens(.|\n)*max_seqlen_q = 256"
                                         r"(.|\n)*flash_attn_varlen_func"):
        flashcore.flash_attn_varlen_func(q, k, v, cu(lengths), cu(lengths), 300, 300, causal=True)
