"""flashcore-tune: the engine on a fake template (failures never stop a run), and the whole pipeline on the CPU
interpreter: study -> DB -> dispatch picks the tuned config; resume; two worker processes; reports."""
from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path

import pytest
import torch

from flashcore import cli, dispatch, ops
from flashcore.generator import KernelSpec
from flashcore.ops.attn_fwd import OP as ATTN_FWD
from flashcore.tools import tune
from flashcore.tools.tune_storage import make_storage
from flashcore.tools.tuner import Study, TuneOptions, tune_bucket
from flashcore.tuning import CheckResult, Problem, Tuning, config_key
from flashcore.tuning_db import TuningDB, read_bundle

interpreter = pytest.mark.usefixtures("cpu_only")

BUCKET_ARGS = ["--kernels", "attn_fwd", "--feature", "causal=false", "--buckets", "64x64x4"]


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHCORE_BUNDLE_DIR", str(tmp_path / "no-bundles"))
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(tmp_path / "user.db"))
    dispatch.clear()
    yield {"db": tmp_path / "tuning.db", "journal": tmp_path / "studies.journal", "report": tmp_path / "report",
           "tmp": tmp_path}
    dispatch.clear()


# ------------------------------------------------------------------------------- engine on a fake template

@dataclasses.dataclass(frozen=True)
class FakeCall:
    n: int = 1


FAKE_OP = ops.register(ops.Op(
    name="fake_op", kernels=("attn_fwd",), call_type=FakeCall,      # a real template: real hashes, names
    axes=(ops.Axis("x", ("n",)), ops.Axis("y", ("n",)), ops.Axis("z", ("n",))),
    tunables=(ops.Param("A", (1, 2, 3, 5)), ops.Param("B", (1, 2, 4))),
    default_config=lambda spec: {"A": 1, "B": 1},
    spec_of=lambda call, arch: SPEC,
    is_feasible=lambda spec, config, bucket: "too big" if config["B"] == 4 else None))
SPEC = KernelSpec.make("fake_op", arch=0, dtype="fp16", head_dim=32, causal=False, window=False, softcap=False,
                       alibi=False, gqa_group=1, tma=False)


def fake_tunable(slow_default=True) -> Tuning:
    """A-values: 1 compiles fine, 2 gives wrong answers, 3 raises at launch; B=4 is statically infeasible."""
    space = {"A": [1, 2, 3, 5], "B": [1, 2, 4]}

    def latency(config):
        fast = 0.25 if config["A"] == 5 else 1.0
        return 0.002 * config["B"] * fast * (3 if slow_default and config == {"A": 1, "B": 1} else 1)

    def runner(config):
        def run(i):
            if config["A"] == 3:
                raise RuntimeError("PTXAS error: out of resources")
            time.sleep(latency(config))
        return run

    def check(config):
        runner(config)(0)
        wrong = config["A"] == 2
        return CheckResult(ok=not wrong, error=1.0 if wrong else 0.0, tolerance=1e-3)

    def make_problem(spec, call, device):
        return Problem(spec=spec, call=call, bucket=(64, 64, 4), work=1e6, metric_unit="TFLOP/s", n_sets=1,
                       runner=runner, check=check, device="cpu")

    return Tuning(op=FAKE_OP, plan_axes={}, search_space=lambda spec, bucket: space,
                  plan_buckets=lambda spec, interpret: [(64, 64, 4)], call_for=lambda features, coords: FakeCall(),
                  make_problem=make_problem)


def test_failures_fail_trials_never_the_run_and_default_is_a_candidate(tmp_path):
    tunable = fake_tunable()
    opts = TuneOptions(gpu="fakegpu", interpret=True, trials=8, batch=2, verify_rounds=1)
    db = TuningDB(tmp_path / "t.db")
    result = tune_bucket(tunable, SPEC, (64, 64, 4), opts, make_storage(str(tmp_path / "j.journal")), db, "cpu",
                         log=lambda line: None)
    assert result.status == "tuned", result.note
    assert result.feasible == 8 and result.evaluations == 8      # every feasible config, none twice
    assert result.failures == 4                                   # A=2 wrong answers, A=3 launch errors
    reasons = " ".join(h.get("reason", "") for h in result.history)
    assert "wrong answer" in reasons and "out of resources" in reasons
    assert result.config == {"A": 5, "B": 1}                      # the fastest correct config
    assert result.ms < result.default_ms
    record = db.get("fakegpu", SPEC.key(), FAKE_OP.version_of(SPEC), (64, 64, 4))
    assert record.config == {"A": 5, "B": 1} and record.timing_valid is False
    assert record.evaluations == 8 and record.trials >= 8
    assert record.default_config == {"A": 1, "B": 1}


