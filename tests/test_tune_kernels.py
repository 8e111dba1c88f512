"""Ops whose kernels are tuned one study each (Op.tuned_kernels): the tuner searches the first kernel's tunables with
the others at their default, then the next kernel's with the first held at its best, and records the combination;
attn_bwd (dK/dV, then dQ) end to end on the interpreter, its record served by dispatch; the atomic-dQ scheme's "dq"
study, over the convert kernel's tunables only."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

import flashcore
from flashcore import dispatch, ops
from flashcore.generator import KernelSpec
from flashcore.ops.attn_bwd import OP as ATTN_BWD
from flashcore.ops.attn_bwd import host as bwd_host
from flashcore.tools import tune
from flashcore.tools.tune_storage import make_storage
from flashcore.tools.tuner import TuneOptions, register_plan, study_names, tune_bucket
from flashcore.tuning import CheckResult, Problem, Tuning, tuning_of
from flashcore.tuning_db import TuningDB

BUCKET = (64, 64, 4)


@dataclasses.dataclass(frozen=True)
class TwoKernelCall:
    n: int = 1


TWO_KERNEL_OP = ops.register(ops.Op(
    name="two_kernel_op", kernels=("attn_bwd_dkdv", "attn_bwd_dq"), call_type=TwoKernelCall,   # real templates
    axes=(ops.Axis("x", ("n",)), ops.Axis("y", ("n",)), ops.Axis("z", ("n",))),
    tunables=(ops.Param("first.A", (1, 2, 3)), ops.Param("second.B", (1, 2, 4))),
    tuned_kernels=(ops.Kernel("first", "attn_bwd_dkdv", (ops.Param("first.A", (1, 2, 3)),)),
                   ops.Kernel("second", "attn_bwd_dq", (ops.Param("second.B", (1, 2, 4)),))),
    default_config=lambda spec: {"first.A": 1, "second.B": 1},
    spec_of=lambda call, arch: SPEC))
SPEC = KernelSpec.make("two_kernel_op", arch=0, dtype="fp16", head_dim=32, causal=False, window=False,
                       softcap=False, alibi=False, gqa_group=1, tma=False)
# each kernel's time by its tunable's value: A=3 and B=2 are the fastest, and the two do not interact
FIRST_MS, SECOND_MS = {1: 3.0, 2: 2.0, 3: 1.0}, {1: 3.0, 2: 0.5, 4: 2.0}


def two_kernel_tuning() -> Tuning:
    def runner(config):
        def run(i):
            time.sleep(1e-3 * (FIRST_MS[config["first.A"]] + SECOND_MS[config["second.B"]]))
        return run

    def make_problem(spec, call, device):
        return Problem(spec=spec, call=call, bucket=BUCKET, work=1e6, metric_unit="TFLOP/s", n_sets=1,
                       runner=runner, check=lambda config: CheckResult(ok=True, error=0.0, tolerance=1.0),
                       device="cpu")

    return Tuning(op=TWO_KERNEL_OP, plan_axes={},
                  search_space=lambda spec, bucket: {"first.A": [1, 2, 3], "second.B": [1, 2, 4]},
                  plan_buckets=lambda spec, interpret: [BUCKET], call_for=lambda features, coords: TwoKernelCall(),
                  make_problem=make_problem)


def test_each_kernel_is_searched_in_its_own_study_the_earlier_held_at_its_best(tmp_path):
    tunable = two_kernel_tuning()
    opts = TuneOptions(gpu="fakegpu", interpret=True, trials=3, batch=1, verify_rounds=1)
    db = TuningDB(tmp_path / "t.db")
    result = tune_bucket(tunable, SPEC, BUCKET, opts, make_storage(str(tmp_path / "j.journal")), db, "cpu",
                         log=lambda line: None)
    assert result.status == "tuned", result.note
    configs = [h["config"] for h in result.history]
    first, second = configs[:3], configs[3:]
    assert sorted(c["first.A"] for c in first) == [1, 2, 3] and {c["second.B"] for c in first} == {1}
    assert {c["first.A"] for c in second} == {3} and sorted(c["second.B"] for c in second) == [1, 2, 4]
    assert result.evaluations == 6 and result.feasible == 6       # 3 + 3 configs, not the product's 9
    assert result.config == {"first.A": 3, "second.B": 2}
    assert result.default_config == {"first.A": 1, "second.B": 1} and result.ms < result.default_ms
    record = db.get("fakegpu", SPEC.key(), TWO_KERNEL_OP.version_of(SPEC), BUCKET)
    assert record.config == result.config and record.evaluations == 6


def test_an_in_memory_rerun_measures_no_kernel_of_a_bucket_its_db_holds(tmp_path):
    """--storage memory: the DB's record of the bucket (every kernel's study) is the whole answer; not even the
    first kernel's study runs again."""
    tunable, db, evals = two_kernel_tuning(), TuningDB(tmp_path / "t.db"), []
    opts = TuneOptions(gpu="fakegpu", interpret=True, trials=3, batch=1, verify_rounds=1)

    def run():
        return tune_bucket(tunable, SPEC, BUCKET, opts, None, db, "cpu", log=lambda line: None, on_eval=evals.append)

    first = run()
    assert first.status == "tuned" and len(evals) == 6
    again = run()
    assert again.status == "cached" and len(evals) == 6 and again.config == first.config == {"first.A": 3,
                                                                                              "second.B": 2}
    assert again.feasible == 6 and again.default_config == {"first.A": 1, "second.B": 1}


