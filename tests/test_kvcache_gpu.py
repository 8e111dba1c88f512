"""GPU suite of flash_attn_with_kvcache (marker `gpu`: `pytest -m gpu tests/test_kvcache_gpu.py` on a CUDA machine).

bf16 (the interpreter's tl.dot is wrong for bf16, so only here) at decode sizes: Hq 32 / Hkv 8, D 128, 4k caches,
contiguous and paged (block 16, the tuned 128 and 256, and 24, not a power of two); a CUDA graph of one decode
step replayed with new cache_seqlens values (and with an overflowing one: the kernels stay in bounds); and
torch.compile(fullgraph=True) of a function that appends to the cache. Checked against the float64 reference
(flashcore/reference.py: assert_close_kvcache), NaN in every cache slot a call must not read, caches bit-identical
outside the appended slots; graph replays and compiled calls match eager calls bit for bit.
"""
from __future__ import annotations

import sys
import threading

import pytest
import torch

import flashcore
from flashcore.reference import assert_close_kvcache, bits
from test_kvcache import assert_merged, assert_overflow_contained, call_and_check, make_caches_of, rope_tables

pytestmark = pytest.mark.gpu

DEV = "cuda"
BF16 = torch.bfloat16
BATCH, HEADS_Q, HEADS_KV, HEAD_DIM, CAPACITY = 4, 32, 8, 128, 4096
SEQLENS = [0, 1, 2047, 4095]          # with one token appended, the last sequence fills its cache
LAYOUT_IDS = {None: "contig", 16: "paged16", 24: "paged24", 128: "paged128", 256: "paged256"}


def decode_inputs(block_size, seqlens=SEQLENS, seqlen_q=1, new=1, dtype=BF16, capacity=CAPACITY, batch_idx=False,
                  leftpad=None):
    """(q, k_cache, v_cache, kwargs): a decode step of len(seqlens) sequences appending `new` tokens each; NaN
    in every cache slot outside leftpad[b] <= p < seqlens[b]."""
    batch = len(seqlens)
    k_cache, v_cache, table, batch_index = make_caches_of(batch, capacity, HEADS_KV, HEAD_DIM, dtype, DEV, seqlens,
                                                          leftpad, block_size=block_size, batch_idx=batch_idx)
    q = torch.randn(batch, seqlen_q, HEADS_Q, HEAD_DIM, device=DEV).to(dtype)
    k, v = torch.randn(2, batch, new, HEADS_KV, HEAD_DIM, device=DEV).to(dtype).unbind(0)
    return q, k_cache, v_cache, dict(k=k, v=v, block_table=table, cache_batch_idx=batch_index,
                                     cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=DEV))


# ---------------------------------------------------------------------------------------------------------------
# bf16 correctness

@pytest.mark.parametrize("block_size", [None, 16, 24, 128, 256], ids=LAYOUT_IDS.get)
def test_bf16_decode_gqa4_d128_cache4k(block_size):
    capacity = CAPACITY if block_size != 24 else 171 * 24          # whole blocks: 4104
    q, k_cache, v_cache, kw = decode_inputs(block_size, capacity=capacity)
    call_and_check(q, k_cache, v_cache, **kw)


@pytest.mark.parametrize("num_splits", [1, 7, 32, 128])
def test_bf16_num_splits(num_splits):
    q, k_cache, v_cache, kw = decode_inputs(16)
    call_and_check(q, k_cache, v_cache, num_splits=num_splits, **kw)


@pytest.mark.parametrize("block_size", [None, 16], ids=LAYOUT_IDS.get)
def test_bf16_speculative_rotary_window_softcap(block_size):
    """Sq 4 with 4 appended tokens (speculative decoding), GPT-NeoX rotary, causal window, softcap, ALiBi."""
    q, k_cache, v_cache, kw = decode_inputs(block_size, seqlens=[0, 3, 2047, 4092], seqlen_q=4, new=4)
    cos, sin = rope_tables(CAPACITY, HEAD_DIM, BF16, DEV)
    call_and_check(q, k_cache, v_cache, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False, causal=True,
                   window_size=(1000, -1), softcap=30.0, alibi_slopes=torch.rand(HEADS_Q, device=DEV) * 0.01, **kw)


