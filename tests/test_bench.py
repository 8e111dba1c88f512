"""flashcore-bench's pure parts, on the CPU: the case matrix, FLOP counting, formatting, --list."""
import csv
import json

import pytest

from flashcore import forward
from flashcore.tools import bench


def test_matrix_keeps_tokens_and_hidden_constant():
    cases = bench.build_matrix(["bf16", "fp16"], [64, 128, 256], bench.SEQLENS, (False, True), gqa=True)
    assert len(cases) == 2 * (3 + 1) * 2 * len(bench.SEQLENS)
    assert len(set(cases)) == len(cases)
    for case in cases:
        assert case.batch * case.seqlen == bench.TOKENS
        if case.heads_q == case.heads_kv:
            assert case.heads_q * case.head_dim == bench.HIDDEN
    gqa = [c for c in cases if c.heads_q != c.heads_kv]
    assert {(c.heads_q, c.heads_kv, c.head_dim) for c in gqa} == {(32, 8, 128)}
    assert {c.causal for c in gqa} == {False, True} and {c.dtype for c in gqa} == {"bf16", "fp16"}
    assert {c.seqlen for c in gqa} == set(bench.SEQLENS)


def test_matrix_options():
    cases = bench.build_matrix(["bf16"], [128], [4096], (True,), gqa=False)
    assert cases == [bench.Case("bf16", 128, True, 4, 16, 16, 4096)]


def test_flops():
    assert forward.flops(1, 1, 1, 1, 1, False) == 4
    assert forward.flops(4, 16, 4096, 4096, 128, False) == 4 * 4 * 16 * 4096 * 4096 * 128
    assert forward.flops(4, 16, 4096, 4096, 128, True) == 2 * 4 * 16 * 4096 * 4096 * 128
    case = bench.Case("bf16", 128, True, 4, 32, 8, 4096)
    assert case.flops == forward.flops(4, 32, 4096, 4096, 128, True)   # query heads count


def fake_results():
    impls = ["flashcore", "cudnn", "flash", "efficient", "flex"]
    case = bench.Case("bf16", 128, False, 4, 16, 16, 4096)
    timed = {"flashcore": 2.0, "cudnn": 1.0, "flash": 2.5, "flex": 1.6}
    ok = bench.add_ratios({**bench.asdict(case), "gflop": case.flops / 1e9,
                           "check": {"status": "ok", "ref": "cudnn", "max_err": 3e-3, "rel_err": 4e-3},
                           "impls": {**{n: {"ms": ms, "tflops": case.flops / ms / 1e9} for n, ms in timed.items()},
                                     "efficient": {"error": "RuntimeError: No available kernel"}}})
    gqa = bench.Case("fp16", 128, True, 4, 32, 8, 4096)
    bad = bench.add_ratios({**bench.asdict(gqa), "gflop": gqa.flops / 1e9,
                            "check": {"status": "WRONG", "ref": "flash", "max_err": 0.9, "rel_err": 1.3},
                            "impls": {"flashcore": {"ms": 1.0, "tflops": 500.0}, "flash": {"ms": 2.0, "tflops": 250.0},
                                      "cudnn": {"error": "x"}, "efficient": {"error": "y"}, "flex": {"error": "z"}}})
    return impls, [ok, bad]


def test_ratios():
    _, (ok, bad) = fake_results()
    assert ok["best_peer"] == "cudnn" and ok["vs_best"] == pytest.approx(0.5) and ok["vs_cudnn"] == pytest.approx(0.5)
    assert bad["best_peer"] == "flash" and bad["vs_best"] == pytest.approx(2.0) and bad["vs_cudnn"] is None
    assert bench.add_ratios({"impls": {"flashcore": {"error": "e"}, "cudnn": {"ms": 1.0}}})["vs_best"] is None


def test_text_table():
    impls, results = fake_results()
    text = bench.format_table(results, impls)
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1   # header, rule, two rows, aligned
    assert "FlashCore ms/TF" in lines[0] and "FC/cuDNN" in lines[0]
    assert "2.000 / 275" in lines[2] and "n/a" in lines[2] and "0.50" in lines[2] and "cuDNN" in lines[2]
    assert "WRONG rel=1.3e+00" in lines[3] and "32/8" in lines[3]


def test_markdown_and_files(tmp_path):
    impls, results = fake_results()
    meta = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-30", "torch": "2.11.0", "triton": "3.6.0",
            "cudnn": 91900, "flashcore": "0.1.0", "flash_attn": "not installed", "command": "flashcore-bench --quick",
            "warmup_ms": 10.0, "rep_ms": 40.0}
    md = bench.format_markdown(results, impls, meta)
    assert "NVIDIA H100 80GB HBM3" in md and "2026-11-30" in md and "torch 2.11.0" in md and "triton 3.6.0" in md
    assert "`flashcore-bench --quick`" in md
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 4 and len({row.count("|") for row in rows}) == 1

    bench.write_outputs(tmp_path, results, impls, meta)
    assert (tmp_path / "bench.md").read_text() == md
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"] == meta and len(saved["results"]) == 2
    with open(tmp_path / "bench.csv") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 2
    assert records[0]["cudnn_ms"] == "1.0" and records[0]["efficient_error"].startswith("RuntimeError")
    assert records[1]["check"] == "WRONG" and records[1]["heads_kv"] == "8" and records[1]["vs_cudnn"] == ""


def test_short_error():
    class W:
        message = "Efficient attention does not support enable_gqa\nmore"
    text = bench.short_error(RuntimeError("No available kernel.  Aborting execution.\ntrace"), [W()])
    assert text == "RuntimeError: No available kernel.  Aborting execution. (Efficient attention does not support enable_gqa)"


def test_list_runs_without_gpu(capsys):
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "96 cases" in out and "H=32/8" in out and "S=16384" in out
    assert bench.main(["--list", "--quick", "--peers", "cudnn,flex"]) == 0
    assert "8 cases x 3 impls" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--list", "--peers", "xformers"])
    with pytest.raises(SystemExit):
        bench.main(["--list", "--head-dims", "96"])
