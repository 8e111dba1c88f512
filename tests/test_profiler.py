"""flashcore.profile(): every call recorded with its op, kernel, config and the rule that chose it; FLOPs and bytes
against hand-computed values for a prefill, a varlen batch, a decode step and a backward; nothing recorded, and
the ops unchanged, outside a profile."""
from __future__ import annotations

import json

import pytest
import torch

import flashcore
from flashcore import dispatch, profiler
from flashcore.ops.attn_fwd import OP as FWD
from flashcore.ops.attn_fwd.host import call_of, default_config, make_spec
from flashcore.tuning_db import Record, TuningDB

HQ, HKV, D = 4, 2, 16
FP32 = 4                        # bytes per element: the interpreter runs fp32 (its bf16 dot is not exact)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float32)


@pytest.fixture
def no_tuning(monkeypatch):
    """Heuristic defaults only, so that the rule each record names is known."""
    monkeypatch.setenv("FLASHCORE_TUNING", "off")
    dispatch.clear()
    yield
    dispatch.clear()


def test_a_causal_prefill_counts_the_pairs_each_row_attends(cpu_only, no_tuning):
    q, k, v = rand(2, 3, HQ, D), rand(2, 5, HKV, D), rand(2, 5, HKV, D)
    with flashcore.profile() as p:
        out = flashcore.flash_attn_func(q, k, v, causal=True)
    (r,) = p.records
    # bottom-right causal, Sq 3 against Sk 5: the rows sit at positions 2, 3, 4 and see 3 + 4 + 5 keys
    assert r.flops == 4 * HQ * D * 2 * (3 + 4 + 5)
    assert r.bytes == FP32 * (2 * 3 * HQ * D * 2 + 2 * 5 * HKV * D * 2)        # q and out; k and v
    assert r.op == "attn_fwd" and "2x3x5 heads 4/2 d16 fp32 causal" == r.shape
    assert "causal" in r.kernel.split() and r.ms is not None and r.ms > 0
    spec = make_spec(q, k, v, causal=True, window=False, softcap=False)
    assert r.spec == spec.key()
    assert r.config == default_config(spec) and r.rule == "heuristic default (FLASHCORE_TUNING=off)"
    assert r.tflops == pytest.approx(r.flops / r.ms * 1e-9)
    torch.testing.assert_close(out, flashcore.flash_attn_func(q, k, v, causal=True))    # the same result


def test_a_varlen_batch_counts_its_real_tokens_only_paged_or_packed(cpu_only, no_tuning):
    seqlens_q, seqlens_k = [3, 0, 1], [5, 0, 4]
    cu_q = torch.tensor([0, 3, 3, 4], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 5, 9], dtype=torch.int32)
    q, k, v = rand(sum(seqlens_q), HQ, D), rand(sum(seqlens_k), HKV, D), rand(sum(seqlens_k), HKV, D)
    # the same keys in a pool of 16 blocks of 4 tokens, most of them not this batch's (not counted)
    pool_k, pool_v = rand(16, 4, HKV, D), rand(16, 4, HKV, D)
    table = torch.tensor([[7, 2], [0, 0], [11, 0]], dtype=torch.int32)
    with flashcore.profile() as p:
        flashcore.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 5, causal=True)
        flashcore.flash_attn_varlen_func(q, pool_k, pool_v, cu_q, cu_k, 3, 5, causal=True, block_table=table)
    # sequence 0: rows at positions 2, 3, 4 (3 + 4 + 5 keys); sequence 1: empty; sequence 2: one row at position 3
    pairs = (3 + 4 + 5) + 0 + 4
    for r in p.records:
        assert r.op == "attn_varlen" and r.flops == 4 * HQ * D * pairs
        assert r.bytes == FP32 * (4 * HQ * D * 2 + 9 * HKV * D * 2)            # q and out; 9 keys' K and V
    assert "paged 4" in p.records[1].shape and "paged 4" not in p.records[0].shape


def test_a_decode_step_counts_the_keys_after_its_append_and_the_append(cpu_only, no_tuning):
    cache_k, cache_v = rand(3, 8, HKV, D), rand(3, 8, HKV, D)
    seqlens = torch.tensor([2, 5, 0], dtype=torch.int32)
    q, k_new, v_new = rand(3, 1, HQ, D), rand(3, 1, HKV, D), rand(3, 1, HKV, D)
    with flashcore.profile() as p:
        for _ in range(2):      # the second call takes the kept plan's path outside a profile: recorded as well
            flashcore.flash_attn_with_kvcache(q, cache_k, cache_v, k_new, v_new, cache_seqlens=seqlens)
        seqlens += 1            # (after the calls: the records read the lengths each call had)
    assert len(p.records) == 2
    for r in p.records:
        # keys after the append: 3, 6, 1; one query row each
        assert r.op == "attn_decode" and r.flops == 4 * HQ * D * (3 + 6 + 1)
        token = HKV * D * FP32                                               # one token's K (or V)
        assert r.bytes == 2 * 3 * HQ * D * FP32 + 2 * (2 * 3 * token) + 10 * 2 * token   # q, out; append; keys
        assert r.config and r.rule == "heuristic default (FLASHCORE_TUNING=off)"