def test_in_memory_run_skips_buckets_its_db_already_holds(tmp_path):
    """--storage memory keeps no studies: a re-run (e.g. the next device call of a plan tuned in slices) reads the
    bucket's record from the DB and measures nothing; more trials than the record saw tune it again."""
    tunable, db, evals = fake_tunable(), TuningDB(tmp_path / "t.db"), []

    def run(trials):
        opts = TuneOptions(gpu="fakegpu", interpret=True, trials=trials, batch=1, verify_rounds=1)
        return tune_bucket(tunable, SPEC, (64, 64, 4), opts, None, db, "cpu", log=lambda line: None,
                           on_eval=evals.append)

    assert run(4).status == "tuned" and len(evals) == 4
    again = run(4)
    assert again.status == "cached" and len(evals) == 4 and again.config == run(3).config
    assert run(6).status == "tuned" and len(evals) > 4


def test_a_tuned_config_within_noise_of_the_default_is_not_recorded_over_it(tmp_path):
    tunable = fake_tunable(slow_default=False)
    # every correct config is as fast as the default except A=5 (4x faster): restrict the space to a tie
    tie = dataclasses.replace(tunable, search_space=lambda spec, bucket: {"A": [1, 2], "B": [1]})
    opts = TuneOptions(gpu="fakegpu", interpret=True, trials=4, batch=1, verify_rounds=1)
    result = tune_bucket(tie, SPEC, (64, 64, 4), opts, None, None, "cpu", log=lambda line: None)
    assert result.config == {"A": 1, "B": 1} and result.speedup == 1.0


def test_configs_that_launch_alike_are_measured_once(tmp_path):
    """Two configs whose launched forms are equal (here: B does not matter where A is 5) are one feasible config:
    the study measures one of them and spends its budget on the others."""
    tunable = dataclasses.replace(fake_tunable(), launched_as=lambda spec, bucket, c: {**c, "B": 0} if c["A"] == 5
                                  else c)
    opts = TuneOptions(gpu="fakegpu", interpret=True, trials=8, batch=2, verify_rounds=1)
    result = tune_bucket(tunable, SPEC, (64, 64, 4), opts, None, None, "cpu", log=lambda line: None)
    assert result.feasible == 7 and result.evaluations == 7      # A=5 with B=1 or 2: measured once
    measured = [h["config"] for h in result.history]
    assert sum(c["A"] == 5 for c in measured) == 1 and result.config["A"] == 5


def test_a_rejected_config_launching_like_a_feasible_one_is_recorded_as_the_feasible_one(tmp_path):
    """B=4 is infeasible, but where A is 5 it launches like B=1: whenever the sampler proposes it (it is in the
    space), the study measures and records the feasible form, never a config the op (and a bundle import)
    rejects. (The H200 retune of 2026-12-04 recorded num_splits=128 for a bucket of 16 key tiles this way.)"""
    tunable = dataclasses.replace(fake_tunable(), launched_as=lambda spec, bucket, c: {**c, "B": 1} if c["A"] == 5
                                  else c, initial_configs=lambda spec, bucket: [{"A": 5, "B": 4}])
    opts = TuneOptions(gpu="fakegpu", interpret=True, trials=8, batch=2, verify_rounds=1)
    db = TuningDB(tmp_path / "t.db")
    result = tune_bucket(tunable, SPEC, (64, 64, 4), opts, None, db, "cpu", log=lambda line: None)
    measured = [h["config"] for h in result.history]
    assert {"A": 5, "B": 1} in measured
    assert all(FAKE_OP.check_config(SPEC, c, (64, 64, 4)) is None for c in measured)
    assert result.config == {"A": 5, "B": 1}
    assert db.get("fakegpu", SPEC.key(), FAKE_OP.version_of(SPEC), (64, 64, 4)).config == {"A": 5, "B": 1}