@pytest.mark.parametrize("block_size", [None, 16], ids=LAYOUT_IDS.get)
def test_bf16_ragged_batch_64(block_size):
    """64 sequences of random lengths in 2k caches, a quarter of them left-padded, interleaved GPT-J rotary on
    half the head dim; the contiguous cache picks its rows through cache_batch_idx."""
    seqlens = torch.randint(0, 2047, (64,)).tolist()
    leftpad = [s // 3 if b % 4 == 0 else 0 for b, s in enumerate(seqlens)]
    q, k_cache, v_cache, kw = decode_inputs(block_size, seqlens=seqlens, capacity=2048,
                                            batch_idx=block_size is None, leftpad=leftpad)
    cos, sin = rope_tables(2048, HEAD_DIM // 2, BF16, DEV)
    call_and_check(q, k_cache, v_cache, cache_leftpad=torch.tensor(leftpad, dtype=torch.int32, device=DEV),
                   rotary_cos=cos, rotary_sin=sin, causal=True, **kw)


@pytest.mark.parametrize("block_size", [None, 16], ids=LAYOUT_IDS.get)
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_bf16_split_merges(block_size, seqlen_q, merge_inline):
    """Both merges of 16 splits (batch 16, empty and full sequences, 4 or 16 query rows per kv head) match the
    reference, and a second call of the kept plan, on the tickets the first left, gives the same bits."""
    seqlens = [0, 1, 4095, 17] + torch.randint(0, 4095, (12,)).tolist()
    q, k_cache, v_cache, kw = decode_inputs(block_size, seqlens=seqlens, seqlen_q=seqlen_q, new=0)
    kw = {name: value for name, value in kw.items() if name not in ("k", "v")}
    out, lse = call_and_check(q, k_cache, v_cache, num_splits=16, **kw)
    again, lse_again = flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=16, return_softmax_lse=True,
                                                         **kw)
    assert torch.equal(out, again) and torch.equal(lse, lse_again)
    assert_merged(merge_inline)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_fp16_fp32_paged(dtype):
    q, k_cache, v_cache, kw = decode_inputs(16, dtype=dtype)
    call_and_check(q, k_cache, v_cache, **kw)


@pytest.mark.parametrize("block_size", [None, 16], ids=LAYOUT_IDS.get)
def test_two_streams_decode_one_signature_at_once(block_size, merge_inline):
    """Eager calls of one signature on two streams, issued back to back with no sync between them: what the kept
    plan of the signature holds is read-only here (split partials and merge tickets go to a scratch kept per stream
    and thread), so every output of both streams matches the reference."""
    q, k_cache, v_cache, kw = decode_inputs(block_size, seqlens=[5, 300, 2047, 4000])
    kw = {name: value for name, value in kw.items() if name not in ("k", "v")}
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    qs = [[torch.randn_like(q) for _ in range(8)] for _ in streams]
    outs = [[], []]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for i in range(8):
        for s, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                outs[s].append(flashcore.flash_attn_with_kvcache(qs[s][i], k_cache, v_cache, num_splits=8, **kw))
    torch.cuda.synchronize()
    assert_merged(merge_inline)
    for s in range(2):
        for q_i, out in zip(qs[s], outs[s]):
            assert_close_kvcache(out, q_i, k_cache, v_cache, k_cache, v_cache, **kw)


@pytest.mark.parametrize("block_size", [None, 16], ids=LAYOUT_IDS.get)
def test_two_threads_decode_on_one_stream(block_size, merge_inline):
    """Two threads issue split calls of one signature on the same (default) stream, back to back with no sync: each
    thread's calls use its own split scratch, so no call's merge reads another call's partials or tickets. Python
    switches threads every microsecond here (at the default 5 ms each thread's 16 calls would run whole, one thread
    after the other), so the two threads' launches interleave on the stream."""
    q, k_cache, v_cache, kw = decode_inputs(block_size, seqlens=[5, 300, 2047, 4000])
    kw = {name: value for name, value in kw.items() if name not in ("k", "v")}
    qs = [[torch.randn_like(q) for _ in range(16)] for _ in range(2)]
    outs, errors = [[], []], []

    def worker(t):
        try:
            for q_i in qs[t]:
                outs[t].append(flashcore.flash_attn_with_kvcache(q_i, k_cache, v_cache, num_splits=16, **kw))
        except Exception as e:       # (an exception in a thread would otherwise be lost)
            errors.append(e)
    flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=16, **kw)     # the kept plan
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    torch.cuda.synchronize()
    assert not errors, errors[0]
    assert_merged(merge_inline)
    for t in range(2):
        for q_i, out in zip(qs[t], outs[t]):
            assert_close_kvcache(out, q_i, k_cache, v_cache, k_cache, v_cache, **kw)


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs

