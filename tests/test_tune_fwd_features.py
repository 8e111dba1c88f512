"""attn_fwd's tuning problem for Mistral's and Gemma's specs: window and softcap tune on the models' own values,
their checks hold the kernel to the windowed / capped reference, their work counts the keys the rows see, and
`flashcore-tune --feature window=true --feature softcap=true` writes their records."""
from __future__ import annotations

import pytest
import torch

from flashcore import dispatch
from flashcore.counts import visible_keys
from flashcore.ops.attn_fwd.call import AttnFwdCall
from flashcore.ops.attn_fwd.host import build_spec, default_config
from flashcore.ops.attn_fwd import tuning as fwd_tuning
from flashcore.models import SOFTCAP, WINDOW
from flashcore.ops.attn_fwd.tuning import TUNING, attention_options
from flashcore.reference import attention_ref
from flashcore.tools import tune
from flashcore.tuning_db import TuningDB


def call(seqlen: int, causal: bool, window: bool, softcap: bool) -> AttnFwdCall:
    return AttnFwdCall(2, seqlen, seqlen, 4, 2, 32, "fp16", causal, window, softcap)


def window_of(tuned: AttnFwdCall) -> tuple[int, int]:
    return attention_options(tuned)["window_size"]


def test_the_window_is_the_models_and_masks_at_every_bucket():
    assert window_of(call(64, True, True, False)) == (32, 0)            # half the keys: it masks
    assert window_of(call(64, False, True, False)) == (32, 32)
    assert window_of(call(16384, True, True, False)) == (WINDOW, 0)     # Mistral's / Gemma's 4096 where it masks
    assert window_of(call(64, True, False, True)) == (-1, 0)
    assert attention_options(call(64, False, False, True)) == dict(causal=False, window_size=(-1, -1), softcap=SOFTCAP)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window, softcap", [(True, False), (False, True), (True, True)])
def test_the_problem_runs_and_checks_the_windowed_or_capped_attention(cpu_only, causal, window, softcap):
    tuned = call(64, causal, window, softcap)
    spec = build_spec(0, "fp16", 32, causal, window, softcap, gqa_group=2)
    problem = TUNING.make_problem(spec, tuned, "cpu")
    assert problem.spec == spec
    assert problem.work == 4 * 2 * 4 * 32 * visible_keys(64, 64, causal, window_of(tuned))
    config = default_config(spec)
    result = problem.check(config)
    assert result.ok, result
    # what the problem times: the attention with the tuned options (the check holds the kernel to them)
    q, k, v = (torch.randn(2, 64, h, 32, dtype=torch.float16) for h in (4, 2, 2))
    out = fwd_tuning._launch(q, k, v, tuned, config)
    want = attention_ref(q, k, v, **attention_options(tuned))[0]
    plain = attention_ref(q, k, v, causal=causal)[0]
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=0)
    assert (want - plain).abs().max() > 2e-3        # (a kernel without the options would fail the line above)


def test_flashcore_tune_writes_window_and_softcap_records(cpu_only, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(tmp_path / "none.db"))
    dispatch.clear()
    db = tmp_path / "tuning.db"
    code = tune.main(["--interpret", "--quiet", "--storage", "memory", "--db", str(db), "--kernels", "attn_fwd",
                      "--feature", "causal=true", "--feature", "window=true", "--feature", "softcap=true",
                      "--buckets", "32x32x2", "--trials", "2"])
    assert code == 0
    with TuningDB(db) as handle:
        records = handle.records(template="attn_fwd")
    specs = {r.spec for r in records}
    assert specs == {build_spec(0, "fp16", 32, True, True, True).key()}
    dispatch.clear()
