"""flashcore-bench's attn_decode suites on the CPU: the decode matrix and its options (--list, memory budget, case
selection), the work each case counts, the inputs every implementation reads (same keys in every layout), the
correctness check, and FlashCore through the suite's builders under the interpreter. One GPU smoke run of the
three suites (marker gpu)."""
from __future__ import annotations

import json

import pytest
import torch

from flashcore.ops.attn_decode import bench as decode_bench
from flashcore.ops.attn_decode.bench import DecodeCase, make_inputs, sequence_keys
from flashcore.reference import attention_ref, gather_kvcache
from flashcore.tools import bench

HOST, DECODE, GRAPH = decode_bench.SUITES
TOKEN_BYTES = 2 * 8 * 128 * 2          # K and V of one token at Hkv 8, D 128, bf16


def parse(argv):
    """The harness's parsed command line (every registered suite's options)."""
    return bench.build_parser(bench.discover()).parse_args(argv)


def decode_cases(argv=()):
    return [case.call for case in DECODE.cases(parse(list(argv)))]


# ---------------------------------------------------------------------------------------------- the matrix

def test_list_shows_the_three_decode_suites_without_gpu(capsys):
    assert bench.main(["--list", "--op", "attn_decode"]) == 0
    out = capsys.readouterr().out
    assert "attn_decode/decode: Decode" in out and "attn_decode/decode-graph:" in out
    assert "attn_decode/decode-host:" in out and "attn_fwd" not in out
    assert out.count("48 cases x 7 impls (flashcore, default, cudnn, flash, flex, flashinfer, fa4)") == 1
    assert out.count("48 cases x 4 impls (flashcore, default, cudnn, flash)") == 1     # decode-graph's peers
    assert "8 cases x 2 impls (flashcore, sdpa)" in out
    assert "left out B=64 cache=131072 contiguous: 64.0 GiB > --decode-mem-gib 40" in out
    assert "B=64 cache=1838..32715 paged 128" in out and "paged 16" in out


def test_matrix_is_batches_by_caches_per_layout_then_the_ragged_batch():
    cases = decode_cases()
    uniform = [c for c in cases if not c.seqlens]
    points = {(c.batch, c.cache_len, c.page_size) for c in uniform}
    expected = {(b, s, p) for b in (1, 4, 16, 64) for s in (1024, 8192, 32768, 131072) for p in (0, 16, 128)}
    assert points == expected - {(64, 131072, p) for p in (0, 16, 128)}     # 32 GiB of cache + 32 GiB dense copy
    assert len(uniform) == len(points) == 45
    ragged = [c for c in cases if c.seqlens]
    assert [c.page_size for c in ragged] == [0, 16, 128]
    assert all(c.batch == 64 and c.cache_len == max(c.seqlens) for c in ragged)
    assert {(c.heads_q, c.heads_kv, c.head_dim, c.dtype, c.seqlen_new) for c in cases} == {(32, 8, 128, "bf16", 0)}
    assert [c.page_size for c in cases[:16]] == [0] * 16 and cases[15].seqlens   # one layout after the other


def test_memory_budget_counts_the_dense_copy_only_when_a_dense_peer_runs():
    big = DecodeCase(64, 131072, 16)
    assert big.cache_bytes() == big.dense_bytes() == 64 * 131072 * TOKEN_BYTES == 32 * 2 ** 30
    assert big not in decode_cases(["--decode-mem-gib", "63"])
    assert big in decode_cases(["--decode-mem-gib", "64"])
    assert big in decode_cases(["--decode-peers", "flashinfer,fa4"])   # no dense copy: 32 GiB fit in 40
    assert big not in decode_cases(["--decode-peers", "flex"])
    # the graph suite's own peers (cuDNN, flash by default) decide its dense copy, not --decode-peers
    assert big not in [c.call for c in GRAPH.cases(parse(["--decode-peers", "none"]))]
    assert big in [c.call for c in GRAPH.cases(parse(["--decode-graph-peers", "none"]))]