def test_decode_configs_launch_alike_where_splits_resolve_or_no_combine_runs(monkeypatch):
    """attn_decode's launched form (4 SMs, as the host counts without a GPU): num_splits 0 is the heuristic's
    count, and combine.num_warps matters only where the combine kernel runs."""
    from flashcore.ops.attn_decode.tuning import TUNING
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = KernelSpec.make("attn_decode", arch=90, dtype="bf16", head_dim=128, gqa_group=4, page_size=16,
                           causal=False, window=False, softcap=False, alibi=False)
    base = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "num_splits": 0, "combine.num_warps": 2}

    def key(bucket, **changes):
        return TUNING.launch_key(spec, bucket, {**base, **changes})
    # batch 16 x 8 kv heads, 1k: the heuristic gives one split and no combine runs
    assert key((128, 1024, 1)) == key((128, 1024, 1), num_splits=1, **{"combine.num_warps": 4})
    # 4 splits there merge inline: the combine's warps still do not matter, the split count does
    assert key((128, 1024, 1), num_splits=4) == key((128, 1024, 1), num_splits=4, **{"combine.num_warps": 1})
    assert key((128, 1024, 1), num_splits=4) != key((128, 1024, 1), num_splits=2)
    # one sequence, one kv head: the heuristic's 8 splits go through the combine kernel, whose warps matter
    assert key((1, 1024, 1)) == key((1, 1024, 1), num_splits=8)
    assert key((1, 1024, 1)) != key((1, 1024, 1), **{"combine.num_warps": 1})
    assert len(TUNING.feasible_configs(spec, (128, 1024, 1))) < len(TUNING.feasible_configs(spec, (1, 1024, 1)))


def test_study_resumes_from_storage_without_measuring_again(tmp_path):
    tunable = fake_tunable()
    storage = make_storage(str(tmp_path / "j.journal"))
    opts = TuneOptions(gpu="fakegpu", interpret=True, trials=3, batch=1)
    problem = tunable.make_problem(SPEC, {}, "cpu")
    measured = []

    def evaluator(config):
        from flashcore.tools.tuner import evaluate
        measured.append(config_key(config))
        return evaluate(problem, config, opts)

    first = Study(tunable, problem, (64, 64, 4), opts, storage, "optuna", evaluator=evaluator)
    first.run(3)
    assert first.evaluations == 3 and len(measured) == 3
    again = Study(tunable, problem, (64, 64, 4), opts, make_storage(str(tmp_path / "j.journal")), "optuna",
                  evaluator=evaluator)
    assert again.evaluations == 3                                 # rebuilt from the journal
    again.run(6)
    assert again.evaluations == 6 and len(measured) == 6 and len(set(measured)) == 6


# ---------------------------------------------------------------------------------- CLI, plan, refusal

