"""flashcore-bench on the CPU: suite discovery through the op registry, the forward op's suites (case matrix, FLOPs,
--list), ratios and reports, and a whole run of a fake suite registered here (GPU calls stubbed)."""
import argparse
import csv
import json
from dataclasses import asdict, dataclass

import pytest
import torch

from flashcore import ops
from flashcore.ops.attn_fwd import bench as attn_bench
from flashcore.ops.attn_fwd.call import AttnFwdCall
from flashcore.tools import bench
from flashcore.tools.bench_suite import Case, Prepared, Suite, or_failing

PREFILL, HOST = attn_bench.SUITES


# ---------------------------------------------------------------------------------------------- attn_fwd suites

def test_matrix_keeps_tokens_and_hidden_constant():
    calls = attn_bench.build_matrix(["bf16", "fp16"], [64, 128, 256], attn_bench.SEQLENS, (False, True), gqa=True)
    assert len(calls) == 2 * (3 + 1) * 2 * len(attn_bench.SEQLENS)
    assert len(set(calls)) == len(calls)
    for call in calls:
        assert call.batch * call.seqlen_q == attn_bench.TOKENS and call.seqlen_k == call.seqlen_q
        if call.heads_q == call.heads_kv:
            assert call.heads_q * call.head_dim == attn_bench.HIDDEN
    gqa = [c for c in calls if c.heads_q != c.heads_kv]
    assert {(c.heads_q, c.heads_kv, c.head_dim) for c in gqa} == {(32, 8, 128)}
    assert {c.causal for c in gqa} == {False, True} and {c.dtype for c in gqa} == {"bf16", "fp16"}
    assert {c.seqlen_q for c in gqa} == set(attn_bench.SEQLENS)


def test_matrix_options():
    calls = attn_bench.build_matrix(["bf16"], [128], [4096], (True,), gqa=False)
    assert calls == [AttnFwdCall(4, 4096, 4096, 16, 16, 128, "bf16", True)]


def test_case_work_is_the_calls_flops():
    call = AttnFwdCall(4, 4096, 4096, 32, 8, 128, "bf16", True)
    assert call.flops == 2 * 4 * 32 * 4096 * 4096 * 128   # query heads count, causal halves
    assert AttnFwdCall(1, 1, 1, 1, 1, 16).flops == 64
    case = attn_bench.case_of(call)
    assert case.work == call.flops and dict(case.columns)["H q/kv"] == "32/8" and "causal" in case.label


def test_host_suite_cases():
    calls = [c.call for c in HOST.cases(None)]
    assert {(c.batch, c.seqlen_q, c.seqlen_k) for c in calls} == {(1, 1, 1), (1, 128, 128), (8, 512, 512)}
    assert {c.causal for c in calls} == {False, True} and len(calls) == 6
    assert {(c.heads_q, c.heads_kv, c.head_dim, c.dtype) for c in calls} == {(32, 32, 128, "bf16")}
    assert HOST.timing == "host" and HOST.impls(None) == ["flashcore", "sdpa"]