def test_a_retune_starts_every_kernel_study_over(tmp_path):
    tunable = two_kernel_tuning()
    journal = str(tmp_path / "j.journal")
    opts = TuneOptions(gpu="fakegpu", interpret=True, trials=2, batch=1, verify_rounds=1)
    tune_bucket(tunable, SPEC, BUCKET, opts, make_storage(journal), None, "cpu", log=lambda line: None)
    names = study_names(tunable, "fakegpu", SPEC, BUCKET, opts.mode)
    assert len(names) == 2 and names[0].endswith("|first") and not names[1].endswith("|second")
    storage = make_storage(journal)
    assert set(names) <= {s.study_name for s in storage.get_all_studies()}
    register_plan(storage, [(tunable, SPEC, BUCKET)], dataclasses.replace(opts, retune=True))
    left = {s.study_name: len(storage.get_all_trials(storage.get_study_id_from_name(s.study_name)))
            for s in storage.get_all_studies()}
    assert names[0] not in left and left[names[1]] == 0          # deleted; the bucket's own recreated, empty


def test_stage_view_searches_its_kernel_only():
    tunable = two_kernel_tuning()
    view = tunable.stage_view(("second.B",), {"first.A": 3, "second.B": 1})
    assert view.search_space(SPEC, BUCKET) == {"first.A": [3], "second.B": [1, 2, 4]}
    assert view.op.default_config(SPEC) == {"first.A": 3, "second.B": 1}
    assert [c["first.A"] for c in view.feasible_configs(SPEC, BUCKET)] == [3, 3, 3]


def test_an_op_must_declare_each_tunable_in_one_tuned_kernel():
    kernel = ops.Kernel("first", "attn_bwd_dkdv", (ops.Param("first.A", (1,)),))
    common = dict(name="bad", kernels=("attn_bwd_dkdv",), call_type=TwoKernelCall, axes=(),
                  default_config=lambda spec: {}, spec_of=lambda call, arch: SPEC)
    with pytest.raises(ValueError, match="tunables must be its tunables"):
        ops.Op(tunables=(ops.Param("first.A", (1,)), ops.Param("other", (1,))), tuned_kernels=(kernel,), **common)
    with pytest.raises(ValueError, match="named first"):
        ops.Op(tunables=(ops.Param("A", (1,)),),
               tuned_kernels=(ops.Kernel("first", "attn_bwd_dkdv", (ops.Param("A", (1,)),)),), **common)
    with pytest.raises(ValueError, match="renders"):
        ops.Op(tunables=(ops.Param("first.A", (1,)),),
               tuned_kernels=(ops.Kernel("first", "attn_fwd", (ops.Param("first.A", (1,)),)),), **common)