def test_options_select_the_cases_and_impls():
    args = parse(["--decode-batches", "4", "--decode-caches", "8192,1000", "--decode-layouts", "paged16",
                  "--no-decode-ragged", "--decode-peers", "flashinfer", "--no-decode-default"])
    assert [c.call for c in DECODE.cases(args)] == [DecodeCase(4, 8192, 16), DecodeCase(4, 1000, 16)]
    assert DECODE.impls(args) == ["flashcore", "flashinfer"]
    assert DECODE.impls(parse(["--decode-peers", "none"])) == ["flashcore", "default"]
    quick = parse(["--decode-quick"])
    assert {(c.batch, c.cache_len, c.page_size, bool(c.seqlens)) for c in decode_cases(["--decode-quick"])} == {
        (1, 8192, 0, False), (16, 8192, 0, False), (64, 32715, 0, True),
        (1, 8192, 16, False), (16, 8192, 16, False), (64, 32715, 16, True)}
    assert GRAPH.cases(quick) == DECODE.cases(quick)
    assert GRAPH.impls(quick) == ["flashcore", "default", "cudnn", "flash"]     # the peers known to capture
    assert GRAPH.impls(parse(["--decode-graph-peers", "cudnn,flashinfer"])) == ["flashcore", "default", "cudnn",
                                                                               "flashinfer"]


@pytest.mark.parametrize("argv", [["--decode-layouts", "paged32"], ["--decode-peers", "xformers"],
                                  ["--decode-batches", "1,x"], ["--decode-caches", "0"]])
def test_bad_decode_options_are_usage_errors(argv):
    with pytest.raises(SystemExit):
        bench.main(["--list", "--op", "attn_decode", *argv])


def test_host_suite_cases():
    cases = [c.call for c in HOST.cases(None)]
    assert {(c.batch, c.cache_len, c.page_size, c.seqlen_new) for c in cases} == {
        (b, 8192, p, n) for b in (1, 16) for p in (0, 16) for n in (0, 1)}
    assert len(cases) == 8 and HOST.impls(None) == ["flashcore", "sdpa"]


def test_report_has_the_ratio_columns_and_says_how_flashcore_was_timed(kv_checks):
    case = decode_bench.case_of(DecodeCase(1, 8192, 16))
    timed = {"flashcore": 0.010, "default": 0.012, "cudnn": 0.020, "flash": 0.030, "flex": "RuntimeError: x",
             "flashinfer": 0.011, "fa4": "ModuleNotFoundError: No module named 'flash_attn'"}
    impls = {n: {"ms": t, "rate": case.work / t / 1e6} if isinstance(t, float) else {"error": t}
             for n, t in timed.items()}
    result = bench.add_ratios({"case": {}, "columns": case.columns, "label": case.label, "work": case.work,
                               "check": {"status": "ok"}, "impls": impls}, DECODE)
    assert result["best_peer"] == "flashinfer"            # the default config is a variant, never the best peer
    assert result["ratios"] == pytest.approx({"best": 1.1, "cudnn": 2.0, "flashinfer": 1.1, "default": 1.2})
    meta = {"device": "H100", "date": "2026-11-25", "torch": "2.11", "triton": "3.6", "cudnn": 91900,
            "flashcore": "0.1.0", "peers": {"FlashInfer": "0.7.2.post1"}, "command": "flashcore-bench",
            "warmup_ms": 10, "rep_ms": 40, "rounds": 3, "flush": "read"}
    md = bench.format_markdown([result], DECODE, list(timed), meta)
    header = next(line for line in md.splitlines() if line.startswith("| B |"))
    assert "| cache | layout |" in header and "FlashInfer ms/GB/s" in header and "FC/FlashInfer" in header
    assert "| 1 | 8k | paged 16 |" in md and "| 1.10 | FlashInfer |" in md and "| 1.20 |" in md
    assert "run their value check" in md and "256 MB read before each call" in md
    assert DECODE.flush == GRAPH.flush == "read"       # a decode step finds L2 clean, not dirty (bench_suite.py)
    kv_checks("0")
    assert "skip their value check" in DECODE.notes and "CUDA graph" in GRAPH.notes