@interpreter
def test_dry_run_prints_plan_and_estimate(capsys):
    assert tune.main(["--interpret", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan for interpreter" in out and "estimate:" in out and "32x32x2" in out
    assert tune.main(["--gpu", "h100", "--dry-run", "--dtypes", "bf16", "--head-dims", "128"]) == 0
    out = capsys.readouterr().out
    assert "plan for h100 (sm90)" in out and "head_dim=128 causal" in out and "8192x8192x32" in out
    assert "gqa_group=8" in out and "min" in out


@interpreter
def test_feature_without_kernels_plans_the_ops_that_have_it(capsys):
    """--feature alone selects the ops whose plan has that axis (page_size: the KV-cache and varlen ops; causal:
    every op); a feature no op has, or an op named with --kernels that lacks it, is refused with the axes there
    are."""
    assert tune.main(["--interpret", "--dry-run", "--feature", "page_size=0,16"]) == 0
    out = capsys.readouterr().out
    assert "attn_decode" in out and "attn_varlen" in out and "page_size=16" in out and "attn_fwd" not in out
    assert tune.main(["--interpret", "--dry-run", "--feature", "causal=true"]) == 0
    out = capsys.readouterr().out
    assert all(op in out for op in ("attn_fwd", "attn_decode", "attn_varlen", "attn_bwd"))
    assert tune.main(["--interpret", "--dry-run", "--feature", "nope=1"]) == 2
    assert "no op has every plan axis of --feature (nope)" in capsys.readouterr().err
    assert tune.main(["--interpret", "--dry-run", "--kernels", "attn_fwd", "--feature", "page_size=0"]) == 2
    assert "attn_fwd has no plan axis page_size" in capsys.readouterr().err


def test_refuses_to_record_for_another_gpu(capsys, paths):
    assert tune.main(["--gpu", "mi300x", "--db", str(paths["db"])]) == 2
    assert "GPU" in capsys.readouterr().err
    assert tune.main(["--interpret", "--gpu", "h100", "--db", str(paths["db"])]) == 2
    assert "--force" in capsys.readouterr().err
    assert not paths["db"].exists()


# ------------------------------------------------------------------------ end to end on the interpreter

def run_tune(paths, *extra):
    return tune.main(["--interpret", "--db", str(paths["db"]), "--storage", str(paths["journal"]), "--quiet",
                      *extra])


@interpreter
def test_interpret_end_to_end_study_db_dispatch(paths, monkeypatch, capsys):
    assert run_tune(paths, "--grid", *BUCKET_ARGS, "--report", str(paths["report"])) == 0
    out = capsys.readouterr().out
    assert "1/1 buckets tuned" in out and "timings meaningless" in out
    with TuningDB(paths["db"], readonly=True) as db:
        (record,) = db.records()
    assert record.gpu == "interpreter" and record.bucket == (64, 64, 4) and record.tuner == "grid"
    assert record.evaluations == 9 and record.timing_valid is False
    assert record.latency_ms <= record.default_ms
    assert record.template_hash == ATTN_FWD.version_of(KernelSpec.from_key(record.spec)) and record.triton_version
    report = json.loads((paths["report"] / "tune.json").read_text())
    assert report["buckets"][0]["config"] == record.config
    assert "| attn_fwd |" in (paths["report"] / "tune.md").read_text()

    # dispatch picks the tuned config, for the bucket's shapes and (nearest bucket) others
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(paths["db"]))
    dispatch.clear()
    import flashcore
    q = torch.randn(2, 60, 2, 32, dtype=torch.float16)          # bucket (64, 64, 4)
    k, v = torch.randn_like(q), torch.randn_like(q)
    out = flashcore.flash_attn_func(q, k, v)
    from flashcore.ops.attn_fwd.host import make_spec
    spec = make_spec(q, k, v, False, False, False)
    choice = dispatch.last_choice(spec, (64, 64, 4))
    assert choice.source == "user DB" and choice.config == record.config
    ref = torch.softmax((q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2)) * 32 ** -0.5,
                        -1) @ v.double().transpose(1, 2)
    assert (out.double().transpose(1, 2) - ref).abs().max() < 1e-2
    q = torch.randn(1, 120, 2, 32, dtype=torch.float16)          # bucket (128, 128, 2): nearest
    flashcore.flash_attn_func(q, q, q)
    near = dispatch.last_choice(make_spec(q, q, q, False, False, False), (128, 128, 2))
    assert near.source == "nearest bucket" and near.config == record.config

    # re-running the finished plan measures nothing new
    capsys.readouterr()
    assert run_tune(paths, "--grid", *BUCKET_ARGS) == 0
    assert "cached" in capsys.readouterr().out
    with TuningDB(paths["db"], readonly=True) as db:
        assert db.records()[0].created_at == record.created_at

    # export -> bundle that dispatch uses with no user DB
    bundles = paths["tmp"] / "bundles"
    assert tune.main(["export", "--db", str(paths["db"]), "-o", str(bundles)]) == 0
    _, shipped = read_bundle(bundles / "interpreter.json", expect_gpu="interpreter")
    assert shipped[0].config == record.config
    monkeypatch.setenv("FLASHCORE_TUNING_DB", "off")
    monkeypatch.setenv("FLASHCORE_BUNDLE_DIR", str(bundles))
    dispatch.clear()
    assert dispatch.explain(ATTN_FWD, spec, (64, 64, 4)).source == "bundle"


