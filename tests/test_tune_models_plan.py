"""`flashcore-tune --plan models`: the buckets of the calls widely used open models make (flashcore/models.py):
prefill, decode, a server's varlen batches and training steps, planned for a GPU without one."""
from __future__ import annotations

import dataclasses

import pytest

from flashcore.models import DECODE_PAGES, MODELS, PREFILL_SHAPES
from flashcore.ops.attn_bwd.tuning import TUNING as BWD
from flashcore.ops.attn_decode.tuning import TUNING as DECODE
from flashcore.ops.attn_varlen.tuning import TUNING as VARLEN
from flashcore.ops.attn_fwd import OP
from flashcore.ops.attn_fwd.call import AttnFwdCall
from flashcore.ops.attn_varlen.call import AttnVarlenCall
from flashcore.ops.attn_fwd.tuning import TUNING
from flashcore.tools import tune


def test_every_models_prefill_call_has_its_spec_and_bucket_in_the_plan_once():
    plan = TUNING.model_plan(90, ["bf16"])
    assert len(plan) == len(set(plan))
    for model in MODELS:
        for layer in model.layers():
            for batch, tokens in PREFILL_SHAPES:
                call = AttnFwdCall(batch, tokens, tokens, layer.heads_q, layer.heads_kv, layer.head_dim, "bf16",
                                   causal=True, window=layer.window > 0, softcap=layer.softcap > 0)
                assert (OP.spec_of(call, 90), OP.bucket_of(call)) in plan, (model.name, batch, tokens)
    specs = {spec for spec, _ in plan}
    # Gemma 2's local layers: window and softcap; Qwen2.5's GQA group 7; Phi-3's head_dim 96 (no TMA)
    assert any(s["window"] and s["softcap"] and s["head_dim"] == 256 for s in specs)
    assert any(s["gqa_group"] == 7 for s in specs)
    assert any(s["head_dim"] == 96 and not s["tma"] for s in specs)
    assert all(s["causal"] and s["dtype"] == "bf16" for s in specs)


@pytest.mark.parametrize("tuning", [TUNING, DECODE, VARLEN, BWD], ids=["attn_fwd", "attn_decode", "attn_varlen",
                                                                     "attn_bwd"])
def test_the_models_plan_tunes_calls_of_its_buckets(tuning):
    plan = tuning.model_plan(90, ["fp16"])
    assert plan
    for spec, bucket in plan[::5]:
        call = tuning.call_of_bucket(spec, bucket)
        assert tuning.op.spec_of(call, 90) == spec and tuning.op.bucket_of(call) == bucket


def test_decode_steps_of_the_models_global_layers_on_both_caches():
    plan = DECODE.model_plan(90, ["bf16"])
    specs = {spec for spec, _ in plan}
    assert {s["page_size"] for s in specs} == set(DECODE_PAGES)
    assert any(s["window"] and s["softcap"] for s in specs)           # Gemma 2's local layers
    assert not any(s["causal"] and not s["window"] for s in specs)    # (a one-token causal query sees every key)
    assert {s["head_dim"] for s in specs} == {96, 128, 256}           # Phi-3; most; Gemma
    buckets = {bucket for _, bucket in plan}
    assert (8 * 128, 1024, 1) in buckets and (8, 32768, 1) in buckets  # Llama 8B at batch 128 / batch 1, 32k


