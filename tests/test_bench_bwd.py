"""flashcore-bench's attn_bwd suites on the CPU: the cases (--list, quick selection, options and their errors), the work
each counts (2.5x / 3.5x the forward's FLOPs), that the `backward` suite times the backward alone, the chunked float64
gradient reference and the check, FlashCore (public call and default configs) and SDPA through the suites' builders
under the interpreter. One GPU smoke run (marker gpu)."""
from __future__ import annotations

import json

import pytest
import torch

from flashcore.ops.attn_bwd import OP
from flashcore.ops.attn_bwd import bench as bwd_bench
from flashcore.ops.attn_bwd.call import AttnBwdCall
from flashcore.ops.attn_fwd.call import AttnFwdCall
from flashcore.tools import bench

BACKWARD, FWD_BWD = bwd_bench.SUITES


def parse(argv=()):
    """The harness's parsed command line (every registered suite's options)."""
    return bench.build_parser(bench.discover()).parse_args(list(argv))


def calls_of(suite, argv=()):
    return [case.call for case in suite.cases(parse(argv))]


# ---------------------------------------------------------------------------------------------- the cases

def test_list_shows_both_suites_without_gpu(capsys):
    assert bench.main(["--list", "--op", "attn_bwd", "--bwd-peers", "cudnn,flash,efficient,flex"]) == 0
    out = capsys.readouterr().out
    assert "attn_bwd/backward: Backward" in out and "attn_bwd/fwd-bwd: Forward + backward" in out
    assert out.count("40 cases x 6 impls (flashcore, default, cudnn, flash, efficient, flex)") == 2
    assert "attn_fwd" not in out and "H=32/8 S=16384" in out and "S=512" not in out and "fp16" not in out
    assert bench.main(["--list", "--op", "attn_bwd", "--bwd-quick", "--bwd-peers", "flash,flex"]) == 0
    out = capsys.readouterr().out
    assert out.count("8 cases x 4 impls (flashcore, default, flash, flex)") == 2
    assert "S=2048" in out and "S=8192" in out and "S=4096" not in out and "D=64" not in out
    assert bench.main(["--list", "--suite", "fwd-bwd", "--bwd-peers", "none", "--no-bwd-default"]) == 0
    out = capsys.readouterr().out
    assert "40 cases x 1 impls (flashcore)" in out and "attn_bwd/backward" not in out


def test_default_matrix_is_the_prefill_matrix_in_bf16():
    calls = calls_of(BACKWARD)
    assert len(calls) == 40 and len(set(calls)) == 40 and calls == calls_of(FWD_BWD)
    assert all(isinstance(c, AttnBwdCall) and not c.varlen for c in calls)
    assert {c.dtype for c in calls} == {"bf16"} and {c.seqlen_q for c in calls} == {1024, 2048, 4096, 8192, 16384}
    for call in calls:
        assert call.batch * call.seqlen_q == 16384 and call.seqlen_k == call.seqlen_q
        assert call.heads_q * call.head_dim == 2048 or (call.heads_q, call.heads_kv, call.head_dim) == (32, 8, 128)
    assert {(c.head_dim, c.heads_q, c.heads_kv) for c in calls} == {(64, 32, 32), (128, 16, 16), (256, 8, 8),
                                                                    (128, 32, 8)}
    assert {c.causal for c in calls} == {False, True}


def test_quick_and_options():
    quick = calls_of(BACKWARD, ["--bwd-quick"])
    assert {(c.dtype, c.head_dim, c.seqlen_q) for c in quick} == {("bf16", 128, 2048), ("bf16", 128, 8192)}
    assert {(c.heads_q, c.heads_kv, c.causal) for c in quick} == {(h, kv, c) for h, kv in ((16, 16), (32, 8))
                                                                for c in (False, True)}
    assert len(quick) == 8
    # an option given wins over --bwd-quick's choice
    assert {c.seqlen_q for c in calls_of(BACKWARD, ["--bwd-quick", "--bwd-seqlens", "512"])} == {512}
    assert calls_of(FWD_BWD, ["--bwd-head-dims", "128", "--bwd-seqlens", "4096", "--bwd-causal", "true",
                              "--no-bwd-gqa"]) == [AttnBwdCall(4, 4096, 4096, 16, 16, 128, "bf16", True)]
    both = calls_of(BACKWARD, ["--bwd-dtypes", "bf16,fp16", "--bwd-head-dims", "64", "--no-bwd-gqa"])
    assert len(both) == 20 and {c.dtype for c in both} == {"bf16", "fp16"}
    # the prefill suite's own options leave these suites alone
    assert calls_of(BACKWARD, ["--quick", "--dtypes", "fp16"]) == calls_of(BACKWARD)