# ---------------------------------------------------------------------------------------------- work

def test_ragged_lengths_are_the_same_every_run_and_in_range():
    lengths = decode_bench.ragged_lengths()
    assert lengths == decode_bench.ragged_lengths() and len(lengths) == 64
    assert 512 <= min(lengths) and max(lengths) <= 32768 and len(set(lengths)) > 60


def test_work_is_the_kv_bytes_each_sequence_attends():
    uniform = decode_bench.case_of(DecodeCase(4, 8192, 16))
    assert uniform.work == 4 * 8192 * TOKEN_BYTES
    ragged_call = next(c for c in decode_cases() if c.seqlens)
    ragged = decode_bench.case_of(ragged_call)
    assert ragged.work == sum(decode_bench.ragged_lengths()) * TOKEN_BYTES
    assert ragged.work < ragged_call.dense_bytes()             # the padded batch SDPA reads is more
    assert dict(ragged.columns)["cache"] == f"{min(ragged_call.seqlens)}..{max(ragged_call.seqlens)}"
    appended = DecodeCase(2, 100, seqlen_new=1, heads_q=4, heads_kv=2, head_dim=16, dtype="fp32")
    assert appended.kv_bytes == 2 * 100 * 2 * 2 * 16 * 4        # the new token is one of the 100 keys
    assert appended.capacity == 128 and DecodeCase(1, 1000, 16).blocks_used() == [63]


# ---------------------------------------------------------------------------------------------- inputs

SMALL = dict(heads_q=4, heads_kv=2, head_dim=16, dtype="fp32")
LAYOUT_CASES = [DecodeCase(3, 300, 0, **SMALL), DecodeCase(16, 40, 0, **SMALL), DecodeCase(3, 40, 16, **SMALL),
                DecodeCase(3, 40, 128, **SMALL), DecodeCase(3, 40, 16, seqlens=(40, 17, 33), **SMALL),
                DecodeCase(3, 300, 0, seqlens=(300, 1, 129), **SMALL), DecodeCase(2, 64, 16, seqlen_new=1, **SMALL)]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: f"B{c.batch}-{c.cache_len}-p{c.page_size}"
                         f"{'-ragged' if c.seqlens else ''}{'-append' if c.seqlen_new else ''}")