def test_list_runs_without_gpu(capsys):
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "attn_fwd/prefill" in out and "attn_fwd/host" in out
    assert "96 cases" in out and "H=32/8" in out and "S=16384" in out
    assert "6 cases x 2 impls (flashcore, sdpa)" in out and "B=8  H=32/32 S=512" in out
    assert bench.main(["--list", "--suite", "prefill", "--quick", "--peers", "cudnn,flex"]) == 0
    out = capsys.readouterr().out
    assert "8 cases x 4 impls (flashcore, default, cudnn, flex)" in out and "attn_fwd/host" not in out
    assert bench.main(["--list", "--op", "attn_fwd", "--suite", "host"]) == 0
    out = capsys.readouterr().out
    assert "attn_fwd/host" in out and "attn_fwd/prefill" not in out
    assert bench.main(["--list", "--suite", "prefill", "--quick", "--peers", "none", "--no-default"]) == 0
    assert "8 cases x 1 impls (flashcore)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--peers", "xformers"], ["--head-dims", "96"], ["--dtypes", "fp8"],
                                  ["--suite", "nosuch"], ["--op", "nosuch"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        bench.main(["--list", *argv])


# ---------------------------------------------------------------------------------------------- ratios, reports

def result_of(suite, call, timed: dict, check):
    """A result as run_case makes it: impl -> ms (a float) or an error (a string)."""
    case = attn_bench.case_of(call)
    impls = {n: {"ms": v, "rate": case.work / v / 1e9} if isinstance(v, float) else {"error": v}
             for n, v in timed.items()}
    return bench.add_ratios({"case": asdict(call), "columns": case.columns, "label": case.label,
                             "work": case.work, "check": check, "impls": impls}, suite)


def fake_results():
    impls = ["flashcore", "default", "cudnn", "flash", "efficient", "flex"]
    ok = result_of(PREFILL, AttnFwdCall(4, 4096, 4096, 16, 16, 128, "bf16", False),
                   {"flashcore": 2.0, "default": 2.2, "cudnn": 1.0, "flash": 2.5, "flex": 1.6,
                    "efficient": "RuntimeError: No available kernel"},
                   {"status": "ok", "max_err": 3e-3, "tolerance": 2e-2})
    bad = result_of(PREFILL, AttnFwdCall(4, 4096, 4096, 32, 8, 128, "fp16", True),
                    {"flashcore": 1.0, "default": 0.5, "flash": 2.0, "cudnn": "x", "efficient": "y", "flex": "z"},
                    {"status": "WRONG", "max_err": 0.9, "tolerance": 2e-2})
    return impls, [ok, bad]


def test_ratios():
    _, (ok, bad) = fake_results()
    assert ok["best_peer"] == "cudnn"    # the faster default is a variant, never the best peer
    assert ok["ratios"] == pytest.approx({"best": 0.5, "cudnn": 0.5, "default": 1.1})
    assert bad["best_peer"] == "flash" and bad["ratios"]["best"] == pytest.approx(2.0)
    assert bad["ratios"]["cudnn"] is None and bad["ratios"]["default"] == pytest.approx(0.5)
    failed = bench.add_ratios({"impls": {"flashcore": {"error": "e"}, "cudnn": {"ms": 1.0}}}, PREFILL)
    assert failed["best_peer"] == "cudnn" and set(failed["ratios"].values()) == {None}


def test_host_ratio_is_flashcore_time_over_sdpa():
    result = bench.add_ratios({"impls": {"flashcore": {"host_us": 30.0, "latency_us": 50.0},
                                         "sdpa": {"host_us": 20.0, "latency_us": 45.0}}}, HOST)
    assert result["best_peer"] == "sdpa" and result["ratios"] == {"sdpa": pytest.approx(1.5)}


def test_text_table():
    impls, results = fake_results()
    text = bench.format_table(results, PREFILL, impls)
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1   # header, rule, two rows, aligned
    assert "FlashCore ms/TF" in lines[0] and "FC/cuDNN" in lines[0] and "tuned/default" in lines[0]
    assert "2.000 / 275" in lines[2] and "n/a" in lines[2] and "0.50" in lines[2] and "cuDNN" in lines[2]
    assert "1.10" in lines[2]
    assert "WRONG 9.0e-01 > 2.0e-02" in lines[3] and "32/8" in lines[3]
    # without the default impl its ratio column goes too
    assert "tuned/default" not in bench.format_table(results, PREFILL, ["flashcore", "cudnn"])


META = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-30", "torch": "2.11.0", "triton": "3.6.0",
        "cudnn": 91900, "flashcore": "0.1.0", "peers": {"flash-attn": "not installed"}, "unit": "TFLOP/s",
        "timing": "device", "command": "flashcore-bench --quick", "warmup_ms": 10.0, "rep_ms": 40.0, "rounds": 3,
        "flush": "write"}