def test_the_cli_plans_the_models_and_refuses_what_contradicts_them(capsys, monkeypatch):
    assert tune.main(["--gpu", "h100", "--plan", "models", "--dtypes", "bf16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{sum(len(t.model_plan(90, ['bf16'])) for t in (TUNING, DECODE, VARLEN, BWD))} buckets" in out
    assert any("softcap" in line and "window" in line for line in out.splitlines())      # Gemma 2's local layers
    for extra in (["--interpret"], ["--feature", "causal=true"], ["--buckets", "512x512x32"]):
        assert tune.main(["--gpu", "h100", "--plan", "models", "--dry-run", *extra]) == 2
    assert tune.main(["--gpu", "h100", "--plan", "models", "--kernels", "no_such_op", "--dry-run"]) == 2
    import flashcore.ops.attn_varlen.tuning as varlen_module
    monkeypatch.setattr(varlen_module, "TUNING", dataclasses.replace(VARLEN, model_calls=None))
    assert tune.main(["--gpu", "h100", "--plan", "models", "--kernels", "attn_varlen", "--dry-run"]) == 2
    assert "no models plan yet" in capsys.readouterr().err


@pytest.mark.parametrize("window, softcap", [(True, False), (False, True), (True, True)])
def test_decode_window_and_softcap_specs_tune_and_check_on_the_models_values(cpu_only, window, softcap):
    from flashcore.ops.attn_decode.call import AttnDecodeCall
    from flashcore.ops.attn_decode.host import default_config
    from flashcore.ops.attn_decode.tuning import scores_of
    call = AttnDecodeCall(2, 1, 4, 2, 32, 96, "fp16", page_size=16, causal=True, window=window, softcap=softcap)
    spec = DECODE.op.spec_of(call, 0)
    problem = DECODE.make_problem(spec, call, "cpu")
    left = scores_of(call)["window_size"][0]
    assert left == (48 if window else -1)                    # half the cache: the window masks
    assert problem.work == call.kv_bytes * ((left + 1) / 96 if window else 1)
    result = problem.check(default_config(spec))
    assert result.ok, result


def test_varlen_and_backward_plans_hold_the_serving_batches_and_training_steps():
    varlen = {spec for spec, _ in VARLEN.model_plan(90, ["bf16"])}
    assert {s["page_size"] for s in varlen} == {0, 16} and all(s["causal"] for s in varlen)
    assert any(s["window"] and s["softcap"] for s in varlen)          # Gemma 2's local layers
    bwd = BWD.model_plan(90, ["bf16"])
    assert any(s["window"] and s["softcap"] for s, _ in bwd) and all(s["causal"] for s, _ in bwd)
    llama = BWD.model_calls(MODELS[0], "bf16")[1]               # Llama 3.1 8B, 8 x 2048
    assert (llama.batch, llama.seqlen_q, llama.heads_q) == (8, 2048, 32)
    assert (BWD.op.spec_of(llama, 90), (2048, 2048, 256)) in bwd


@pytest.mark.parametrize("page_size", [0, 16])
@pytest.mark.parametrize("window, softcap", [(True, False), (False, True)])
def test_varlen_window_and_softcap_specs_tune_and_check_on_the_models_values(cpu_only, page_size, window, softcap):
    from flashcore.counts import useful_flops
    from flashcore.ops.attn_varlen.host import default_config
    from flashcore.ops.attn_varlen.tuning import lengths_of, scores_of
    call = VARLEN.call_of_bucket(VARLEN.op.spec_of(AttnVarlenCall(2, 128, 64, 64 if not page_size else 128, 2, 1, 32,
                                                                   "fp16", page_size=page_size, causal=True,
                                                                   window=window, softcap=softcap), 0),
                                 (256, 64, 64 if not page_size else 128))
    spec = VARLEN.op.spec_of(call, 0)
    problem = VARLEN.make_problem(spec, call, "cpu")
    left = call.max_seqlen_k // 2 if window else -1                    # half the keys: the window masks
    assert scores_of(call)["window_size"] == (left, 0)
    q_lens, k_lens = lengths_of(call)
    assert problem.work == useful_flops(q_lens, k_lens, call.heads_q, 32, True, (left, 0))
    result = problem.check(default_config(spec))
    assert result.ok, result


@pytest.mark.parametrize("window, softcap", [(True, False), (False, True)])
def test_backward_window_and_softcap_specs_tune_and_check_on_the_models_values(cpu_only, window, softcap):
    from flashcore.counts import visible_keys
    from flashcore.ops.attn_bwd.host import default_config
    spec = BWD.op.spec_of(BWD.call_for(dict(dtype="fp16", head_dim=32, causal=True, gqa_group=1, window=window,
                                            softcap=softcap), (32, 32, 2)), 0)
    call = BWD.call_of_bucket(spec, (32, 32, 2))
    assert (call.window, call.softcap) == (window, softcap)
    problem = BWD.make_problem(spec, call, "cpu")
    window_size = (16, 0) if window else (-1, 0)                          # half the keys: the window masks
    assert problem.work == 2.5 * 4 * call.batch * call.heads_q * 32 * visible_keys(32, 32, True, window_size)
    result = problem.check(default_config(spec))
    assert result.ok, result