def capture_step(q, k_cache, v_cache, k, v, cache_seqlens, **kwargs):
    """A CUDA graph of one decode step over these (static) tensors, and its (out, lse) outputs."""
    def step():
        return flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                                 return_softmax_lse=True, **kwargs)
    k_keep, v_keep = k_cache.clone(), v_cache.clone()
    side = torch.cuda.Stream()           # warm up (builds the plan, value checks included) outside capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    torch.cuda.synchronize()
    k_cache.copy_(k_keep)                # the warm-up appended; capture itself runs nothing
    v_cache.copy_(v_keep)
    return graph, static_out


@pytest.mark.parametrize("block_size", [None, 16], ids=LAYOUT_IDS.get)
def test_cuda_graph_decode_step_replays_with_new_seqlens(block_size):
    """One captured decode step (q and the new k / v appended, GQA 4, causal) replayed as cache_seqlens changes in
    place (growing one token a step, then jumping: a sequence restarting at 0, another shrinking): each replay
    matches the reference and an eager call on a copy of the same caches, bit for bit (out, lse, caches)."""
    q, k_cache, v_cache, kw = decode_inputs(block_size, seqlens=[5, 300, 2047, 4000])
    k, v, cache_seqlens, table = kw["k"], kw["v"], kw["cache_seqlens"], kw["block_table"]
    graph, (static_out, static_lse) = capture_step(q, k_cache, v_cache, k, v, cache_seqlens, block_table=table,
                                                   causal=True)
    for seqlens in ([5, 300, 2047, 4000], [6, 301, 2048, 4001], [7, 302, 2049, 4002], [0, 302, 1000, 4003]):
        cache_seqlens.copy_(torch.tensor(seqlens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        k_before, v_before = k_cache.clone(), v_cache.clone()
        graph.replay()
        torch.cuda.synchronize()
        out, lse = static_out.clone(), static_lse.clone()
        assert_close_kvcache(out, q, k_before, v_before, k_cache, v_cache, lse=lse, k=k, v=v,
                             cache_seqlens=cache_seqlens, block_table=table, causal=True)
        k_eager, v_eager = k_before.clone(), v_before.clone()
        eager_out, eager_lse = flashcore.flash_attn_with_kvcache(q, k_eager, v_eager, k, v,
                                                                 cache_seqlens=cache_seqlens.clone(),
                                                                 block_table=table, causal=True,
                                                                 return_softmax_lse=True)
        torch.cuda.synchronize()
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse), "replay and eager call differ"
        assert torch.equal(bits(k_cache), bits(k_eager)) and torch.equal(bits(v_cache), bits(v_eager))


def test_cuda_graph_owns_its_split_partials(merge_inline):
    """A captured split decode step keeps partials and tickets of its own (from the graph's pool), not the eager
    scratch of the stream it was captured on: with eager calls on that stream filling its scratch, one of them
    running alongside the replay, the replay (twice: on the tickets the first left) still matches the reference."""
    q, k_cache, v_cache, kw = decode_inputs(16, seqlens=[5, 300, 2047, 4000])
    k, v, cache_seqlens, table = kw["k"], kw["v"], kw["cache_seqlens"], kw["block_table"]
    graph, (static_out, static_lse) = capture_step(q, k_cache, v_cache, k, v, cache_seqlens, block_table=table,
                                                   num_splits=16)
    big_q, big_k, big_v, big_kw = decode_inputs(16, seqlens=[4000] * 16)
    big_kw = {name: value for name, value in big_kw.items() if name not in ("k", "v")}
    capture_stream = torch.cuda.graph.default_capture_stream       # where capture_step captured
    assert capture_stream is not None
    capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture_stream):
        for _ in range(2):    # the first builds the plan, the second makes the stream's scratch (16 x 8 x 16 splits)
            flashcore.flash_attn_with_kvcache(big_q, big_k, big_v, num_splits=16, **big_kw)
    torch.cuda.synchronize()
    for _ in range(2):
        k_before, v_before = k_cache.clone(), v_cache.clone()
        graph.replay()
        with torch.cuda.stream(capture_stream):     # runs alongside the replay, on the capture stream's scratch
            flashcore.flash_attn_with_kvcache(big_q, big_k, big_v, num_splits=16, **big_kw)
        torch.cuda.synchronize()
        assert_close_kvcache(static_out, q, k_before, v_before, k_cache, v_cache, lse=static_lse, k=k, v=v,
                             cache_seqlens=cache_seqlens, block_table=table)
        cache_seqlens += 1                          # (the replay appended one token)
    assert_merged(merge_inline)