def test_markdown_and_files(tmp_path):
    impls, results = fake_results()
    md = bench.format_markdown(results, PREFILL, impls, META)
    assert "Prefill forward: NVIDIA H100 80GB HBM3, 2026-11-30" in md and "torch 2.11.0" in md
    assert "triton 3.6.0" in md and "flash-attn: not installed" in md and "`flashcore-bench --quick`" in md
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 4 and len({row.count("|") for row in rows}) == 1

    bench.write_outputs(tmp_path, "attn_fwd.prefill", results, PREFILL, impls, META)
    assert (tmp_path / "attn_fwd.prefill.md").read_text() == md
    saved = json.loads((tmp_path / "attn_fwd.prefill.json").read_text())
    assert saved["meta"] == META and len(saved["results"]) == 2 and saved["results"][1]["case"]["heads_kv"] == 8
    with open(tmp_path / "attn_fwd.prefill.csv") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 2
    assert records[0]["cudnn_ms"] == "1.0" and records[0]["efficient_error"].startswith("RuntimeError")
    assert records[1]["check"] == "WRONG" and records[1]["heads_kv"] == "8" and records[1]["vs_cudnn"] == ""
    assert float(records[0]["vs_default"]) == pytest.approx(1.1)


def test_host_markdown():
    call = HOST.cases(None)[0].call
    case = attn_bench.case_of(call)
    result = bench.add_ratios({"case": asdict(call), "columns": case.columns, "label": case.label, "work": 0.0,
                               "check": {"status": "ok"},
                               "impls": {"flashcore": {"host_us": 12.0, "latency_us": 30.0},
                                         "sdpa": {"host_us": 10.0, "latency_us": 25.5}}}, HOST)
    md = bench.format_markdown([result], HOST, HOST.impls(None), {**META, "peers": {}})
    assert "FlashCore host/lat us" in md and "FC/SDPA host" in md and "12.0 / 30.0" in md and "| 1.20 |" in md
    assert "CPU time to issue one call" in md


def test_short_error():
    class W:
        message = "Efficient attention does not support enable_gqa\nmore"
    text = bench.short_error(RuntimeError("No available kernel.  Aborting execution.\ntrace"), [W()])
    assert text == "RuntimeError: No available kernel.  Aborting execution. (Efficient attention does not support enable_gqa)"


# ---------------------------------------------------------------------------------------------- a suite of our own

@dataclass(frozen=True)
class Copy:
    n: int


class CopySuite(Suite):
    """Copies n GB; each impl's callable returns the milliseconds the stubbed timer reports for it."""
    name = "copy"
    title = "Fake copy"
    unit = "GB/s"
    labels = {"flashcore": "FlashCore", "peer": "Peer", "broken": "Broken"}
    ratios = {"best": "FC/best", "peer": "FC/peer"}

    def add_arguments(self, group):
        group.add_argument("--copy-sizes", default="1,2", help="comma list of GB")

    def cases(self, args):
        sizes = args.copy_sizes.split(",")
        return [Case(Copy(int(n)), (("GB", n),), f"copy {n} GB", work=int(n) * 1e9) for n in sizes]

    def setup(self, case, impls):
        def broken():
            raise ImportError("no such peer")
        fns = {"flashcore": lambda: 1.0 * case.call.n, "peer": lambda: 2.0 * case.call.n,
               "broken": or_failing(broken)}
        return Prepared({name: fns[name] for name in impls}, check=lambda: {"status": "ok"})


SUITES = [CopySuite()]


@pytest.fixture
def copy_op(monkeypatch):
    """An op registered for this test only, whose suites are this module's SUITES."""
    monkeypatch.setattr(ops, "REGISTRY", dict(ops.REGISTRY))
    monkeypatch.setattr(ops, "_loaded", dict(ops._loaded))
    return ops.register(ops.Op(name="copy_test", kernels=(), call_type=Copy, axes=(), tunables=(),
                               default_config=lambda spec: {}, spec_of=lambda call, cc: None,
                               bench=f"{__name__}:SUITES", metric_unit="GB/s"))


def test_registered_suite_lists(copy_op, capsys):
    assert bench.main(["--list", "--op", "copy_test", "--copy-sizes", "3,5"]) == 0
    out = capsys.readouterr().out
    assert "copy_test/copy: Fake copy" in out and "copy 5 GB" in out and "5.00 GB" in out
    assert "2 cases x 3 impls (flashcore, peer, broken)" in out and "attn_fwd" not in out
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "copy_test/copy" in out and "attn_fwd/prefill" in out


