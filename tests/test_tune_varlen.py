"""attn_varlen's tuning declaration on the CPU: the plan, the length distributions its buckets are measured on, the
useful-FLOPs helper against a brute-force count, the problem's check (a wrong output fails it), and a whole
interpreter tune into a temporary DB that dispatch then serves."""
from __future__ import annotations

import random

import pytest
import torch

import flashcore
from flashcore import dispatch
from flashcore.ops.attn_varlen import OP, host
from flashcore.ops.attn_varlen import tuning as varlen_tuning
from flashcore.ops.attn_varlen.call import AttnVarlenCall
from flashcore.ops.attn_varlen.tuning import TUNING, call_for, check_lengths, lengths_of
from flashcore.counts import useful_flops, visible_keys
from flashcore.ops.attn_varlen.workload import bucket_lengths, draw_lengths, even_lengths, make_inputs, sequence_errors
from flashcore.reference import varlen_ref
from flashcore.tools import tune
from flashcore.tuning import tuning_of
from flashcore.tuning_db import TuningDB

interpreter = pytest.mark.usefixtures("cpu_only")
INTERP_FEATURES = {"dtype": "fp16", "head_dim": 32, "gqa_group": 2, "causal": True}


# ---------------------------------------------------------------------------------------------- useful FLOPs

def brute_visible(sq: int, sk: int, causal: bool, window=(-1, -1)) -> int:
    """(row, key) pairs attended, counted one by one with the reference's mask (bottom-right aligned)."""
    left, right = window
    if causal:
        right = 0
    count = 0
    for i in range(sq):
        pos = i + sk - sq
        count += sum(1 for j in range(sk) if (right < 0 or j <= pos + right) and (left < 0 or j >= pos - left))
    return count


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (0, 0), (3, -1), (-1, 2), (5, 1), (40, 40)])
def test_visible_keys_is_the_brute_force_count(causal, window):
    for sq in (0, 1, 2, 7, 16, 23):
        for sk in (0, 1, 5, 16, 23, 40):          # Sq > Sk (rows that see nothing), Sq == Sk, Sq < Sk (chunks)
            assert visible_keys(sq, sk, causal, window) == brute_visible(sq, sk, causal, window), (sq, sk)


def test_visible_keys_of_the_reference_mask():
    """The count is the number of True entries of the mask attention_ref applies (rows with no key give zeros)."""
    from flashcore.reference import attention_ref
    for sq, sk, causal, window in ((9, 30, True, (-1, -1)), (30, 9, True, (-1, -1)), (12, 12, False, (2, 3)),
                                   (20, 33, True, (4, -1))):
        v = torch.zeros(1, sk, 1, sk, dtype=torch.float64)
        v[0, :, 0] = torch.eye(sk, dtype=torch.float64)            # out[i, j] > 0 exactly where row i sees key j
        out, _ = attention_ref(torch.zeros(1, sq, 1, sk, dtype=torch.float64), torch.zeros_like(v), v,
                               causal=causal, window_size=window)
        assert visible_keys(sq, sk, causal, window) == int((out > 0).sum())


