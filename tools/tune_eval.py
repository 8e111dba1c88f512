"""flashcore-tune heldout / compare: evaluate tuned configs on untuned shapes, and Optuna against a full grid."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from flashcore import ops

from .tune_common import (Progress, UsageError, _options, _setup, geomean, plan_title, short_bucket,
                          short_config, short_spec, writable_db_path, write_report)


# -------------------------------------------------------------------------------------------- heldout

def _extra_calls(tuning, spec, base, shapes: list[str], arch: int) -> list:
    """--shape "batch=3 seqlen_q=1536 ..." items: the spec's call (`base`) with those fields replaced; a shape
    whose fields would change the spec (e.g. heads_q against the GQA group) is a usage error."""
    out = []
    for text in shapes:
        try:
            call = dataclasses.replace(base, **ops.parse_fields(tuning.op, text.replace(",", " ").split()))
        except ValueError as e:
            raise UsageError(f"--shape {text!r}: {e}") from None
        if tuning.op.spec_of(call, arch) != spec:
            raise UsageError(f"--shape {text!r}: gives {tuning.op.spec_of(call, arch)}, not the plan's {spec}")
        out.append(call)
    return out


# a neighbour's config is validated for a bucket where it beats the default by more than timing noise
VALIDATION_MARGIN = 1.02


def cmd_heldout(args) -> int:
    """Default vs the config dispatch would choose (user DB / bundle / nearest bucket) on untuned shapes; with
    --validate, the outcome of each held-out bucket that has no record of its own is recorded as its record."""
    setup = _setup(args)
    if args.validate and not args.db:
        raise UsageError("--validate records into the tuning DB given by --db")
    if args.db:
        os.environ["FLASHCORE_TUNING_DB"] = str(writable_db_path(args) if args.validate else
                                                Path(args.db).expanduser())
    from flashcore import dispatch
    from flashcore.tuning import config_key
    from .tuner import time_configs
    dispatch.clear()
    opts = _options(args, setup["gpu"])
    specs, plan_buckets = [], {}
    for t, spec, bucket in setup["plan"]:
        if (t, spec) not in specs:
            specs.append((t, spec))
        plan_buckets.setdefault(spec.key(), []).append(bucket)
    calls = {}
    for t, spec in specs:
        buckets = plan_buckets[spec.key()]
        calls[spec] = ([t.call_of_bucket(spec, b) for b in buckets] if args.with_plan_buckets else []) \
            + t.heldout_calls(spec, buckets) \
            + _extra_calls(t, spec, t.call_of_bucket(spec, buckets[0]), args.shape, setup["arch"])
    rows = []
    t0 = time.time()
    progress = Progress(sum(len(c) for c in calls.values()), args.quiet)
    for t, spec in specs:
        tuned_calls = {t.call_of_bucket(spec, b) for b in plan_buckets[spec.key()]}
        for call in calls[spec]:
            label = f"{short_spec(spec.key())} {call.describe()}"
            progress.start(label, 1)
            bucket = t.op.bucket_of(call)
            row = {"op": t.name, "spec": spec.key(), "call": dataclasses.asdict(call), "shape": call.describe(),
                   "bucket": list(bucket), "kind": "plan bucket" if call in tuned_calls else "held-out"}
            try:
                problem = t.make_problem(spec, call, setup["device"])
                default = dict(t.op.default_config(problem.spec))
                choice = dispatch.explain(t.op, problem.spec, bucket, gpu=setup["gpu"])
                row.update(default_config=default, config=choice.config, source=choice.source,
                           record_bucket=list(choice.bucket) if choice.bucket else None, origin=choice.origin)
                if config_key(choice.config) == config_key(default):
                    ms = time_configs(problem, [default], opts, rounds=opts.verify_rounds,
                                      replays=3 * opts.verify_rounds)
                    row.update(default_ms=ms[0], ms=ms[0])
                else:
                    check = problem.check(choice.config)
                    if not check.ok:
                        row["note"] = f"chosen config wrong: error {check.error:.3g} > {check.tolerance:.3g}"
                    ms = time_configs(problem, [default, choice.config], opts, rounds=opts.verify_rounds,
                                      replays=3 * opts.verify_rounds)
                    row.update(default_ms=ms[0], ms=ms[1])
                row["speedup"] = row["default_ms"] / row["ms"]
                row["metric"] = problem.metric(row["ms"])
                if args.validate and choice.source in ("nearest bucket", "default") and "note" not in row:
                    row["validated"] = _record_validation(t, problem, choice, row, setup, args)
                del problem
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {e}")
            rows.append(row)
            if "validated" in row:
                label += f" -> recorded: {row['validated']}"
            line = (f"  {label}: {row.get('source', 'error')} {short_config(row.get('config', {}))} "
                    f"{row.get('ms', float('nan')):.4g} ms vs default {row.get('default_ms', float('nan')):.4g} ms "
                    f"({row.get('speedup', float('nan')):.3f}x)" + (f" {row['error']}" if "error" in row else ""))
            progress.finish(line)
    progress.close()
    def stats(kind):
        chosen = [r for r in rows if "speedup" in r and r["kind"] == kind]
        speedups = [r["speedup"] for r in chosen]
        return {"shapes": len(chosen), "geomean_speedup": geomean(speedups),
                "geomean_speedup_where_tuned": geomean([r["speedup"] for r in chosen if r["source"] != "default"]),
                "min_speedup": min(speedups, default=float("nan")),
                "slower_than_default": sum(1 for x in speedups if x < 1 - 0.02)}
    summary = {"gpu": setup["gpu"], "held_out": stats("held-out"), "plan_buckets": stats("plan bucket"),
               "errors": sum(1 for r in rows if "error" in r), "wall_s": time.time() - t0,
               "timing_valid": not args.interpret}
    h = summary["held_out"]
    text = (f"held-out: {h['shapes']} shapes, geomean speedup of dispatch's choice over the default "
            f"{h['geomean_speedup']:.3f}x ({h['geomean_speedup_where_tuned']:.3f}x where a record was used), min "
            f"{h['min_speedup']:.3f}x, {h['slower_than_default']} more than 2% slower")
    if args.with_plan_buckets:
        p = summary["plan_buckets"]
        text += (f"\nplan buckets re-measured: {p['shapes']} shapes, geomean {p['geomean_speedup']:.3f}x, min "
                 f"{p['min_speedup']:.3f}x, {p['slower_than_default']} more than 2% slower")
    print(text)
    if args.report:
        lines = [f"# Held-out shapes: {plan_title(args, setup['gpu'])}", "", text, "",
                 "| spec | shape | kind | bucket | source | record bucket | default | default ms | "
                 "chosen | chosen ms | speedup | metric |",
                 "| --- | --- | --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
        for r in rows:
            metric = "n/a" if args.interpret else f"{r.get('metric', 0):.1f}"     # the interpreter times no GPU
            lines.append(f"| {short_spec(r['spec'])} | {r['shape']} | "
                         f"{r['kind']} | {short_bucket(r['bucket'])} | {r.get('source', 'error')} | "
                         f"{short_bucket(r['record_bucket']) if r.get('record_bucket') else '-'} | "
                         f"{short_config(r.get('default_config', {}))} | {r.get('default_ms', float('nan')):.4g} | "
                         f"{short_config(r.get('config', {}))} | {r.get('ms', float('nan')):.4g} | "
                         f"{r.get('speedup', float('nan')):.3f} | {metric} |")
        write_report(args.report, "heldout", "\n".join(lines) + "\n", {"summary": summary, "shapes": rows})
    return 0


def _record_validation(tuning, problem, choice, row: dict, setup: dict, args) -> str:
    """Record a held-out bucket's measurement as its own record (tuner 'validated neighbour' or 'validated
    default'): the config dispatch chose there (a neighbour's) if it beat the default by VALIDATION_MARGIN, else the
    default. Dispatch then takes it as the bucket's exact record, before any nearest-bucket rule."""
    from flashcore.tuning_db import Record, TuningDB, provenance
    from .tuner import _gpu_full_name, _source_hash
    won = choice.source == "nearest bucket" and row["speedup"] >= VALIDATION_MARGIN
    config, ms = (choice.config, row["ms"]) if won else (row["default_config"], row["default_ms"])
    spec = problem.spec
    record = Record(gpu=setup["gpu"], template=tuning.op.name, template_hash=tuning.op.version_of(spec),
                    spec=spec.key(), bucket=tuple(row["bucket"]), config=dict(config), latency_ms=ms,
                    metric=problem.metric(ms), metric_unit=problem.metric_unit, default_config=row["default_config"],
                    default_ms=row["default_ms"], evaluations=2,
                    tuner="validated neighbour" if won else "validated default", timing_valid=not args.interpret,
                    source_hash=_source_hash(tuning, spec), **provenance(_gpu_full_name(problem.device)))
    with TuningDB(Path(args.db).expanduser()) as db:
        db.put(record)
    return record.tuner