def test_registered_suite_runs(copy_op, monkeypatch, tmp_path):
    """The harness end to end on the CPU: device timing stubbed to what each callable returns."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    flushes = []
    monkeypatch.setattr(bench, "device_ms", lambda fn, warmup_ms, rep_ms, flush: flushes.append(flush) or fn())
    found = bench.discover()
    argv = ["--op", "copy_test", "--out", str(tmp_path)]
    parser = bench.build_parser(found)
    (sel,) = bench.select(parser, parser.parse_args(argv), found)
    results, interrupted = bench.run_suite(sel, argv, parser.parse_args(argv))
    assert set(flushes) == {"write"}                      # the suite's own: do_bench's
    assert not interrupted and len(results) == 2
    first = results[0]
    assert first["impls"]["flashcore"] == {"ms": 1.0, "rate": pytest.approx(1000.0)}   # 1 GB in 1 ms
    assert first["impls"]["broken"]["error"] == "ImportError: no such peer"
    assert first["best_peer"] == "peer" and first["ratios"] == {"best": 2.0, "peer": 2.0}
    md = (tmp_path / "copy_test.copy.md").read_text()
    assert "Fake copy" in md and "FlashCore ms/GB/s" in md and "median ms / GB/s" in md and "L2 dirty" in md
    assert json.loads((tmp_path / "copy_test.copy.json").read_text())["results"][1]["case"] == {"n": 2}
    # --flush overrides the suite's, and the report says which one timed it
    flushes.clear()
    argv += ["--flush", "read"]
    bench.run_suite(sel, argv, parser.parse_args(argv))
    assert set(flushes) == {"read"} and "L2 left clean" in (tmp_path / "copy_test.copy.md").read_text()


class MemoryCopySuite(CopySuite):
    """The copy suite with peak memory on: the stubbed peak_mib reports 100 MiB per GB."""
    name = "copy-memory"
    memory = True

    def add_arguments(self, group):   # the options are CopySuite's
        pass


def test_memory_columns(monkeypatch, tmp_path):
    """Suite.memory: each impl's peak_mib, measured once after its first call and before timing, lands in the
    impl's result ('mib'), the table and markdown ("<label> MiB" columns), the CSV (<impl>_mib) and the JSON; an impl
    that failed has none (n/a). A suite without it has no such column."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    order = []
    monkeypatch.setattr(bench, "device_ms", lambda fn, warmup_ms, rep_ms, flush: order.append("time") or fn())
    monkeypatch.setattr(bench, "peak_mib", lambda fn: order.append("memory") or 100.0 * fn())
    args = argparse.Namespace(rounds=1, warmup_ms=1.0, rep_ms=1.0, flush=None, out=str(tmp_path))
    suite = MemoryCopySuite()
    case = suite.cases(argparse.Namespace(copy_sizes="2"))[0]
    impls = ["flashcore", "peer", "broken"]
    result = bench.run_case(suite, case, impls, args)
    assert order == ["memory", "memory", "time", "time"]
    assert result["impls"]["flashcore"] == {"ms": 2.0, "rate": pytest.approx(1000.0), "mib": 200.0}
    assert result["impls"]["peer"]["mib"] == 400.0 and "mib" not in result["impls"]["broken"]
    text = bench.format_table([result], suite, impls)
    assert "FlashCore MiB" in text and "Peer MiB" in text and "Broken MiB" in text
    row = text.splitlines()[2].split()
    assert row[-7:] == ["200", "400", "n/a", "2.00", "Peer", "2.00", "ok"]    # MiB after the timing cells
    md = bench.format_markdown([result], suite, impls, {**META, "unit": "GB/s"})
    assert "| FlashCore MiB |" in md and "MiB: the peak device memory one call allocates" in md
    bench.write_outputs(tmp_path, "copy", [result], suite, impls, {**META, "unit": "GB/s"})
    with open(tmp_path / "copy.csv") as f:
        (record,) = list(csv.DictReader(f))
    assert record["flashcore_mib"] == "200.0" and record["peer_mib"] == "400.0" and record["broken_mib"] == ""
    assert json.loads((tmp_path / "copy.json").read_text())["results"][0]["impls"]["peer"]["mib"] == 400.0
    plain = bench.run_case(CopySuite(), case, impls, args)
    assert "mib" not in plain["impls"]["flashcore"] and "MiB" not in bench.format_table([plain], CopySuite(), impls)
    assert "flashcore_mib" not in bench.csv_records([plain], CopySuite(), impls)[0]