def test_useful_flops_counts_real_tokens_only():
    assert useful_flops([4096], [4096], 32, 128) == 4 * 4096 * 4096 * 128 * 32
    assert useful_flops([4096], [4096], 32, 128, causal=True) == 4 * 32 * 128 * 4096 * 4097 // 2
    chunk, prefix = 512, 16384                  # chunked prefill: each new token sees the prefix and the chunk so far
    assert useful_flops([chunk] * 3, [prefix + chunk] * 3, 32, 128, causal=True) == \
        3 * 4 * 32 * 128 * (chunk * prefix + chunk * (chunk + 1) // 2)
    draw = random.Random(0)
    q = [draw.randint(0, 40) for _ in range(12)]
    k = [draw.randint(0, 40) for _ in range(12)]
    for causal in (False, True):
        assert useful_flops(q, k, 4, 16, causal, (7, -1)) == \
            4 * 4 * 16 * sum(brute_visible(a, b, causal, (7, -1)) for a, b in zip(q, k))


# ---------------------------------------------------------------------------------------------- distributions

def test_draw_lengths_add_up_and_stay_in_range():
    for total, low, high in ((16384, 64, 4096), (65536, 64, 4096), (100, 1, 7), (3, 4, 9), (0, 1, 5)):
        lengths = draw_lengths(total, low, high, 0)
        assert sum(lengths) == total and max(lengths, default=0) <= high
        assert all(n >= low for n in lengths[:-1]) and (total < low or min(lengths, default=low) >= low)
        assert lengths == draw_lengths(total, low, high, 0)          # seeded: the same every run
    assert draw_lengths(16384, 64, 4096, 0) != draw_lengths(16384, 64, 4096, 1)


def test_bucket_lengths_are_a_distribution_with_the_corner_first():
    q, k = bucket_lengths(16384, 4096, 4096)                      # mixed prefill
    assert sum(q) == 16384 and q[0] == 4096 and q == k and len(set(q)) == len(q) > 3
    assert all(4096 // 64 <= n <= 4096 for n in q[1:-1]) and q == bucket_lengths(16384, 4096, 4096)[0]
    q, k = bucket_lengths(32768, 16384, 16384)                    # two corners' worth of tokens: still a mix
    assert q[0] == 16384 and len(q) > 2
    q, k = bucket_lengths(16384, 512, 32768)                      # chunked prefill against the cache
    assert q == (512,) * 32 and k[0] == 32768 and all(max(512, 32768 // 4) <= n <= 32768 for n in k)
    assert len(set(k)) > 16
    q, k = bucket_lengths(1000, 512, 4096)                        # a last chunk shorter than the others
    assert q == (512, 488) and k[0] == 4096 and k[1] >= 488
    q, k = bucket_lengths(300, 128, 32)                           # queries past the keys
    assert sum(q) == 300 and all(1 <= b <= 32 for b in k) and k[0] == 32


def test_even_lengths():
    assert even_lengths(3, 10, 8, 8) == ((4, 3, 3), (4, 3, 3))
    assert even_lengths(2, 10, 8, 20) == ((5, 5), (17, 17))
    with pytest.raises(ValueError):
        even_lengths(2, 17, 8, 8)


# ---------------------------------------------------------------------------------------------- the plan

def test_plan_is_the_features_by_their_buckets():
    items = TUNING.plan(90, interpret=False)
    specs = {spec for spec, _ in items}
    assert len(specs) == 2 * 3 * 2 * 3 * 2 and len(items) == 4 * len(specs)
    assert {spec["page_size"] for spec in specs} == {0, 16, 128} and {spec["head_dim"] for spec in specs} == {64, 128,
                                                                                                              256}
    for spec, bucket in items:
        assert bucket in (varlen_tuning.PAGED_BUCKETS if spec["page_size"] else varlen_tuning.PACKED_BUCKETS)
        call = TUNING.call_of_bucket(spec, bucket)
        assert OP.bucket_of(call) == bucket and OP.spec_of(call, 90) == spec
        q, k = lengths_of(call)
        assert len(q) == call.batch and sum(q) == call.total_q and max(q) <= call.max_seqlen_q
        assert max(k) <= call.max_seqlen_k and call.heads_q == 32
    for spec, bucket in TUNING.plan(90, interpret=False, axes={"dtype": ["bf16"], "head_dim": [128]})[:8]:
        configs = TUNING.feasible_configs(spec, bucket)
        assert configs[0] == OP.default_config(spec) and len(configs) > 20
        assert all(OP.check_config(spec, c, bucket) is None for c in configs)
        initial = TUNING.initial_configs(spec, bucket)
        assert initial and all(OP.check_config(spec, c, bucket) is None for c in initial)
        assert {c["BLOCK_M"] for c in initial} >= {64, 128}
        assert (initial[0]["BLOCK_M"], initial[0]["BLOCK_N"]) == (128, 128)     # large tiles first (short studies)


def test_interpreter_plan_is_tiny():
    items = TUNING.plan(0, interpret=True)
    assert [(spec["page_size"], bucket) for spec, bucket in items] == [(0, (256, 64, 64)), (16, (256, 32, 128))]
    for spec, bucket in items:
        call = TUNING.call_of_bucket(spec, bucket)
        assert OP.bucket_of(call) == bucket and call.total_q == 128 and (call.heads_q, call.heads_kv) == (2, 1)
        assert call.batch > 3                                     # a batch, not one dense corner
        assert TUNING.feasible_configs(spec, bucket)[0] == {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4,
                                                            "num_stages": 1}
    assert tuning_of("attn_varlen") is TUNING and OP.tuning.endswith(":TUNING")


def test_heldout_calls_stay_in_their_buckets_or_between():
    spec, bucket = next((s, b) for s, b in TUNING.plan(90, False, {"dtype": ["bf16"], "head_dim": [128],
                                                                   "page_size": [0]}))
    calls = TUNING.heldout_calls(spec, varlen_tuning.PACKED_BUCKETS)
    assert len(calls) == 4 + 3
    for call in calls:
        q, k = lengths_of(call)
        assert len(q) == call.batch and sum(q) == call.total_q and max(q) <= call.max_seqlen_q


def test_a_call_from_elsewhere_gets_even_lengths():
    call = AttnVarlenCall(batch=3, total_q=100, max_seqlen_q=64, max_seqlen_k=64, heads_q=4, heads_kv=2, head_dim=32)
    assert lengths_of(call) == ((34, 33, 33), (34, 33, 33))


def test_check_lengths_keep_the_kernel_specialization():
    """The check's batch is the call's (its SEQ_CHUNK) and its totals keep their divisibility by 16 (Triton's
    specialization): the kernel checked is the kernel timed. Lengths stay within the call's max_seqlen."""
    for spec, bucket in TUNING.plan(90, False, {"dtype": ["bf16"], "head_dim": [128], "gqa_group": [4]}):
        call = TUNING.call_of_bucket(spec, bucket)
        q_lens, k_lens = lengths_of(call)
        like_k = sum(-(-n // call.page_size) for n in k_lens) if call.page_size else sum(k_lens)
        q, k, spare = check_lengths(call, False, like_k)
        assert len(q) == len(k) == min(call.batch, 256) and max(q) <= call.max_seqlen_q and max(k) <= call.max_seqlen_k
        assert (sum(q) % 16 == 0) == (call.total_q % 16 == 0)
        assert call.batch == 1 or (1 in q and q[0] % 16)              # a one-token run, a partial row block
        total_k = sum(-(-n // call.page_size) for n in k) + spare if call.page_size else sum(k)
        assert (total_k % 16 == 0) == (like_k % 16 == 0)
        assert sum(q) < 2000 and max(k) < 1100
        if call.max_seqlen_k > call.max_seqlen_q:
            assert all(b >= a for a, b in zip(q, k)) and k[0] > q[0]


# ---------------------------------------------------------------------------------------------- the problem

def interp_problem(page_size: int):
    features = {**INTERP_FEATURES, "page_size": page_size}
    bucket = (256, 32, 128) if page_size else (256, 64, 64)
    call = call_for(features, bucket)
    spec = OP.spec_of(call, 0)
    return TUNING.make_problem(spec, call, "cpu")


@interpreter
@pytest.mark.parametrize("page_size", [0, 16])
def test_problem_times_the_distribution_and_its_check_passes_the_kernel(page_size):
    problem = interp_problem(page_size)
    call = problem.call
    q_lens, k_lens = lengths_of(call)
    assert problem.bucket == OP.bucket_of(call) and problem.metric_unit == "TFLOP/s"
    assert problem.work == useful_flops(q_lens, k_lens, call.heads_q, call.head_dim, causal=True)
    assert problem.spec == OP.spec_of(call, 0) and problem.n_sets == 1
    default = OP.default_config(problem.spec)
    out = problem.runner(default)(0)
    assert out.shape == (call.total_q, call.heads_q, call.head_dim)
    for config in TUNING.feasible_configs(problem.spec, problem.bucket)[:2]:
        result = problem.check(config)
        assert result.ok, result
        assert result.error <= result.tolerance and "sequences" in result.detail


@interpreter
@pytest.mark.parametrize("page_size", [0, 16])
def test_problem_check_fails_a_wrong_output(monkeypatch, page_size):
    """A runner whose output is wrong anywhere (one row of the last sequence, one of a middle one, a NaN, the wrong
    mask) fails the check."""
    problem = interp_problem(page_size)
    config = OP.default_config(problem.spec)
    launch = varlen_tuning.launch

    def corrupted(change):
        def run(inputs, causal, config, **options):
            out = launch(inputs, causal, config, **options).clone()
            change(out, inputs)
            return out
        return run
    last_row = lambda out, inputs: out[-1, 0].add_(0.25)                                   # noqa: E731
    middle = lambda out, inputs: out[inputs.seqlens_q[0] + 1, 1, 3].sub_(0.25)             # noqa: E731
    nan = lambda out, inputs: out[0, 0, 0].fill_(float("nan"))                             # noqa: E731
    for change in (last_row, middle, nan):
        monkeypatch.setattr(varlen_tuning, "launch", corrupted(change))
        result = problem.check(config)
        assert not result.ok and result.error > result.tolerance, result
    # the wrong mask: a non-causal kernel checked against the causal reference
    monkeypatch.setattr(varlen_tuning, "launch", lambda inputs, causal, config, **options: launch(inputs, False,
                                                                                                     config))
    assert not problem.check(config).ok
    monkeypatch.setattr(varlen_tuning, "launch", launch)
    assert problem.check(config).ok


@interpreter
def test_sequence_errors_check_the_ends_of_a_long_sequence():
    """The bench's check of a long sequence: its first and last rows only, each against the keys it sees."""
    inputs = make_inputs([40, 9], [70, 9], 2, 1, 16, "fp16", device="cpu")
    ref = varlen_ref(inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k, causal=True)[0]
    right = ref.to(torch.float16)
    pairs = sequence_errors(right, inputs, 0, True, rows=8)
    assert len(pairs) == 2 and all(err <= tol for err, tol in pairs)
    assert len(sequence_errors(right, inputs, 1, True, rows=8)) == 1          # short: every row
    for row, caught in ((2, True), (37, True), (20, False)):                 # the middle rows are not checked
        wrong = right.clone()
        wrong[row, 1] += 0.5
        pairs = sequence_errors(wrong, inputs, 0, True, rows=8)
        assert any(err > tol for err, tol in pairs) == caught, row


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHCORE_BUNDLE_DIR", str(tmp_path / "no-bundles"))
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(tmp_path / "user.db"))
    dispatch.clear()
    yield tmp_path
    dispatch.clear()


@interpreter
def test_interpreter_tune_of_attn_varlen_end_to_end(paths, monkeypatch, capsys):
    db = paths / "tuning.db"
    argv = ["--interpret", "--kernels", "attn_varlen", "--db", str(db), "--storage", str(paths / "studies.journal"),
            "--quiet", "--feature", "page_size=16", "--trials", "2"]
    assert tune.main(argv) == 0
    out = capsys.readouterr().out
    assert "1/1 buckets tuned" in out and "attn_varlen" in out
    with TuningDB(db, readonly=True) as handle:
        (record,) = handle.records()
    assert record.template == "attn_varlen" and record.gpu == "interpreter"
    assert record.bucket == (256, 32, 128) and record.evaluations == 2 and record.metric_unit == "TFLOP/s"
    assert OP.check_config(OP.spec_of(call_for({**INTERP_FEATURES, "page_size": 16}, record.bucket), 0),
                           record.config, record.bucket) is None

    # dispatch serves the record to a chunked-prefill call of the bucket, and the answer is right
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(db))
    dispatch.clear()
    inputs = make_inputs([32, 20, 7], [100, 50, 7], 2, 1, 32, "fp16", page_size=16, device="cpu", max_seqlen_q=32,
                         max_seqlen_k=128)
    from flashcore.reference import assert_close_varlen
    out = flashcore.flash_attn_varlen_func(inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                                           32, 128, causal=True, block_table=inputs.block_table)
    assert_close_varlen(out, inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k, causal=True,
                        block_table=inputs.block_table)
    call = host.call_of(inputs.q, inputs.k, inputs.cu_seqlens_q, 32, 128, inputs.block_table, True, False, False, False)
    choice = dispatch.last_choice(host.spec_of(call, 0), OP.bucket_of(call))
    assert OP.bucket_of(call) == (128, 32, 128)      # 59 tokens x 2 heads: the nearest bucket is the tuned one
    assert choice.source == "nearest bucket" and choice.config == record.config

    # re-running the finished plan measures nothing new
    capsys.readouterr()
    assert tune.main(argv) == 0
    assert "cached" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("bucket,page_size", [((1 << 17, 1024, 1024), 0), ((1 << 17, 512, 8192), 16)])
def test_gpu_problem_runs_and_checks_the_default_and_another_config(bucket, page_size):
    """A GPU plan bucket's problem: the timed call runs, the check passes the default and an initial-design config
    and fails a corrupted output."""
    features = {"dtype": "bf16", "head_dim": 128, "causal": True, "gqa_group": 4, "page_size": page_size}
    call = call_for(features, bucket)
    spec = OP.spec_of(call, torch.cuda.get_device_capability()[0] * 10 + torch.cuda.get_device_capability()[1])
    problem = TUNING.make_problem(spec, call, "cuda")
    default = OP.default_config(problem.spec)
    assert problem.runner(default)(0).shape == (call.total_q, call.heads_q, call.head_dim)
    for config in [default] + TUNING.initial_configs(problem.spec, bucket)[:1]:
        result = problem.check(config)
        assert result.ok, (config, result)