def test_cuda_graph_replays_after_dispatch_forgets_its_plan():
    """dispatch.clear() drops the kept plans, but a graph captured from one still replays on the plan's error rows
    (the append writes them, the decode reads them): small int32 tensors allocated after the clear, where freed rows
    would be handed out again, keep their values through two replays, and the replays match the reference."""
    from flashcore import dispatch
    q, k_cache, v_cache, kw = decode_inputs(16, seqlens=[5, 300, 2047, 4000])
    k, v, cache_seqlens, table = kw["k"], kw["v"], kw["cache_seqlens"], kw["block_table"]
    k_keep, v_keep = k_cache.clone(), v_cache.clone()
    step = dict(cache_seqlens=cache_seqlens, block_table=table, return_softmax_lse=True)
    flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **step)    # the plan: rows on this stream
    torch.cuda.synchronize()
    k_cache.copy_(k_keep)
    v_cache.copy_(v_keep)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **step)
    dispatch.clear()
    taken = [torch.full((len(cache_seqlens), 4), 7, dtype=torch.int32, device=DEV) for _ in range(256)]
    for _ in range(2):
        k_before, v_before = k_cache.clone(), v_cache.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert_close_kvcache(static_out, q, k_before, v_before, k_cache, v_cache, lse=static_lse, k=k, v=v,
                             cache_seqlens=cache_seqlens, block_table=table)
        assert all(bool((t == 7).all()) for t in taken), "a replay wrote into memory its plan gave back"
        cache_seqlens += 1


def test_cuda_graph_captured_before_any_eager_call_keeps_its_plan_to_itself():
    """A signature whose first call is captured builds its plan in the graph's memory: the plan is not kept for
    eager calls (they would run on the graph's pool after the graph is gone); the replay and a later eager call,
    after the graph is deleted, both match the reference."""
    from flashcore import dispatch
    from flashcore.ops.attn_decode import host
    q, k_cache, v_cache, kw = decode_inputs(None, seqlens=[5, 300, 2047, 4000])
    k, v, cache_seqlens = kw["k"], kw["v"], kw["cache_seqlens"]
    k_keep, v_keep = k_cache.clone(), v_cache.clone()
    flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens)   # compiles
    k_cache.copy_(k_keep)
    v_cache.copy_(v_keep)
    dispatch.clear()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens)
    assert not host._plans, "a plan built under capture was kept"
    graph.replay()
    torch.cuda.synchronize()
    assert_close_kvcache(static_out, q, k_keep, v_keep, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens)
    del graph
    torch.cuda.synchronize()
    k_cache.copy_(k_keep)
    v_cache.copy_(v_keep)
    for _ in range(2):          # the first builds the eager plan, the second runs it
        out = flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens)
        assert_close_kvcache(out, q, k_keep, v_keep, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens)
        k_cache.copy_(k_keep)
        v_cache.copy_(v_keep)