@interpreter
def test_interrupted_run_resumes_where_it_stopped(paths):
    assert run_tune(paths, *BUCKET_ARGS, "--trials", "2") == 0
    with TuningDB(paths["db"], readonly=True) as db:
        assert db.records()[0].evaluations == 2
    assert run_tune(paths, *BUCKET_ARGS, "--trials", "4") == 0          # more trials: the study continues
    with TuningDB(paths["db"], readonly=True) as db:
        assert db.records()[0].evaluations == 4
    import optuna
    storage = make_storage(str(paths["journal"]))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    measured = [t for t in study.trials if t.user_attrs.get("evaluated")]
    assert len(measured) == 4 and len({tuple(sorted(t.params.items())) for t in measured}) == 4


@interpreter
def test_two_worker_processes_share_studies_and_db(paths, capsys):
    assert run_tune(paths, "--devices", "2", "--trials", "2", "--kernels", "attn_fwd",
                    "--feature", "causal=false,true", "--buckets", "32x32x2") == 0
    assert "2/2 buckets tuned" in capsys.readouterr().out
    with TuningDB(paths["db"], readonly=True) as db:
        records = db.records()
    assert len(records) == 2 and {json.loads(r.spec)["causal"] for r in records} == {False, True}


@interpreter
def test_heldout_and_compare_reports(paths):
    assert run_tune(paths, *BUCKET_ARGS, "--trials", "3") == 0
    assert tune.main(["heldout", "--interpret", "--db", str(paths["db"]), *BUCKET_ARGS, "--quiet",
                      "--shape", "batch=1 seqlen_q=40 seqlen_k=40 heads_q=2 heads_kv=2",
                      "--report", str(paths["report"])]) == 0
    held = json.loads((paths["report"] / "heldout.json").read_text())
    sources = {row["source"] for row in held["shapes"]}
    assert sources <= {"user DB", "nearest bucket"} and held["summary"]["held_out"]["shapes"] == len(held["shapes"]) >= 2
    assert tune.main(["compare", "--interpret", "--kernels", "attn_fwd", "--feature", "causal=false",
                      "--buckets", "32x32x2", "--fraction", "0.5", "--replay-seeds", "2", "--quiet",
                      "--report", str(paths["report"])]) == 0
    cmp = json.loads((paths["report"] / "compare.json").read_text())
    (row,) = cmp["buckets"]
    assert row["grid_evaluations"] == 4 and row["optuna_evaluations"] == 2
    assert row["replay"]["seeds"] == 2 and "floor_met" in cmp["summary"]


@interpreter
def test_compare_refuses_an_op_tuned_in_one_study_per_kernel(paths, capsys, monkeypatch):
    """attn_bwd's dK/dV and dQ kernels are separate studies: a grid over their product is not built or measured."""
    from flashcore.tools import tuner
    monkeypatch.setattr(tuner, "evaluate", lambda *a, **k: pytest.fail("compare measured a config"))
    assert tune.main(["compare", "--interpret", "--kernels", "attn_bwd", "--quiet",
                      "--report", str(paths["report"])]) == 2
    assert "skipping attn_bwd: its kernels are tuned in separate studies" in capsys.readouterr().err


@interpreter
@pytest.mark.parametrize("neighbour_ms, recorded", [(0.5, "validated neighbour"), (1.01, "validated default"),
                                                    (1.5, "validated default")])