def test_every_layout_reads_the_same_keys(case):
    """FlashCore's cache, the dense copy SDPA and Flex read, and FlashInfer's pages hold each sequence's keys."""
    inputs = make_inputs(case, "cpu")
    assert inputs.q.shape == (case.batch, 1, 4, 16)
    assert inputs.cache_seqlens.tolist() == [n - case.seqlen_new for n in case.lengths()]
    assert inputs.seqlens_k.dtype == inputs.cache_seqlens.dtype == torch.int32
    assert inputs.k_dense.shape == (case.batch, 2, case.cache_len, 16) and inputs.k_dense.is_contiguous()
    assert inputs.q_dense.stride() == (4 * 16, 16, 16, 1)
    torch.testing.assert_close(inputs.q_dense, inputs.q.transpose(1, 2), rtol=0, atol=0)
    if case.page_size:
        table = inputs.block_table
        assert table.dtype == torch.int32 and table.shape == (case.batch, case.capacity // case.page_size)
        used = torch.cat([table[b, :n] for b, n in enumerate(case.blocks_used())])
        assert sorted(used.tolist()) == list(range(inputs.k_cache.shape[0]))   # distinct blocks, none idle
    else:
        assert inputs.block_table is None and inputs.k_cache.shape == (case.batch, case.capacity, 2, 16)
    k_pages, v_pages, page, pages = decode_bench.flashinfer_pages(case, inputs)
    indptr, indices, last = decode_bench.flashinfer_csr(pages, case.lengths(), page)
    assert 1 <= int(last.min()) and int(last.max()) <= page
    for b, n in enumerate(case.lengths()):
        k, v = sequence_keys(case, inputs, b)
        assert k.shape == (1, n, 2, 16)
        cached = n - case.seqlen_new
        torch.testing.assert_close(inputs.k_dense[b, :, :cached], k[0, :cached].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(inputs.v_dense[b, :, :cached], v[0, :cached].transpose(0, 1), rtol=0, atol=0)
        if not case.seqlen_new:
            mine = indices[indptr[b]:indptr[b + 1]].long()
            assert (len(mine) - 1) * page + int(last[b]) == n
            torch.testing.assert_close(k_pages[mine].flatten(0, 1)[:n], k[0], rtol=0, atol=0)
            torch.testing.assert_close(v_pages[mine].flatten(0, 1)[:n], v[0], rtol=0, atol=0)


def test_flashinfer_reads_a_contiguous_cache_as_pages_without_a_copy():
    small, big = make_inputs(LAYOUT_CASES[0], "cpu"), make_inputs(LAYOUT_CASES[1], "cpu")
    k_pages, _, page, table = decode_bench.flashinfer_pages(LAYOUT_CASES[0], small)
    assert page == 128 and table.shape == (3, 3) and k_pages.data_ptr() == small.k_cache.data_ptr()
    _, _, page, table = decode_bench.flashinfer_pages(LAYOUT_CASES[1], big)
    assert page == big.k_cache.shape[1] and table.shape == (16, 1)    # 16 sequences: one page each


def test_sdpa_on_the_dense_copy_computes_the_decode_attention():
    case = LAYOUT_CASES[2]
    inputs = make_inputs(case, "cpu")
    out = decode_bench.sdpa(inputs)().transpose(1, 2)          # (B, 1, Hq, D)
    for b in range(case.batch):
        ref, _ = attention_ref(inputs.q[b:b + 1], *sequence_keys(case, inputs, b))
        torch.testing.assert_close(out[b:b + 1].double(), ref, rtol=1e-4, atol=1e-4)


def test_sdpa_step_appends_then_attends():
    case = LAYOUT_CASES[6]
    inputs = make_inputs(case, "cpu")
    out = decode_bench.sdpa_step(case, inputs)().transpose(1, 2)
    torch.testing.assert_close(inputs.k_dense[:, :, -1], inputs.k_new[:, 0], rtol=0, atol=0)
    for b in range(case.batch):
        ref, _ = attention_ref(inputs.q[b:b + 1], *sequence_keys(case, inputs, b))
        torch.testing.assert_close(out[b:b + 1].double(), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- the check

def exact_decode(case, inputs, skip_new=False):
    """(B, 1, Hq, D): each sequence attending its keys (float64 reference); skip_new: the cache slots the new tokens
    should have been written to, left as they were (an append that did not happen)."""
    outs = []
    for b, n in enumerate(case.lengths()):
        k, v = sequence_keys(case, inputs, b)
        if skip_new and case.seqlen_new:
            k, v = (gather_kvcache(cache, inputs.block_table)[b:b + 1, :n]
                    for cache in (inputs.k_cache, inputs.v_cache))
        outs.append(attention_ref(inputs.q[b:b + 1], k, v)[0].to(inputs.q.dtype))
    return torch.cat(outs)


@pytest.mark.parametrize("case", LAYOUT_CASES[4:7], ids=["paged-ragged", "contiguous-ragged", "append"])
def test_check_passes_the_right_answer_and_flags_a_wrong_end_sequence(case):
    inputs = make_inputs(case, "cpu")
    right = exact_decode(case, inputs)
    result = decode_bench.check_against_reference(case, inputs, lambda: right)
    assert result["status"] == "ok" and result["max_err"] <= result["tolerance"]
    for b in (0, case.batch - 1):
        wrong = right.clone()
        wrong[b, 0, 1] += 0.5
        result = decode_bench.check_against_reference(case, inputs, lambda: wrong)
        assert result["status"] == "WRONG" and result["max_err"] > result["tolerance"]


def test_check_counts_the_appended_token(monkeypatch):
    """An answer over the cache as it was before the append fails the check; with sequence_keys left without the
    new tokens the same stale answer would pass (so the check's keys are what the test is about)."""
    case = LAYOUT_CASES[6]
    inputs = make_inputs(case, "cpu")
    stale = exact_decode(case, inputs, skip_new=True)
    assert decode_bench.check_against_reference(case, inputs, lambda: stale)["status"] == "WRONG"
    monkeypatch.setattr(decode_bench, "sequence_keys", lambda case, inputs, b: tuple(
        gather_kvcache(cache, inputs.block_table)[b:b + 1, :case.lengths()[b]]
        for cache in (inputs.k_cache, inputs.v_cache)))
    assert decode_bench.check_against_reference(case, inputs, lambda: stale)["status"] == "ok"


# ---------------------------------------------------------------------------------------------- FlashCore

FC_CASES = [DecodeCase(2, 40, 0, heads_q=4, heads_kv=2, head_dim=16, dtype="fp16"),
            DecodeCase(2, 40, 16, seqlens=(40, 9), heads_q=4, heads_kv=2, head_dim=16, dtype="fp16"),
            DecodeCase(2, 48, 16, seqlen_new=1, heads_q=8, heads_kv=2, head_dim=16, dtype="fp16")]


@pytest.mark.parametrize("builder", ["flashcore_call", "flashcore_default"])
@pytest.mark.parametrize("case", FC_CASES, ids=["contiguous", "paged-ragged", "paged-append"])
def test_flashcore_through_the_suite_passes_the_check(cpu_only, case, builder):
    """The suite's FlashCore builders (public call; host call with the default config) on the interpreter."""
    inputs = make_inputs(case, "cpu", dense=False)
    before = inputs.k_cache.clone(), inputs.v_cache.clone()
    result = decode_bench.check_against_reference(case, inputs, getattr(decode_bench, builder)(inputs))
    assert result["status"] == "ok", result
    for b in range(case.batch if case.seqlen_new else 0):     # the new token written where it belongs
        position = int(inputs.cache_seqlens[b])
        slot = (int(inputs.block_table[b, position // case.page_size]), position % case.page_size)
        for cache, new, old in zip((inputs.k_cache, inputs.v_cache), (inputs.k_new, inputs.v_new), before):
            torch.testing.assert_close(cache[slot], new[b, 0], rtol=0, atol=0)
            old[slot] = cache[slot]
    for cache, old in zip((inputs.k_cache, inputs.v_cache), before):     # and nothing else changed
        torch.testing.assert_close(cache, old, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_decode_suites_run_end_to_end_on_the_gpu(tmp_path):
    """A tiny selection of every decode suite: FlashCore and SDPA timed, the check ok, reports written."""
    argv = ["--op", "attn_decode", "--decode-batches", "1,4", "--decode-caches", "1024", "--decode-layouts",
            "contiguous,paged16", "--no-decode-ragged", "--decode-peers", "cudnn,flash",
            "--warmup-ms", "2", "--rep-ms", "5", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    for suite, number in (("decode", "ms"), ("decode-graph", "ms"), ("decode-host", "host_us")):
        results = json.loads((tmp_path / f"attn_decode.{suite}.json").read_text())["results"]
        assert len(results) == (8 if suite == "decode-host" else 4)
        for r in results:
            assert r["check"]["status"] == "ok", r["check"]
            assert number in r["impls"]["flashcore"], r["impls"]["flashcore"]
            assert number in r["impls"]["cudnn" if suite != "decode-host" else "sdpa"]
