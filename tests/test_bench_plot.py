"""flashcore-bench's plots (tools/bench_plot.py): a PNG per report, from a run (--plot) or a saved JSON (--replot),
readable tick labels, n/a cells left out, bad files refused by name. No GPU: reports are made up here."""
from __future__ import annotations

import json

import pytest

from flashcore.tools import bench
from flashcore.tools.bench_plot import PANEL_CASES, case_labels, plot_report

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report(cases: int, timing: str = "device") -> dict:
    """A report as flashcore-bench writes it: `cases` cases, FlashCore and two peers, one of them n/a on case 0."""
    metric = "host_us" if timing == "host" else "rate"
    results = []
    for n in range(cases):
        impls = {"flashcore": {metric: 100.0 + n}, "cudnn": {metric: 90.0 + n}, "flex": {metric: 80.0}}
        if n == 0:
            impls["flex"] = {"error": "RuntimeError: not supported"}
        results.append({"case": {"seqlen": 512 * (n + 1)},
                        "columns": [["dtype", "bf16"], ["D", "128"], ["S", str(512 * (n + 1))]],
                        "label": f"S={512 * (n + 1)}", "work": 1e12, "check": {"status": "ok"}, "impls": impls,
                        "best_peer": "cudnn", "ratios": {}})
    meta = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-07", "torch": "2.11", "triton": "3.6",
            "unit": "TFLOP/s", "timing": timing}
    return {"meta": meta, "results": results}


@pytest.mark.parametrize("timing", ["device", "host"])
def test_a_report_becomes_a_png(tmp_path, timing):
    out = plot_report(report(3, timing), tmp_path / "op.suite.png", "Prefill forward", {"flashcore": "FlashCore"})
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_many_cases_go_to_several_panels(tmp_path):
    import matplotlib.pyplot as plt
    before = plt.get_fignums()
    small = plot_report(report(PANEL_CASES), tmp_path / "small.png", "t")
    large = plot_report(report(2 * PANEL_CASES + 1), tmp_path / "large.png", "t")
    from PIL import Image
    heights = [Image.open(p).size[1] for p in (small, large)]
    assert heights[1] > 2.5 * heights[0]          # three panels, one below the other
    assert plt.get_fignums() == before           # figures are closed: a long run does not pile them up


def test_tick_labels_name_what_differs_between_cases():
    assert case_labels(report(2)["results"]) == ["S=512", "S=1024"]
    assert case_labels(report(1)["results"]) == ["dtype=bf16 D=128 S=512"]


def test_replot_writes_beside_each_report_and_refuses_other_files(tmp_path, capsys):
    saved = tmp_path / "attn_bwd.backward.json"
    saved.write_text(json.dumps(report(4)))
    assert bench.main(["--replot", str(saved)]) == 0
    assert (tmp_path / "attn_bwd.backward.png").read_bytes().startswith(PNG_MAGIC)
    assert "attn_bwd.backward.png" in capsys.readouterr().out
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"records": []}))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--replot", str(other)])
    assert exc.value.code == 2 and "not a flashcore-bench report" in capsys.readouterr().err
