"""examples/serve.py, the serving-loop demonstration, with FlashCore's attention and with SDPA's: every request
finishes with its tokens, and the greedy tokens are the model's own (full causal recompute, no cache); the decode
step that the GPU replays from CUDA graphs gives the model's own logits (run eagerly here); the sweep prints and
writes its figures. CPU: the tiny model through the interpreter (fp32). GPU: the ~0.5B-shaped model in bf16,
decode-only steps from CUDA graphs against the same run without graphs, and the SDPA loop against FlashCore's."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flashcore import PagedKVCache
from flashcore.reference import attention_ref

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "serve.py"
ATTENTIONS = ["flashcore", "sdpa"]


def load_example():
    spec = importlib.util.spec_from_file_location("serve_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                 # (its dataclasses look their module up while being defined)
    spec.loader.exec_module(module)
    return module


def recompute_logits(serve, shape, tokens: list[int], device):
    """(len(tokens), V) float64 logits of the whole token list, full causal attention, no cache: the same weights
    (make_weights is seeded) in float64."""
    model = serve.Model(shape, torch.float64, device, len(tokens))
    tokens = torch.tensor(tokens, device=device)

    def attend(layer, q, k, v):
        return attention_ref(q[None], k[None], v[None], causal=True)[0][0]
    return model.forward(tokens, torch.arange(len(tokens), device=device), attend)


def same_tokens(a, b) -> int:
    """Greedy tokens two reports of the same requests agree on, position by position."""
    return sum(x == y for ra, rb in zip(a.requests, b.requests) for x, y in zip(ra.generated, rb.generated))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_the_cpu_run_serves_every_request_with_the_models_own_greedy_tokens(cpu_only, capsys, attention):
    serve = load_example()
    shape = serve.SHAPES["tiny"]
    requests = serve.make_requests(5, 0.0, shape.vocab, max_prompt=40, max_new=4, seed=3)
    assert max(len(r.prompt) for r in requests) > 16                 # some prompts take several chunks
    report = serve.serve(shape, requests, torch.float32, "cpu", block_size=4, num_blocks=128, chunk=16,
                         token_budget=24, attention=attention)
    assert [r.rid for r in report.requests] == list(range(5))
    assert all(r.done and len(r.token_times) == r.max_new for r in report.requests)
    assert report.steps > max(len(r.prompt) for r in requests) // 16    # chunked: more steps than one prefill
    for request in report.requests:
        logits = recompute_logits(serve, shape, request.tokens, "cpu")
        for i, token in enumerate(request.generated):
            row = logits[len(request.prompt) - 1 + i]
            top2 = row.topk(2).values
            if top2[0] - top2[1] > 1e-3:                               # (a near tie may go either way in fp32)
                assert token == int(row.argmax()), (request.rid, i)
    assert "output tokens/s" in report.summary() and "ms per output token" in report.summary()
    serve.main(["--requests", "2", "--max-prompt", "20", "--max-new", "2", "--chunk", "8", "--attention", attention])
    assert f"{attention}: 2 requests" in capsys.readouterr().out


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_the_graphed_decode_step_gives_the_models_own_logits(cpu_only, monkeypatch, attention):
    """DecodeGraphs' step, run eagerly (the CPU has no graphs): three sequences padded to a batch of four (the
    fourth row writes into the scratch sequence), two steps (the second reads what the first stored). SDPA gathers
    keys in buckets of 8 tokens here, fewer than the table's 10 blocks of 4."""
    serve = load_example()
    monkeypatch.setattr(serve, "KEY_BUCKET", 8)
    shape = serve.SHAPES["tiny"]
    cache = PagedKVCache(shape.layers, 64, 4, shape.heads_kv, shape.head_dim, dtype=torch.float32, device="cpu",
                         max_seqlen=40)
    model = serve.Model(shape, torch.float32, "cpu", cache.capacity)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, shape.vocab, (n,), generator=g).tolist() for n in (5, 17, 9)]
    ids = list(range(len(seqs)))
    for rid in ids:
        cache.add_sequence(rid)
    logits = serve.mixed_step(model, cache, ids, seqs, chunk=17, attention=attention)
    graphs = serve.DecodeGraphs(model, cache, attention)
    for _ in range(2):
        for seq, token in zip(seqs, logits.argmax(-1).tolist()):
            seq.append(token)
        key, inputs = graphs.inputs(ids, [seq[-1] for seq in seqs])
        # the longest sequence holds 17 or 18 tokens and takes one more: 5 blocks, 6 in buckets of 2 blocks
        assert key == (4 if attention == "flashcore" else (4, 6))
        logits = graphs.decode(*inputs)[:len(ids)]
        cache.commit(ids, 1)
        for seq, row in zip(seqs, logits):
            ref = recompute_logits(serve, shape, seq, "cpu")[-1]
            torch.testing.assert_close(row.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    assert [cache.length(rid) for rid in ids] == [len(seq) for seq in seqs]


def test_the_sweep_prints_and_writes_each_runs_figures(cpu_only, tmp_path, capsys):
    serve = load_example()
    path = tmp_path / "serve.json"
    serve.main(["--sweep", "2,3", "--attention", "flashcore,sdpa", "--max-prompt", "12", "--max-new", "3",
                "--chunk", "8", "--json", str(path)])
    result = json.loads(path.read_text())
    assert (result["model"], result["dtype"], result["rate"], result["warmup"]) == ("tiny", "float32", 0.0, True)
    runs = result["runs"]
    assert [(r["requests"], r["attention"]) for r in runs] == [(2, "flashcore"), (2, "sdpa"), (3, "flashcore"),
                                                               (3, "sdpa")]
    for r in runs:
        requests = serve.make_requests(r["requests"], 0.0, serve.SHAPES["tiny"].vocab, 12, 3, seed=0)
        assert r["output_tokens"] == sum(q.max_new for q in requests)
        assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["wall_s"])
        assert r["ms_per_output_token"] > 0 and r["steps"] >= 3 and r["graph_steps"] == 0
    out = capsys.readouterr().out
    assert "| concurrent requests | attention | output tokens | output tokens/s | ms per output token |" in out
    assert out.count("| sdpa |") == 2 and out.count("| flashcore |") == 2
    with pytest.raises(SystemExit):
        serve.main(["--attention", "flashcore,flash"])