def test_heldout_validate_records_the_faster_of_the_neighbours_config_and_the_default(paths, monkeypatch,
                                                                                       neighbour_ms, recorded):
    from flashcore.ops.attn_fwd.host import build_spec
    from flashcore.tools import tuner
    from flashcore.tuning_db import Record
    spec = build_spec(0, "fp16", 32)                      # the plan's spec for BUCKET_ARGS on the interpreter
    tuned = Record(gpu="interpreter", template="attn_fwd", template_hash=ATTN_FWD.version_of(spec), spec=spec.key(),
                   bucket=(64, 64, 4), config={"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
                   latency_ms=1.0, default_config=ATTN_FWD.default_config(spec), default_ms=1.2)
    assert tuned.config != ATTN_FWD.default_config(spec)
    with TuningDB(paths["db"]) as db:
        db.put(tuned)

    def timed(problem, configs, *args, **kwargs):      # the default 1 ms; the neighbour's config `neighbour_ms`
        default = ATTN_FWD.default_config(problem.spec)
        return [1.0 if config_key(c) == config_key(default) else neighbour_ms for c in configs]
    monkeypatch.setattr(tuner, "time_configs", timed)
    shape = ["--shape", "batch=1 seqlen_q=20 seqlen_k=20 heads_q=2 heads_kv=2"]       # bucket 32x32x2: untuned
    assert tune.main(["heldout", "--interpret", "--validate", *BUCKET_ARGS, "--quiet", *shape]) == 2   # no --db
    assert tune.main(["heldout", "--interpret", "--validate", "--db", str(paths["db"]), *BUCKET_ARGS, "--quiet",
                      *shape]) == 0
    with TuningDB(paths["db"], readonly=True) as db:
        records = {tuple(r.bucket): r for r in db.records()}
    assert records[tuple(tuned.bucket)] == tuned                   # a tuned bucket keeps its own record
    new = records[(32, 32, 2)]
    assert new.spec == spec.key()
    neighbour = ATTN_FWD.from_neighbour(spec, tuned.config)
    assert new.tuner == recorded and new.default_ms == 1.0
    assert new.config == (neighbour if recorded == "validated neighbour" else ATTN_FWD.default_config(spec))
    dispatch.clear()
    choice = dispatch.explain(ATTN_FWD, spec, (32, 32, 2), gpu="interpreter")
    assert choice.config == new.config and choice.describe() == f"user DB {paths['db']} ({recorded})"


def readme_interpreter_info() -> list[str]:
    """flashcore's arguments in README.md's `TRITON_INTERPRET=1 flashcore info ...` example."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    examples = [shlex.split(line, comments=True) for line in readme.splitlines()
                if line.startswith("TRITON_INTERPRET=1 flashcore info ")]
    assert len(examples) == 1, "README.md: expected one `TRITON_INTERPRET=1 flashcore info ...` example"
    return examples[0][2:]


@interpreter
def test_the_readme_info_example_on_the_interpreter_shows_what_tune_interpret_tuned(paths, monkeypatch, capsys):
    """README's example and the interpreter plan agree: after `flashcore-tune --interpret`, the example's call is
    answered by the record tuned for its own bucket (not a nearest bucket, not the heuristic default)."""
    argv = readme_interpreter_info()       # info FIELD=VALUE...: a call of attn_fwd, info's default op
    assert run_tune(paths, "--kernels", "attn_fwd", "--trials", "1") == 0     # the whole plan, one config each
    call = ops.parse_call(ATTN_FWD, argv[1:])
    spec, bucket = ATTN_FWD.spec_of(call, 0), ATTN_FWD.bucket_of(call)
    with TuningDB(paths["db"], readonly=True) as db:
        record = db.get("interpreter", spec.key(), ATTN_FWD.version_of(spec), bucket)
    assert record is not None, f"the interpreter plan tunes no {spec} at bucket {bucket} (README's example)"
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(paths["db"]))
    dispatch.clear()
    capsys.readouterr()
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"config: {record.config}" in out and f"why:    user DB {paths['db']}" in out


def test_prior_configs_seed_a_retune_from_an_older_bundle():
    """A record of an earlier op version (its spec without features added since, the old 'template' key) seeds
    the study of the spec that extends it, at the same bucket and GPU only; configs the op rejects are dropped."""
    from flashcore.ops.attn_fwd.host import build_spec
    from flashcore.tools.tuner import prior_configs
    from flashcore.tuning import tuning_of
    from flashcore.tuning_db import Record
    tuning = tuning_of("attn_fwd")
    spec = build_spec(90, "bf16", 128, causal=True)
    old_spec = {k: v for k, v in spec.as_dict().items() if k != "alibi"}
    old_key = json.dumps({"template": "attn_fwd", **old_spec}, sort_keys=True)

    def record(config, bucket=(2048, 2048, 128), gpu="h100", spec_key=old_key):
        return Record(gpu=gpu, template="attn_fwd", template_hash="old0", spec=spec_key, bucket=bucket,
                      config=config, latency_ms=1.0)
    good = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    records = [record(good), record({**good, "BLOCK_N": 32}, bucket=(512, 512, 32)), record(good, gpu="a100"),
               record(good, spec_key=old_key.replace('"causal": true', '"causal": false')),
               record({**good, "BLOCK_M": 48})]
    assert prior_configs(tuning, spec, (2048, 2048, 128), records, "h100") == [{**good, "WARP_SPECIALIZE": 0}]
