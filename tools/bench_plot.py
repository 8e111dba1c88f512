"""Plots of flashcore-bench reports: FlashCore beside its peers, one chart per suite, from the JSON a run writes.

    flashcore-bench ... --plot                     # after the run: <op>.<suite>.png beside the .json / .md
    flashcore-bench --replot bench_out/*.json      # plots of saved reports (no GPU needed)

A device-timed suite gives throughput (the suite's unit: TFLOP/s or GB/s) per case, one bar per implementation,
FlashCore's first; a host-timed suite gives each call's host time (us). Cases beyond PANEL_CASES go to further
panels, one below the other, so a 96-case matrix stays readable. n/a cells (a peer that cannot run a case) are left
empty. matplotlib is the bench extra's (`pip install flashcore[bench]`).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

PANEL_CASES = 16           # cases per panel
WRAP_CASES = 10            # up to this many cases a panel, tick labels are wrapped upright; beyond, slanted
COLORS = {"flashcore": "#d62728", "default": "#ff9896"}     # FlashCore red, its default config light red
PEER_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#ff7f0e", "#17becf", "#7f7f7f", "#bcbd22", "#e377c2")


def case_labels(results: list[dict]) -> list[str]:
    """Each case's tick label: its table columns that differ between the cases ("causal=yes S=2048"), every
    column where none differ."""
    columns = [dict(r["columns"]) for r in results]
    varying = [h for h in columns[0] if len({c.get(h) for c in columns}) > 1] if columns else []
    return [" ".join(f"{h}={c[h]}" for h in (varying or c)) for c in columns]


def plot_report(report: dict, out: Path, title: str, labels: dict[str, str] | None = None) -> Path:
    """Draw `report` ({"meta", "results"} as written by flashcore-bench) to `out` (PNG); returns out."""
    import matplotlib
    matplotlib.use("Agg")                       # files only: no display on a GPU machine or in CI
    import matplotlib.pyplot as plt

    labels = labels or {}
    meta, results = report["meta"], report["results"]
    host = meta.get("timing") == "host"
    metric, unit = ("host_us", "host us per call") if host else ("rate", meta["unit"])
    impls = list(dict.fromkeys(i for r in results for i in r["impls"]))
    panels = [results[i:i + PANEL_CASES] for i in range(0, len(results), PANEL_CASES)] or [[]]
    per_panel = min(len(results), PANEL_CASES)
    inches_per_case = 1.5 if per_panel <= WRAP_CASES else 0.9       # wrapped labels need the room
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, inches_per_case * per_panel + 3), 4.2 * len(panels)),
                             squeeze=False)
    width = 0.8 / max(len(impls), 1)
    peers = [i for i in impls if i not in COLORS]
    colors = {**COLORS, **{i: PEER_COLORS[n % len(PEER_COLORS)] for n, i in enumerate(peers)}}
    ticks = case_labels(results)
    for p, (ax, cases) in enumerate(zip(axes[:, 0], panels)):
        for k, impl in enumerate(impls):
            xs = [n + (k - (len(impls) - 1) / 2) * width for n in range(len(cases))]
            ys = [(r["impls"].get(impl) or {}).get(metric) for r in cases]
            ax.bar([x for x, y in zip(xs, ys) if y], [y for y in ys if y], width,
                   label=labels.get(impl, impl), color=colors[impl])
        ax.set_xticks(range(len(cases)))
        names = ticks[p * PANEL_CASES:p * PANEL_CASES + len(cases)]
        if len(cases) <= WRAP_CASES:
            ax.set_xticklabels([textwrap.fill(n, 16) for n in names], fontsize=8)
        else:
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))     # beside the bars, not on them
    axes[0, 0].set_title(f"{title}: {meta['device']}, {meta['date']} (torch {meta['torch']}, triton "
                         f"{meta['triton']})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def replot(paths: list[str], titles: dict[str, str], labels: dict[str, dict[str, str]]) -> list[Path]:
    """A PNG beside each saved report <op>.<suite>.json; `titles` / `labels` by "<op>.<suite>" (the registered
    suites'), else the file's stem and the implementations' own names."""
    written = []
    for path in map(Path, paths):
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or not {"meta", "results"} <= report.keys():
            raise ValueError(f"{path}: not a flashcore-bench report (expected the JSON with 'meta' and 'results')")
        written.append(plot_report(report, path.with_suffix(".png"), titles.get(path.stem, path.stem),
                                   labels.get(path.stem)))
    return written
