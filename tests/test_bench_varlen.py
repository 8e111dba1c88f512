"""flashcore-bench's attn_varlen suites on the CPU: the cases (--list, quick and heavy selections, options), the useful
FLOPs each counts, the inputs every implementation reads (packed, paged, padded, FlashInfer's page lists), the
correctness check, FlashCore through the suite's builders under the interpreter and SDPA on the padded batch (CPU
backends). One GPU smoke run (marker gpu)."""
from __future__ import annotations

import json

import pytest
import torch

from flashcore.ops.attn_varlen import bench as varlen_bench
from flashcore.ops.attn_varlen.bench import VarlenCase, case_of, inputs_of, padded_batch
from flashcore.counts import useful_flops
from flashcore.ops.attn_varlen.workload import sequence_keys, sequence_rows
from flashcore.ops.bench_common import flashinfer_csr
from flashcore.reference import attention_ref, varlen_ref
from flashcore.tools import bench

MIXED, SKEWED, CHUNKED = varlen_bench.SUITES


def parse(argv=()):
    """The harness's parsed command line (every registered suite's options)."""
    return bench.build_parser(bench.discover()).parse_args(list(argv))


def cases_of(suite, argv=()):
    return [case.call for case in suite.cases(parse(argv))]


# ---------------------------------------------------------------------------------------------- the cases

def test_list_shows_the_three_suites_without_gpu(capsys):
    assert bench.main(["--list", "--op", "attn_varlen"]) == 0
    out = capsys.readouterr().out
    assert "attn_varlen/mixed:" in out and "attn_varlen/skewed:" in out and "attn_varlen/chunked:" in out
    assert "attn_decode" not in out and "attn_fwd" not in out
    assert "8 cases x 7 impls (flashcore, default, flashinfer, fa4, sdpa, nested, dense)" in out
    assert "2 cases x 7 impls" in out
    assert "12 cases x 6 impls (flashcore, default, flashinfer, fa4, sdpa, dense)" in out    # no jagged SDPA
    assert "1x16k + 63x256" in out and "B=32 chunk=2048 prefix= 4k page=128" in out and "[heavy]" not in out
    assert bench.main(["--list", "--op", "attn_varlen", "--varlen-quick"]) == 0
    out = capsys.readouterr().out
    assert "1 cases x 7 impls" in out and "2 cases x 7 impls" in out and "2 cases x 6 impls" in out
    assert bench.main(["--list", "--suite", "chunked", "--varlen-heavy", "--varlen-peers", "fa4",
                       "--no-varlen-default"]) == 0
    out = capsys.readouterr().out
    assert "16 cases x 2 impls (flashcore, fa4)" in out and out.count("[heavy]") == 4
    assert "attn_varlen/mixed" not in out


@pytest.mark.parametrize("argv", [["--varlen-peers", "xformers"], ["--op", "attn_varlen", "--suite", "decode"]])
def test_bad_varlen_options_are_usage_errors(argv):
    with pytest.raises(SystemExit):
        bench.main(["--list", "--op", "attn_varlen", *argv])


def test_mixed_batches():
    cases = cases_of(MIXED)
    mixed, (padded, uniform) = cases[:-2], cases[-2:]
    assert [c.tokens for c in cases] == [16384, 65536] + [16384] * 6
    for case in cases:
        assert case.causal and case.seqlens_q == case.seqlens_k and case.page_size == 0
    for case in mixed:
        assert case.kind == "mixed"
        assert all(64 <= n <= 4096 for n in case.seqlens_q[:-1]) and 1 <= case.seqlens_q[-1] <= 4096
        assert case.batch > 4 and len(set(case.seqlens_q)) > 4
    assert cases[0].seqlens_q == varlen_bench.mixed_lengths(16384) == cases_of(MIXED)[0].seqlens_q   # seeded
    assert all(c.seqlens_q == cases[0].seqlens_q for c in mixed[2:])
    # all bf16, D 128, 32/8 but one row each: fp16, D 64, D 256, MHA
    shapes = [(c.dtype, c.head_dim, c.heads_q, c.heads_kv) for c in cases]
    assert shapes[:2] == [("bf16", 128, 32, 8)] * 2 and shapes[-2:] == [("bf16", 128, 32, 8)] * 2
    assert sorted(shapes[2:-2]) == sorted([("fp16", 128, 32, 8), ("bf16", 64, 32, 8), ("bf16", 256, 32, 8),
                                           ("bf16", 128, 32, 32)])
    # floor (a)'s batch: at least half of its padded batch is padding; floor (c)'s: equal lengths
    assert padded.kind == "padded" and padded.tokens <= 0.5 * padded.batch * max(padded.seqlens_q)
    assert uniform.kind == "uniform" and uniform.uniform and uniform.batch > 1
    assert cases_of(MIXED, ["--varlen-quick"]) == cases[:1]