def test_the_backward_declares_its_dkdv_and_dq_studies():
    assert [k.name for k in ATTN_BWD.tuned_kernels] == ["dkdv", "dq"]
    assert [k.template for k in ATTN_BWD.tuned_kernels] == ["attn_bwd_dkdv", "attn_bwd_dq"]
    assert [name for name, _ in tuning_of("attn_bwd").stages()] == ["dkdv", "dq"]


@pytest.mark.parametrize("arch", [0, 90])
def test_the_atomic_schemes_dq_study_searches_the_convert_kernels_tunables_only(arch):
    """A dq_atomic spec runs no dQ kernel: its "dq" study searches dq.BLOCK_M and dq.num_warps (the preprocess and
    convert kernels' row tile and warps), dq.BLOCK_N and dq.num_stages at the default's; its dK/dV study and its
    default are the deterministic spec's."""
    bwd = tuning_of("attn_bwd")
    calls = {flag: ATTN_BWD.call_type(4, 2048, 2048, 32, 32, 128, "bf16", True, dq_atomic=flag)
             for flag in (False, True)}
    deterministic, atomic = (ATTN_BWD.spec_of(calls[flag], arch) for flag in (False, True))
    assert "dq_atomic" not in deterministic.as_dict() and atomic["dq_atomic"]
    bucket = ATTN_BWD.bucket_of(calls[True])
    default = ATTN_BWD.default_config(atomic)
    assert default == ATTN_BWD.default_config(deterministic)
    space, full = bwd.search_space(atomic, bucket), bwd.search_space(deterministic, bucket)
    assert {n: space[n] for n in ("dq.BLOCK_N", "dq.num_stages")} == {n: [default[n]] for n in ("dq.BLOCK_N",
                                                                                                  "dq.num_stages")}
    assert all(space[n] == full[n] for n in full if n not in ("dq.BLOCK_N", "dq.num_stages"))
    assert len(space["dq.BLOCK_M"]) > 1 and (arch == 0 or len(space["dq.num_warps"]) > 1)
    (_, dkdv_names), (_, dq_names) = bwd.stages()
    dq_study = bwd.stage_view(dq_names, default).feasible_configs(atomic, bucket)
    assert {(c["dq.BLOCK_N"], c["dq.num_stages"]) for c in dq_study} == {(default["dq.BLOCK_N"],
                                                                          default["dq.num_stages"])}
    assert len(dq_study) == len({(c["dq.BLOCK_M"], c["dq.num_warps"]) for c in dq_study}) > 1
    assert bwd.study_sizes(atomic, bucket)[0] == bwd.study_sizes(deterministic, bucket)[0]
    assert all(c["dq.BLOCK_N"] == default["dq.BLOCK_N"] and c["dq.num_stages"] == default["dq.num_stages"]
               for c in bwd.initial_configs(atomic, bucket))


@pytest.mark.usefixtures("cpu_only")
def test_backward_tunes_on_the_interpreter_and_dispatch_serves_its_record(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHCORE_BUNDLE_DIR", str(tmp_path / "no-bundles"))
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(tmp_path / "tuning.db"))
    dispatch.clear()
    try:
        assert tune.main(["--interpret", "--kernels", "attn_bwd", "--feature", "causal=true", "--trials", "3",
                          "--db", str(tmp_path / "tuning.db"), "--quiet"]) == 0
        records = TuningDB(tmp_path / "tuning.db").records()
        assert len(records) == 1 and records[0].template == "attn_bwd" and records[0].evaluations >= 4
        q, k, v = (torch.randn(1, 32, 2, 32, dtype=torch.float16, requires_grad=True) for _ in range(3))
        # the interpreter's plan tunes atomic dQ: the call runs it where host.ATOMIC_DQ_ARCHS lists the device
        monkeypatch.setattr(bwd_host, "ATOMIC_DQ_ARCHS", frozenset({0}))
        flashcore.flash_attn_func(q, k, v, causal=True).sum().backward()
        spec = ATTN_BWD.spec_of(ATTN_BWD.call_type(1, 32, 32, 2, 2, 32, "fp16", True, dq_atomic=True), 0)
        choice = dispatch.last_choice(spec, (32, 32, 2))
        assert choice is not None and choice.source == "user DB" and choice.config == records[0].config
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    finally:
        dispatch.clear()