def test_device_timing_takes_the_median_of_rounds_with_the_impls_in_turns(monkeypatch):
    """Each impl is timed in --rounds rounds of rep_ms / rounds, in an order that rotates from round to round, and
    its cell is the median round: one slow stretch of the GPU lands on one round of every impl, not on one impl."""
    calls = []
    slow = iter([9.0] + [1.0] * 8)                        # the first round's first impl hits a slow stretch

    def timed(fn, warmup_ms, rep_ms, flush):
        calls.append((fn(), rep_ms))
        return next(slow)
    monkeypatch.setattr(bench, "device_ms", timed)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    args = argparse.Namespace(rounds=3, warmup_ms=10.0, rep_ms=30.0, flush=None)
    fns = {name: (lambda name=name: name) for name in ("a", "b", "c")}
    got = bench.time_impls(fns, Suite(), Case(call=None, columns=(), label="x", work=1e9), args)
    assert [name for name, _ in calls] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {rep for _, rep in calls} == {10.0}
    assert got["a"]["ms"] == 1.0 and got["b"]["ms"] == 1.0     # the slow round is outvoted


def test_rounds_must_be_positive(capsys):
    parser = bench.build_parser(bench.discover())
    with pytest.raises(SystemExit):
        bench.select(parser, parser.parse_args(["--rounds", "0"]), bench.discover())
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_host_timing_samples_the_impls_in_turns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []
    got = bench.host_us({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, calls=4, repeats=3)
    assert calls[:8] == ["a"] * 4 + ["b"] * 4                                  # warm-up
    samples = calls[8:8 + 3 * 8]
    assert samples == ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4 + ["a"] * 4 + ["b"] * 4    # order rotates
    assert calls[8 + 3 * 8:] == ["a", "b", "b", "a"] * 2                       # latencies, interleaved
    assert set(got) == {"a", "b"} and all(r["host_us"] > 0 and r["latency_us"] > 0 for r in got.values())


def test_check_uses_the_float64_reference_and_catches_a_wrong_row(cpu_only):
    """The bench's correctness check: the shared reference and tolerance rule, on the first and last rows."""
    import flashcore
    from flashcore.ops.attn_fwd.bench import check_against_reference
    call = AttnFwdCall(2, 150, 150, 4, 2, 32, "fp16", causal=True)
    q = torch.randn(2, 150, 4, 32, dtype=torch.float16)
    k, v = torch.randn(2, 150, 2, 32, dtype=torch.float16), torch.randn(2, 150, 2, 32, dtype=torch.float16)
    right = flashcore.flash_attn_func(q, k, v, causal=True)
    assert check_against_reference(call, (q, k, v), lambda: right)["status"] == "ok"
    for row in (3, 149):                               # one wrong row at either checked end
        wrong = right.clone()
        wrong[0, row, 1] += 0.5
        result = check_against_reference(call, (q, k, v), lambda: wrong)
        assert result["status"] == "WRONG" and result["max_err"] > result["tolerance"]


def test_verdict_is_decided_by_the_pair_furthest_over_its_tolerance():
    from flashcore.tools.bench_suite import verdict
    assert verdict([(0.020, 0.017), (0.025, 0.030)]) == {"status": "WRONG", "max_err": 0.020, "tolerance": 0.017}
    assert verdict([(0.001, 0.01), (0.009, 0.01)])["max_err"] == 0.009
    assert verdict([(0.001, 0.01), (float("nan"), 0.01)])["status"] == "WRONG"