def test_impls():
    assert BACKWARD.impls(parse(["--bwd-peers", "flex,cudnn", "--no-bwd-default"])) == ["flashcore", "flex", "cudnn"]
    assert FWD_BWD.impls(parse(["--bwd-peers", "none"])) == ["flashcore", "default"]


@pytest.mark.parametrize("argv,message", [
    (["--bwd-peers", "xformers"], "--bwd-peers: unknown xformers"),
    (["--bwd-head-dims", "96"], "--bwd-head-dims must divide 2048"),
    (["--bwd-seqlens", "3000"], "--bwd-seqlens 16384"),
    (["--bwd-seqlens", "2k"], "--bwd-seqlens: a comma list of integers"),
    (["--bwd-head-dims", "0"], "--bwd-head-dims: positive integers"),
    (["--bwd-dtypes", "fp8"], "--bwd-dtypes: each one of bf16, fp16"),
    (["--bwd-causal", "maybe"], "--bwd-causal"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--list", "--op", "attn_bwd", *argv])
    assert message in capsys.readouterr().err


def test_work_is_2_5x_and_3_5x_the_forward_flops():
    for argv in ([], ["--bwd-causal", "true"]):
        for suite, factor in ((BACKWARD, 2.5), (FWD_BWD, 3.5)):
            for case in suite.cases(parse(argv)):
                c = case.call
                forward = 4 * c.batch * c.heads_q * c.seqlen_q * c.seqlen_k * c.head_dim / (2 if c.causal else 1)
                assert case.work == pytest.approx(factor * forward)
                assert forward == AttnFwdCall(*[getattr(c, f) for f in ("batch", "seqlen_q", "seqlen_k", "heads_q",
                                                                        "heads_kv", "head_dim", "dtype",
                                                                        "causal")]).flops
    call = AttnBwdCall(4, 4096, 4096, 32, 8, 128, "bf16", True)
    assert bwd_bench.Backward().work(call, call) == 2.5 * 2 * 4 * 32 * 4096 * 4096 * 128


def test_suites_report_memory_and_the_floors_ratios():
    for suite in (BACKWARD, FWD_BWD):
        assert suite.memory and suite.timing == "device" and suite.variants == ("default",)
        assert set(suite.ratios) == {"best", "flash", "flex", "cudnn", "default"}
        assert "float64" in suite.notes and "MiB" in suite.notes
    assert "2.5x" in BACKWARD.notes and "retain_graph=True" in BACKWARD.notes and "3.5x" in FWD_BWD.notes


# ---------------------------------------------------------------------------------------------- what is timed

def test_backward_suite_times_the_backward_alone():
    """backward_only runs the forward once, when built; each timed call runs the backward graph again (same
    gradients every time). forward_backward runs the forward on every call. A (out, lse) result is differentiated
    through out."""
    x = torch.randn(5, requires_grad=True)
    forwards = []

    def forward():
        forwards.append(1)
        return x * 3.0, x.sum()
    run = bwd_bench.backward_only(forward, (x,), torch.ones(5))
    assert len(forwards) == 1
    for _ in range(3):
        (grad,) = run()
        torch.testing.assert_close(grad, torch.full((5,), 3.0))
    assert len(forwards) == 1 and x.grad is None
    run = bwd_bench.forward_backward(forward, (x,), torch.ones(5))
    run()
    run()
    assert len(forwards) == 3 and x.grad is None


# ---------------------------------------------------------------------------------------------- the check

def small_inputs(call: AttnFwdCall, dtype=torch.float16):
    """(q, k, v) in (B, S, H, D) and in (B, H, S, D), requiring grad, and dout (B, S, H, D), on the CPU."""
    q = torch.randn(call.batch, call.seqlen_q, call.heads_q, call.head_dim).to(dtype)
    k, v = (torch.randn(call.batch, call.seqlen_k, call.heads_kv, call.head_dim).to(dtype) for _ in range(2))
    bshd = [t.requires_grad_() for t in (q, k, v)]
    bhsd = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in bshd]
    return bshd, bhsd, torch.randn_like(q)


def one_pass_grads(q, k, v, dout, causal):
    """float64 autograd of the reference over the whole sequence at once."""
    from flashcore.reference import attention_ref
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attention_ref(*leaves, causal=causal)[0].backward(dout.double())
    return [t.grad for t in leaves]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_in_chunks_is_the_one_pass_reference(causal, monkeypatch):
    """chunked_reference's output and float64 gradients are attention_ref's over the whole sequence at once."""
    from flashcore.reference import attention_ref
    q, k, v, dout = (torch.randn(1, 37, h, 16, dtype=torch.float64) for h in (4, 2, 2, 4))
    monkeypatch.setattr(bwd_bench, "CHECK_ELEMENTS", 5 * 37 * 4)        # chunks of 5 rows, the last one of 2
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = bwd_bench.chunked_reference(*leaves, causal=causal)
    assert lse is None
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=causal)[0], rtol=1e-12, atol=1e-12)
    out.backward(dout)
    for leaf, want in zip(leaves, one_pass_grads(q, k, v, dout, causal)):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-12, atol=1e-12)