def test_skewed_batch_and_the_long_sequence_alone():
    skewed, alone = cases_of(SKEWED)
    assert skewed.seqlens_q == (16384,) + (256,) * 63 == skewed.seqlens_k and skewed.tokens == 32512
    assert alone.seqlens_q == alone.seqlens_k == (16384,)
    assert skewed.flops == alone.flops + 63 * useful_flops([256], [256], 32, 128, causal=True)
    assert 1.01 < skewed.flops / alone.flops < 1.02
    assert dict(case_of(skewed).columns)["batch"] == "1x16k + 63x256"
    assert dict(case_of(alone).columns)["batch"] == "1x16k"


def test_chunked_matrix():
    cases = cases_of(CHUNKED)
    assert len(cases) == 12 and not any(c.heavy for c in cases)
    points = {(c.seqlens_q[0], c.prefix(), c.batch, c.page_size) for c in cases}
    assert {p[:2] for p in points} == {(chunk, prefix) for chunk in (512, 2048) for prefix in (4096, 16384, 65536)}
    assert {p[2] for p in points} == {1, 8, 32} and {p[3] for p in points} == {16, 128}
    for case in cases:
        assert case.uniform and case.causal and (case.dtype, case.head_dim, case.heads_q, case.heads_kv) == \
            ("bf16", 128, 32, 8)
        assert case.seqlens_k[0] == case.prefix() + case.seqlens_q[0]
    heavy = [c for c in cases_of(CHUNKED, ["--varlen-heavy"]) if c.heavy]
    assert {(c.seqlens_q[0], c.prefix(), c.batch) for c in heavy} == {(512, 65536, 32), (2048, 65536, 32)}
    assert len(heavy) == 4 and all("[heavy]" in case_of(c).label for c in heavy)
    quick = cases_of(CHUNKED, ["--varlen-quick"])
    assert [(c.seqlens_q[0], c.prefix(), c.batch, c.page_size) for c in quick] == [(512, 16384, 8, 16),
                                                                                   (512, 16384, 8, 128)]