# -------------------------------------------------------------------------------------------- compare

def cmd_compare(args) -> int:
    """Per bucket: exhaustive grid vs an Optuna study with fraction x the grid's evaluations."""
    setup = _setup(args)
    from .tuner import Study, compile_parallel, evaluate, time_configs
    # an op that tunes several kernels runs one study per kernel, not one over the product of their spaces, which
    # is what a grid would have to cover (attn_bwd: thousands of configs)
    several = sorted({t.name for t, _, _ in setup["plan"] if len(t.op.tuned_kernels) > 1})
    if several:
        print(f"compare: skipping {', '.join(several)}: its kernels are tuned in separate studies, and a grid over "
              f"the product of their spaces is not compared", file=sys.stderr)
    plan = [(t, spec, bucket) for t, spec, bucket in setup["plan"] if t.name not in several]
    if not plan:
        return 2
    opts = _options(args, setup["gpu"])
    rows = []
    t_all = time.time()
    for t, spec, bucket in plan:
        label = f"{t.name} {short_spec(spec.key())} {short_bucket(bucket)}"
        print(f"{label}:", flush=True)
        problem = t.make_problem(spec, t.call_of_bucket(spec, bucket), setup["device"])
        feasible = t.feasible_configs(problem.spec, bucket)
        key = functools.partial(t.launch_key, problem.spec, bucket)     # configs that launch alike: one entry
        # grid: every feasible config, compiled in parallel chunks, measured once each
        t0 = time.time()
        table: dict[tuple, float | None] = {}
        reasons: dict[tuple, str] = {}
        chunk = max(8, (opts.compile_threads or os.cpu_count() or 8))
        for i in range(0, len(feasible), chunk):
            part = feasible[i:i + chunk]
            compile_parallel(problem, part, opts.compile_threads or os.cpu_count() or 1)
            for config in part:
                ev = evaluate(problem, config, opts)
                table[key(config)] = ev.ms
                if ev.ms is None:
                    reasons[key(config)] = ev.reason
        grid_wall = time.time() - t0
        ok = {k: v for k, v in table.items() if v is not None}
        if not ok:
            print("  no config ran")
            continue
        grid_best_key = min(ok, key=ok.get)
        by_key = {key(c): c for c in feasible}
        # optuna: a fresh in-memory study with the budget
        budget = max(2, int(args.fraction * len(feasible)))
        t0 = time.time()
        study = Study(t, problem, bucket, opts, None, "compare")
        study.run(budget)
        optuna_wall = time.time() - t0
        best = study.best(1)[0]
        # head to head, interleaved: grid's best, Optuna's best, default
        default = dict(t.op.default_config(problem.spec))
        grid_best = dict(by_key[grid_best_key])
        heads = [grid_best, best.config, default]
        unique = list({key(c): c for c in heads}.values())     # the same config is timed once
        measured = time_configs(problem, unique, opts, rounds=opts.verify_rounds, replays=4 * opts.verify_rounds)
        times = [measured[[key(u) for u in unique].index(key(c))] for c in heads]
        # evaluations Optuna needed to come within 3% of the grid's best (by the grid's measurements)
        within = next((i + 1 for i, ev in enumerate(study.history)
                       if ev.ms is not None and ok.get(key(ev.config), math.inf) <= 1.03 * ok[grid_best_key]),
                      None)
        replay = replay_sampler(t, problem.spec, bucket, table, budget, args.replay_seeds, opts) \
            if args.replay_seeds else {}
        row = {"op": t.name, "spec": problem.spec.key(), "bucket": list(bucket),
               "feasible": len(feasible), "grid_evaluations": len(table), "grid_failures": len(table) - len(ok),
               "grid_best_config": grid_best, "grid_best_ms_in_grid": ok[grid_best_key], "grid_wall_s": grid_wall,
               "optuna_evaluations": study.evaluations, "optuna_trials": study.trials,
               "optuna_best_config": best.config, "optuna_best_ms_in_study": best.ms, "optuna_wall_s": optuna_wall,
               "evaluation_fraction": study.evaluations / max(len(table), 1),
               "head_to_head_ms": {"grid_best": times[0], "optuna_best": times[1], "default": times[2]},
               "optuna_vs_grid": times[1] / times[0], "default_vs_grid": times[2] / times[0],
               "optuna_within_3pct_after": within,
               "optuna_rank_in_grid": 1 + sum(1 for v in ok.values() if v < ok.get(key(best.config), math.inf)),
               "replay": replay,
               "grid_table": [{"config": by_key[k], "ms": v, **({"reason": reasons[k]} if k in reasons else {})} for k, v in sorted(table.items(), key=lambda kv: kv[1] or math.inf)]}
        rows.append(row)
        print(f"  grid: {len(table)} configs in {grid_wall:.0f}s, best {short_config(grid_best)} {times[0]:.4g} ms; "
              f"optuna: {study.evaluations} configs in {optuna_wall:.0f}s, best {short_config(best.config)} "
              f"{times[1]:.4g} ms ({row['optuna_vs_grid']:.3f}x the grid's best; within 3% after "
              f"{within} evaluations); default {times[2]:.4g} ms" +
              (f"; replay over {args.replay_seeds} seeds: {replay['within_3pct']:.0%} within 3%"
               if replay else ""), flush=True)
        del problem, study
    ratios = [r["optuna_vs_grid"] for r in rows]
    fracs = [r["evaluation_fraction"] for r in rows]
    summary = {"gpu": setup["gpu"], "buckets": len(rows), "worst_optuna_vs_grid": max(ratios, default=float("nan")),
               "geomean_optuna_vs_grid": geomean(ratios), "max_evaluation_fraction": max(fracs, default=float("nan")),
               "floor_met": bool(rows) and all(r <= 1.03 for r in ratios) and all(f <= 0.3 + 1e-9 for f in fracs),
               "wall_s": time.time() - t_all, "timing_valid": not args.interpret}
    text = (f"compare: {len(rows)} buckets; Optuna's best / grid's best: worst {summary['worst_optuna_vs_grid']:.3f}, "
            f"geomean {summary['geomean_optuna_vs_grid']:.3f}; Optuna used at most "
            f"{summary['max_evaluation_fraction']:.0%} of the grid's evaluations; floor (<= 1.03 with <= 30%): "
            f"{'met' if summary['floor_met'] else 'NOT met'}")
    print(text)
    if args.report:
        lines = [f"# Optuna vs exhaustive grid: {plan_title(args, setup['gpu'])}", "", text, "",
                 "| spec | bucket | grid evals | grid best | grid ms | grid wall s | optuna evals | optuna best | optuna ms "
                 "| optuna / grid | within 3% after | rank in grid | optuna wall s | default ms | replay: within 3% |",
                 "| --- | --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            h = r["head_to_head_ms"]
            rp = r["replay"]
            lines.append(f"| {short_spec(r['spec'])} | {short_bucket(r['bucket'])} | {r['grid_evaluations']} | "
                         f"{short_config(r['grid_best_config'])} | {h['grid_best']:.4g} | {r['grid_wall_s']:.0f} | "
                         f"{r['optuna_evaluations']} | {short_config(r['optuna_best_config'])} | {h['optuna_best']:.4g} | "
                         f"{r['optuna_vs_grid']:.3f} | {r['optuna_within_3pct_after']} | {r['optuna_rank_in_grid']} | "
                         f"{r['optuna_wall_s']:.0f} | {h['default']:.4g} | "
                         f"{(format(rp['within_3pct'], '.0%') + ' of ' + str(rp['seeds'])) if rp else '-'} |")
        lines += ["", "Head-to-head latencies are interleaved re-measurements of the three configs. 'within 3% after' "
                  "counts Optuna's evaluations until one was within 3% of the grid's best by the grid's own "
                  "measurements. 'replay' re-runs the same sampler on the grid's table with other seeds (no GPU)."]
        write_report(args.report, "compare", "\n".join(lines) + "\n", {"summary": summary, "buckets": rows})
    return 0


def replay_sampler(tunable, spec, bucket, table: dict, budget: int, seeds: int, opts) -> dict[str, Any]:
    """Run the tuner's Study on a lookup table instead of the GPU, for several seeds."""
    import dataclasses
    from flashcore.tuning import CheckResult, Problem
    from . import tuner
    ok = {k: v for k, v in table.items() if v is not None}
    best = min(ok.values())
    found, evals_needed = [], []

    def fake_evaluate(problem, config, o):
        ms = table.get(tunable.launch_key(spec, bucket, config))
        return tuner.Eval(config, ms, "" if ms is not None else "failed in grid")

    problem = Problem(spec=spec, call=None, bucket=bucket, work=1.0, metric_unit="TFLOP/s", n_sets=1,
                      runner=lambda c: (lambda i: None), check=lambda c: CheckResult(True, 0, 0), device="cpu")
    for s in range(seeds):
        study = tuner.Study(tunable, problem, bucket, dataclasses.replace(opts, seed=1000 + s), None,
                            f"replay{s}", evaluator=lambda config: fake_evaluate(problem, config, opts),
                            compiler=lambda configs: None)
        study.run(budget)
        b = study.best(1)
        found.append(b[0].ms / best if b else math.inf)
        evals_needed.append(next((i + 1 for i, ev in enumerate(study.history)
                                  if ev.ms is not None and ev.ms <= 1.03 * best), None))
    hits = [f for f in found if f <= 1.03]
    needed = sorted(e for e in evals_needed if e is not None)
    return {"seeds": seeds, "budget": budget, "within_3pct": len(hits) / max(len(found), 1),
            "median_ratio": sorted(found)[len(found) // 2] if found else None,
            "worst_ratio": max(found) if found else None,
            "median_evals_to_3pct": needed[len(needed) // 2] if needed else None}