def test_checked_heads():
    assert bwd_bench.checked_heads(AttnFwdCall(1, 8, 8, 32, 8, 128)) == ([0, 1, 2, 3, 28, 29, 30, 31], [0, 7])
    assert bwd_bench.checked_heads(AttnFwdCall(1, 8, 8, 16, 16, 128)) == ([0, 15], [0, 15])
    assert bwd_bench.checked_heads(AttnFwdCall(1, 8, 8, 4, 1, 128)) == ([0, 1, 2, 3], [0])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_check_passes_the_right_gradients_and_flags_wrong_ones(causal, monkeypatch):
    monkeypatch.setattr(bwd_bench, "CHECK_ELEMENTS", 8 * 40 * 8)
    call = AttnFwdCall(2, 40, 40, 8, 2, 16, "fp16", causal)
    bshd, _, dout = small_inputs(call)
    exact = [g.to(torch.float16) for g in one_pass_grads(*bshd, dout, causal)]

    def check(grads):
        return bwd_bench.check_gradients(call, bshd, dout, lambda: grads)
    result = check(exact)
    assert result["status"] == "ok" and result["max_err"] <= result["tolerance"]
    # dq of the last query head, dk and dv of the last KV head: all checked
    for which, index in ((0, (0, 39, 7)), (1, (0, 0, 1)), (2, (0, 20, 1))):
        wrong = [g.clone() for g in exact]
        wrong[which][index] += 0.5
        result = check(wrong)
        assert result["status"] == "WRONG" and result["max_err"] > result["tolerance"], which
    wrong = [g.clone() for g in exact]
    wrong[1][1, 3, 0, 2] = float("nan")                                      # batch 1: finite everywhere is checked
    assert check(wrong)["status"] == "WRONG"


# ---------------------------------------------------------------------------------------------- impls on the CPU

@pytest.mark.parametrize("alone", [True, False], ids=["backward", "fwd-bwd"])
def test_flashcore_and_sdpa_through_the_suite(cpu_only, alone, monkeypatch):
    """The suites' timed calls on the interpreter: FlashCore's public call and its default-config path pass the
    check; SDPA's flash backend (the CPU's) gives the same gradients in its own layout; `default` runs the
    backward with attn_bwd's heuristic default config."""
    monkeypatch.setattr(bwd_bench, "CHECK_ELEMENTS", 16 * 48 * 4)
    call = AttnFwdCall(2, 48, 48, 4, 2, 32, "fp16", causal=True)
    bshd, bhsd, dout = small_inputs(call)
    configs = []
    backward = bwd_bench.host.attention_backward
    monkeypatch.setattr(bwd_bench.host, "attention_backward",
                        lambda *a, config=None, **kw: configs.append(config) or backward(*a, config=config, **kw))
    fns = bwd_bench.timed_calls(call, bshd, bhsd, dout, ["flashcore", "default", "flash", "fa"], alone)
    for name in ("flashcore", "default"):
        result = bwd_bench.check_gradients(call, bshd, dout, fns[name])
        assert result["status"] == "ok", (name, result)
    spec = bwd_bench.host.spec_of(bwd_bench.host.call_of(bshd[0], bshd[1], True, False, False, False), 0)
    assert configs == [OP.default_config(spec)]
    ours = fns["flashcore"]()
    for got, want in zip(fns["flash"](), ours):
        torch.testing.assert_close(got.transpose(1, 2), want, rtol=2e-2, atol=2e-2)
    with pytest.raises(Exception):          # flash-attn is not installed here: the impl is n/a, the others run
        fns["fa"]()


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_backward_suites_run_end_to_end_on_the_gpu(tmp_path):
    """The quick selection with two SDPA peers: every impl timed with its peak memory, the check ok, reports
    written with the MiB columns."""
    argv = ["--op", "attn_bwd", "--bwd-quick", "--bwd-peers", "flash,efficient", "--warmup-ms", "2", "--rep-ms", "5",
            "--rounds", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    for suite in ("backward", "fwd-bwd"):
        results = json.loads((tmp_path / f"attn_bwd.{suite}.json").read_text())["results"]
        assert len(results) == 8
        for r in results:
            assert r["check"]["status"] == "ok", r["check"]
            for name in ("flashcore", "default", "flash"):
                assert "ms" in r["impls"][name] and r["impls"][name]["mib"] > 0, (name, r["impls"])
        md = (tmp_path / f"attn_bwd.{suite}.md").read_text()
        assert "FlashCore MiB" in md and "SDPA-flash MiB" in md and "FC/SDPA-flash" in md
        assert "flashcore_mib" in (tmp_path / f"attn_bwd.{suite}.csv").read_text()