def test_work_is_the_useful_flops_of_real_tokens():
    chunk, prefix, batch = 2048, 16384, 8
    case = VarlenCase("chunked", (chunk,) * batch, (prefix + chunk,) * batch, page_size=16)
    assert case_of(case).work == case.flops == batch * 4 * 32 * 128 * (chunk * prefix + chunk * (chunk + 1) // 2)
    mixed = cases_of(MIXED)[0]
    assert case_of(mixed).work == 4 * 32 * 128 * sum(n * (n + 1) // 2 for n in mixed.seqlens_q)
    # the padded batch an SDPA peer computes is more than the useful work (its rate still counts the useful work)
    assert mixed.batch * max(mixed.seqlens_q) ** 2 > 1.5 * sum(n * n for n in mixed.seqlens_q)


def test_impls_and_options():
    args = parse(["--varlen-peers", "nested,fa4", "--no-varlen-default"])
    assert MIXED.impls(args) == ["flashcore", "nested", "fa4"] and CHUNKED.impls(args) == ["flashcore", "fa4"]
    assert SKEWED.impls(parse(["--varlen-peers", "none"])) == ["flashcore", "default"]


def test_ratios_never_take_flashcore_for_the_best_peer():
    case = case_of(cases_of(MIXED)[0])
    timed = {"flashcore": 1.0, "default": 1.1, "dense": 0.5, "flashinfer": 1.25, "fa4": "RuntimeError: x",
             "sdpa": 2.0, "nested": 4.0}
    impls = {n: {"ms": t, "rate": case.work / t / 1e9} if isinstance(t, float) else {"error": t}
             for n, t in timed.items()}
    result = bench.add_ratios({"case": {}, "columns": case.columns, "label": case.label, "work": case.work,
                               "check": {"status": "ok"}, "impls": impls}, MIXED)
    assert result["best_peer"] == "flashinfer"            # FC-padded is faster here, but FlashCore's own
    assert result["ratios"] == pytest.approx({"best": 1.25, "flashinfer": 1.25, "fa4": None, "dense": 0.5,
                                              "default": 1.1})
    text = bench.format_table([result], MIXED, list(timed))
    assert "FC/FlashInfer" in text and "varlen/padded" in text and "tuned/default" in text and "SDPA-jagged" in text


# ---------------------------------------------------------------------------------------------- inputs

SMALL = dict(heads_q=4, heads_kv=2, head_dim=16, dtype="fp16")
INPUT_CASES = [VarlenCase("mixed", (37, 1, 20), (37, 1, 20), **SMALL),
               VarlenCase("chunked", (8, 8, 8), (40, 40, 40), page_size=16, **SMALL),
               VarlenCase("chunked", (5, 5), (21, 21), **SMALL),
               VarlenCase("skewed", (50, 3, 3), (50, 3, 3), page_size=16, **SMALL)]


@pytest.mark.parametrize("case", INPUT_CASES, ids=["mixed", "chunked-paged", "chunked-packed", "skewed-paged"])
def test_every_layout_holds_the_same_keys(case):
    inputs = inputs_of(case, "cpu")
    assert inputs.q.shape == (case.tokens, 4, 16) and inputs.cu_seqlens_q.dtype == torch.int32
    assert inputs.seqused_k.tolist() == list(case.seqlens_k) and inputs.max_seqlen_k == max(case.seqlens_k)
    q_pad, k_pad, v_pad = padded_batch(case, inputs)
    assert q_pad.shape == (case.batch, max(case.seqlens_q), 4, 16) and k_pad.shape[:2] == (case.batch,
                                                                                          max(case.seqlens_k))
    if case.page_size:
        table = inputs.block_table
        used = [-(-n // case.page_size) for n in case.seqlens_k]
        assert sorted(torch.cat([table[b, :n] for b, n in enumerate(used)]).tolist()) == \
            list(range(inputs.k.shape[0]))                       # distinct blocks, none idle
        indptr, indices, last = flashinfer_csr(table.cpu(), list(case.seqlens_k), case.page_size)
    for b in range(case.batch):
        k, v = sequence_keys(inputs, b)
        n, m = case.seqlens_q[b], case.seqlens_k[b]
        assert k.shape == (m, 2, 16)
        torch.testing.assert_close(q_pad[b, :n], inputs.q[sequence_rows(inputs, b)], rtol=0, atol=0)
        torch.testing.assert_close(k_pad[b, :m], k, rtol=0, atol=0)
        torch.testing.assert_close(v_pad[b, :m], v, rtol=0, atol=0)
        assert not k_pad[b, m:].any() and not q_pad[b, n:].any()      # zeros past the sequence
        if case.page_size:                                            # FlashInfer's pages hold the same keys
            mine = indices[indptr[b]:indptr[b + 1]].long()
            assert (len(mine) - 1) * case.page_size + int(last[b]) == m
            torch.testing.assert_close(inputs.k[mine].flatten(0, 1)[:m], k, rtol=0, atol=0)


def test_padded_batch_refuses_a_batch_that_would_need_a_mask():
    case = VarlenCase("chunked", (5, 3), (21, 30), **SMALL)
    with pytest.raises(RuntimeError, match="mask"):
        padded_batch(case, inputs_of(case, "cpu"))


# ---------------------------------------------------------------------------------------------- the check

def exact(inputs, causal=True):
    return varlen_ref(inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                      block_table=inputs.block_table, causal=causal)[0].to(inputs.q.dtype)


@pytest.mark.parametrize("case", INPUT_CASES[:2] + INPUT_CASES[3:], ids=["mixed", "chunked-paged", "skewed-paged"])
def test_check_passes_the_right_answer_and_flags_a_wrong_end_sequence(case, monkeypatch):
    monkeypatch.setattr(varlen_bench, "CHECK_ROWS", 8)               # the 50-token sequence: its two ends
    inputs = inputs_of(case, "cpu")
    right = exact(inputs)
    result = varlen_bench.check_against_reference(case, inputs, lambda: right)
    assert result["status"] == "ok" and result["max_err"] <= result["tolerance"]
    first, last = sequence_rows(inputs, 0), sequence_rows(inputs, case.batch - 1)
    for row in (first.start, first.stop - 1, last.start, last.stop - 1):
        wrong = right.clone()
        wrong[row, 1] += 0.5
        result = varlen_bench.check_against_reference(case, inputs, lambda: wrong)
        assert result["status"] == "WRONG" and result["max_err"] > result["tolerance"], row
    wrong = exact(inputs, causal=False)                               # the wrong mask
    assert varlen_bench.check_against_reference(case, inputs, lambda: wrong)["status"] == "WRONG"


# ---------------------------------------------------------------------------------------------- impls on the CPU

@pytest.mark.parametrize("builder", ["flashcore_call", "flashcore_default"])
@pytest.mark.parametrize("case", INPUT_CASES[:2], ids=["mixed", "chunked-paged"])
def test_flashcore_through_the_suite_passes_the_check(cpu_only, case, builder):
    """The suite's FlashCore builders (public call; host call with the default config) on the interpreter."""
    inputs = inputs_of(case, "cpu")
    result = varlen_bench.check_against_reference(case, inputs, getattr(varlen_bench, builder)(case, inputs))
    assert result["status"] == "ok", result


@pytest.mark.parametrize("case", INPUT_CASES[:2], ids=["mixed", "chunked-paged"])
def test_sdpa_on_the_padded_batch_picks_a_backend_that_runs(case):
    """On the CPU only SDPA's flash backend takes the case: the probe skips the others and records why; its real rows
    are the reference's (causal top-left on the square batch, causal_lower_right on the chunks)."""
    inputs = inputs_of(case, "cpu")
    inputs.q, inputs.k, inputs.v = inputs.q.float(), inputs.k.float(), inputs.v.float()    # (CPU: fp32 math)
    found = {}
    run = varlen_bench.sdpa_padded(case, padded_batch(case, inputs), found, backends=("efficient", "flash"))
    assert found["sdpa_backend"] == "flash" and isinstance(found["sdpa_ms"]["efficient"], str)
    out = run().transpose(1, 2)                                       # (B, S_max, Hq, D)
    for b in range(case.batch):
        k, v = sequence_keys(inputs, b)
        ref, _ = attention_ref(inputs.q[sequence_rows(inputs, b)][None], k[None], v[None], causal=True)
        torch.testing.assert_close(out[b, :case.seqlens_q[b]].double(), ref[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="no SDPA backend"):
        varlen_bench.sdpa_padded(case, padded_batch(case, inputs), {}, backends=("efficient",))


def test_jagged_sdpa_takes_self_attention_batches_only():
    for case in INPUT_CASES[1:3]:
        with pytest.raises(RuntimeError, match="jagged"):
            varlen_bench.sdpa_nested(case, inputs_of(case, "cpu"))


def test_flashinfer_is_skipped_outside_its_prebuilt_modules():
    for case in (VarlenCase("mixed", (8,), (8,), dtype="fp16"), VarlenCase("mixed", (8,), (8,), head_dim=64)):
        with pytest.raises(RuntimeError, match="prebuilt for bf16 at head_dim 128"):
            varlen_bench.flashinfer_prefill(case, None)


def test_notes_say_what_was_timed():
    for suite in varlen_bench.SUITES:
        assert "useful FLOPs" in suite.notes and "value check" in suite.notes and "float64" in suite.notes
    assert "63 x 256" in SKEWED.notes and "1.5%" in SKEWED.notes and "causal_lower_right" in CHUNKED.notes


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_varlen_suites_run_end_to_end_on_the_gpu(tmp_path):
    """The quick selection with the torch-only peers: FlashCore and SDPA timed, the check ok, reports written."""
    argv = ["--op", "attn_varlen", "--varlen-quick", "--varlen-peers", "sdpa,nested,dense", "--warmup-ms", "2",
            "--rep-ms", "5", "--rounds", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    for suite, count in (("mixed", 1), ("skewed", 2), ("chunked", 2)):
        results = json.loads((tmp_path / f"attn_varlen.{suite}.json").read_text())["results"]
        assert len(results) == count
        for r in results:
            assert r["check"]["status"] == "ok", r["check"]
            assert "ms" in r["impls"]["flashcore"] and "ms" in r["impls"]["default"], r["impls"]
            assert "ms" in r["impls"]["sdpa"] and r["check"]["sdpa_backend"] in ("cudnn", "flash", "efficient")