def test_a_training_step_records_the_forward_and_its_backward(cpu_only, no_tuning):
    q, k, v = (rand(1, 4, 2, D).requires_grad_() for _ in range(3))
    with flashcore.profile() as p:
        flashcore.flash_attn_func(q, k, v).sum().backward()
    forward, backward = p.records
    assert (forward.op, backward.op) == ("attn_fwd", "attn_bwd")
    tensor, lse = 4 * 2 * D * FP32, 4 * 2 * FP32
    assert forward.flops == 4 * 2 * D * 16 and forward.bytes == 4 * tensor + lse           # q, k, v, out; lse
    assert backward.flops == 2.5 * forward.flops
    assert backward.bytes == 5 * tensor + lse + 3 * tensor        # dout, q, k, v, out, lse; dq, dk, dv
    assert all(t.grad is not None for t in (q, k, v))


def test_the_rule_names_the_record_that_chose_the_config(cpu_only, tmp_path, monkeypatch):
    q, k, v = rand(1, 40, HQ, D), rand(1, 40, HKV, D), rand(1, 40, HKV, D)
    spec = make_spec(q, k, v, causal=False, window=False, softcap=False)
    bucket = FWD.bucket_of(call_of(q, k, False, False, False))
    tuned = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    assert tuned != default_config(spec)
    db = tmp_path / "user.db"
    with TuningDB(db) as handle:
        handle.put_many([Record(gpu="interpreter", template="attn_fwd", template_hash=FWD.version_of(spec),
                                spec=spec.key(), bucket=bucket, config=tuned, latency_ms=1.0, default_ms=1.5,
                                default_config=default_config(spec))])
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(db))
    monkeypatch.delenv("FLASHCORE_TUNING", raising=False)
    dispatch.clear()
    try:
        with flashcore.profile() as p:
            flashcore.flash_attn_func(q, k, v)
    finally:
        dispatch.clear()
    (r,) = p.records
    assert r.config == tuned and r.rule == f"user DB {db}"


def test_nothing_is_recorded_outside_a_profile_and_a_failed_block_closes_it(cpu_only, no_tuning):
    q = rand(1, 2, HQ, D)
    with flashcore.profile() as p:
        pass
    flashcore.flash_attn_func(q, q[..., :HKV, :], q[..., :HKV, :])
    assert p.records == [] and profiler.ACTIVE is None
    with pytest.raises(ValueError, match="head_dim"):
        with flashcore.profile() as p:
            flashcore.flash_attn_func(q[..., :7], q[..., :7], q[..., :7])       # the API's own error, unchanged
    assert profiler.ACTIVE is None and p.records == []
    with flashcore.profile():
        with pytest.raises(RuntimeError, match="already open"):
            flashcore.profile().__enter__()


def test_the_summary_and_the_json_export_carry_every_call_and_the_totals(cpu_only, no_tuning):
    q, k, v = rand(1, 8, HQ, D), rand(1, 8, HKV, D), rand(1, 8, HKV, D)
    with flashcore.profile() as p:
        for _ in range(3):
            flashcore.flash_attn_func(q, k, v, causal=True)
    text = p.summary(limit=2)
    assert text.count("attn_fwd") == 3 and "... 1 more calls" in text and "TFLOP/s" in text
    exported = json.loads(json.dumps(p.to_json()))
    assert len(exported["calls"]) == 3 and exported["totals"]["attn_fwd"]["calls"] == 3
    assert exported["totals"]["attn_fwd"]["flops"] == sum(r.flops for r in p.records)
    assert exported["calls"][0]["config"] == p.records[0].config and exported["calls"][0]["tflops"] > 0


def test_a_call_with_nothing_to_compute_is_recorded_as_such(cpu_only, no_tuning):
    q, k = rand(1, 0, HQ, D), rand(1, 5, HKV, D)
    with flashcore.profile() as p:
        flashcore.flash_attn_func(q, k, k)
    (r,) = p.records
    assert (r.kernel, r.config, r.rule, r.flops) == ("-", {}, "nothing to launch (empty input)", 0)


@pytest.mark.gpu
def test_on_the_gpu_calls_are_timed_by_events_compiled_calls_too_and_captured_ones_are_not():
    q, k, v = (torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: flashcore.flash_attn_func(q, k, v, causal=True), fullgraph=True)
    compiled(q, k, v)
    cache = torch.zeros(4, 512, 8, 128, device="cuda", dtype=torch.bfloat16)
    seqlens = torch.full((4,), 300, dtype=torch.int32, device="cuda")
    step = torch.randn(4, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    flashcore.flash_attn_with_kvcache(step, cache, cache, cache_seqlens=seqlens)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = flashcore.flash_attn_with_kvcache(step, cache, cache, cache_seqlens=seqlens)
    with flashcore.profile() as p:
        eager = flashcore.flash_attn_func(q, k, v, causal=True)
        compiled(q, k, v)
        flashcore.flash_attn_with_kvcache(step, cache, cache, cache_seqlens=seqlens)
        graph.replay()                                   # runs no host code: not seen
        with torch.cuda.graph(torch.cuda.CUDAGraph()):   # a call while capturing: not recorded
            flashcore.flash_attn_with_kvcache(step, cache, cache, cache_seqlens=seqlens)
    assert [r.op for r in p.records] == ["attn_fwd", "attn_fwd", "attn_decode"]
    prefill = 4 * 8 * 128 * 2 * (1024 * 1025 // 2)
    assert all(r.flops == prefill for r in p.records[:2]) and p.records[2].flops == 4 * 8 * 128 * 4 * 300
    for r in p.records:
        # a launch of this size takes microseconds to a millisecond on any card FlashCore runs on: a time far off
        # means the events bracket the wrong work
        assert 1e-3 < r.ms < 50, r
    torch.testing.assert_close(captured, flashcore.flash_attn_with_kvcache(step, cache, cache, cache_seqlens=seqlens))
    torch.testing.assert_close(eager, compiled(q, k, v))
    print(p.summary())