@pytest.mark.parametrize("block_size", [None, 16], ids=LAYOUT_IDS.get)
def test_cuda_graph_replay_with_an_overflowing_sequence_stays_in_bounds(block_size):
    """A replay where sequence 1 overflows its cache (4096 + 1 tokens) must neither fault nor touch any slot outside
    sequence 1's own cache (in a contiguous cache, row 2 starts right after row 1's last slot; in a paged one,
    block-table row 2 right after row 1's last entry), and the other sequences' outputs and appends stay right.
    The captured kernels check values too: sequence 1 reads NaN and the next eager call raises."""
    q, k_cache, v_cache, kw = decode_inputs(block_size, seqlens=[5, 300, 2047, 4000])
    k, v, cache_seqlens, table = kw["k"], kw["v"], kw["cache_seqlens"], kw["block_table"]
    graph, (static_out, _) = capture_step(q, k_cache, v_cache, k, v, cache_seqlens, block_table=table)
    cache_seqlens.copy_(torch.tensor([5, CAPACITY, 2047, 4000], dtype=torch.int32))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    graph.replay()
    torch.cuda.synchronize()

    assert_overflow_contained(static_out, q, k_before, v_before, k_cache, v_cache, 1, k, v, cache_seqlens,
                              block_table=table)
    assert torch.isnan(static_out[1].float()).all()
    with pytest.raises(ValueError, match=r"cache overflow: cache_seqlens\[1\]"):
        flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.parametrize("block_size", [None, 16], ids=LAYOUT_IDS.get)
def test_torch_compile_fullgraph_appending_to_the_cache(block_size):
    """A compiled decode layer (ops around the call, rotary, the cache mutated in place by the op) gives the eager
    layer's output and caches, bit for bit, over three steps with growing cache_seqlens."""
    import torch._dynamo
    torch._dynamo.reset()
    q, k_cache, v_cache, kw = decode_inputs(block_size, seqlens=[5, 300, 2047, 4000])
    cache_seqlens, table = kw["cache_seqlens"], kw["block_table"]
    cos, sin = rope_tables(CAPACITY, HEAD_DIM, BF16, DEV)

    def layer(x, k_cache, v_cache, k, v, cache_seqlens, block_table, cos, sin):
        out = flashcore.flash_attn_with_kvcache(x * 0.5, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                                cache_seqlens=cache_seqlens, block_table=block_table, causal=True)
        return out.float().sum(dim=-1), out

    compiled = torch.compile(layer, fullgraph=True)
    for _ in range(3):
        x = torch.randn_like(q)
        k, v = torch.randn_like(kw["k"]), torch.randn_like(kw["v"])
        k_before, v_before = k_cache.clone(), v_cache.clone()
        k_eager, v_eager = k_cache.clone(), v_cache.clone()
        got_sum, got = compiled(x, k_cache, v_cache, k, v, cache_seqlens, table, cos, sin)
        want_sum, want = layer(x, k_eager, v_eager, k, v, cache_seqlens, table, cos, sin)
        torch.cuda.synchronize()
        assert torch.equal(got, want), "compiled and eager outputs differ"
        torch.testing.assert_close(got_sum, want_sum)
        assert torch.equal(bits(k_cache), bits(k_eager)), "the compiled call appended differently (or not at all)"
        assert torch.equal(bits(v_cache), bits(v_eager))
        assert_close_kvcache(got, x * 0.5, k_before, v_before, k_cache, v_cache, k=k, v=v, rotary_cos=cos,
                             rotary_sin=sin, cache_seqlens=cache_seqlens, block_table=table, causal=True)
        cache_seqlens += 1