def gpu_requests(serve, shape):
    return serve.make_requests(24, 0.0, shape.vocab, max_prompt=600, max_new=24, seed=1)


def greedy_gaps(serve, shape, report, device="cuda") -> list[float]:
    """Per generated token: how far its float64 logit lies below the best one, for the token history the loop
    produced (0: the float64 model's own greedy choice). A loop in bf16 may pick the runner-up of a near tie."""
    model = serve.Model(shape, torch.float64, device, max(len(r.tokens) for r in report.requests))

    def attend(layer, q, k, v):
        return attention_ref(q[None], k[None], v[None], causal=True)[0][0]
    gaps = []
    for request in report.requests:
        tokens = torch.tensor(request.tokens, device=device)
        logits = model.forward(tokens, torch.arange(len(tokens), device=device), attend)
        rows = logits[len(request.prompt) - 1:len(request.tokens) - 1]
        chosen = rows.gather(1, torch.tensor(request.generated, device=device)[:, None])[:, 0]
        gaps += (rows.max(1).values - chosen).tolist()
    return gaps


def bf16_logits_error(serve, shape, requests, device="cuda") -> float:
    """The largest logit error of the bf16 model against float64 on the requests' prompts, attention by SDPA on
    the whole sequence: what bf16 itself loses, with no cache and no FlashCore."""
    model64 = serve.Model(shape, torch.float64, device, max(len(r.prompt) for r in requests))
    model16 = serve.Model(shape, torch.bfloat16, device, max(len(r.prompt) for r in requests))
    group = shape.heads_q // shape.heads_kv

    def attend(layer, q, k, v):
        q, k, v = q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1), v.repeat_interleave(
            group, 1).transpose(0, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
    error = 0.0
    for request in requests[:4]:
        tokens = torch.tensor(request.prompt, device=device)
        positions = torch.arange(len(tokens), device=device)
        reference = model64.forward(tokens, positions, lambda layer, q, k, v: attention_ref(
            q[None], k[None], v[None], causal=True)[0][0])
        error = max(error, float((model16.forward(tokens, positions, attend).double() - reference).abs().max()))
    return error


def assert_greedy_up_to_bf16_ties(serve, shape, *reports, device="cuda") -> None:
    """Every token each loop chose is the float64 model's greedy choice up to a near tie. A choice lies below the
    best logit by at most 2x the logits' error (the error of both); flash-attn's rule allows the kernel 2x what
    PyTorch loses in the same dtype: 4x bf16's own error (measured here with SDPA, no cache)."""
    bound = 4 * bf16_logits_error(serve, shape, reports[0].requests, device)
    for report in reports:
        gaps = greedy_gaps(serve, shape, report, device)
        print(f"{report.attention} ({report.graph_steps} steps from graphs): {sum(g > 0 for g in gaps)} of "
              f"{len(gaps)} tokens below the float64 best, "
              f"by at most {max(gaps):.4f} (bound {bound:.4f})")
        assert max(gaps) <= bound, (report.attention, max(gaps), bound)


@pytest.mark.gpu
def test_decode_steps_from_cuda_graphs_serve_the_models_greedy_tokens():
    serve = load_example()
    shape = serve.SHAPES["small"]
    graphed = serve.serve(shape, gpu_requests(serve, shape), torch.bfloat16, "cuda", graphs=True)
    eager = serve.serve(shape, gpu_requests(serve, shape), torch.bfloat16, "cuda", graphs=False)
    assert graphed.graph_steps > 0 and eager.graph_steps == 0
    assert all(r.done for r in graphed.requests)
    # graphed decode steps run the KV-cache kernel, eager ones varlen: where a near tie flips a token, the
    # request's later tokens differ too, so each run is checked against the float64 model on its own history
    assert_greedy_up_to_bf16_ties(serve, shape, graphed, eager)
    print(graphed.summary(), f"\n{same_tokens(graphed, eager)} of {eager.output_tokens} tokens the same")


@pytest.mark.gpu
def test_the_sdpa_loop_and_flashcores_serve_the_models_greedy_tokens():
    """Both with their decode graphs, each checked on its own token history as above."""
    serve = load_example()
    shape = serve.SHAPES["small"]
    ours = serve.serve(shape, gpu_requests(serve, shape), torch.bfloat16, "cuda", attention="flashcore")
    sdpa = serve.serve(shape, gpu_requests(serve, shape), torch.bfloat16, "cuda", attention="sdpa")
    assert sdpa.graph_steps > 0 and all(r.done for r in sdpa.requests)
    assert_greedy_up_to_bf16_ties(serve, shape, ours, sdpa)
    print(ours.summary(), sdpa.summary(), f"{same_tokens(ours, sdpa)} of {sdpa.output_tokens} tokens the same",
          sep="\n")
