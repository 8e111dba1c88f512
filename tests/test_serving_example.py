"""examples/serve.py, the serving-loop demonstration: every request finishes with its tokens, the cache gives every
block back, and the greedy tokens are the model's own (full causal recompute, no cache). CPU: the tiny model through
the interpreter (fp32). GPU: the ~0.5B-shaped model in bf16, decode-only steps from CUDA graphs against the same
run without graphs."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from flashcore.reference import attention_ref

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "serve.py"


def load_example():
    spec = importlib.util.spec_from_file_location("serve_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                 # (its dataclasses look their module up while being defined)
    spec.loader.exec_module(module)
    return module


def recompute_logits(serve, shape, request, dtype, device):
    """(len(tokens), V) float64 logits of the request's whole token list, full causal attention, no cache: the
    same weights (make_weights is seeded) in float64."""
    model = serve.Model(shape, torch.float64, device, len(request.tokens))
    tokens = torch.tensor(request.tokens, device=device)

    def attend(layer, q, k, v):
        return attention_ref(q[None], k[None], v[None], causal=True)[0][0]
    return model.forward(tokens, torch.arange(len(tokens), device=device), attend)


def test_the_cpu_run_serves_every_request_with_the_models_own_greedy_tokens(cpu_only, capsys):
    serve = load_example()
    shape = serve.SHAPES["tiny"]
    requests = serve.make_requests(5, 0.0, shape.vocab, max_prompt=40, max_new=4, seed=3)
    assert max(len(r.prompt) for r in requests) > 16                 # some prompts take several chunks
    report = serve.serve(shape, requests, torch.float32, "cpu", block_size=4, num_blocks=128, chunk=16,
                         token_budget=24)
    assert [r.rid for r in report.requests] == list(range(5))
    assert all(r.done and len(r.token_times) == r.max_new for r in report.requests)
    assert report.steps > max(len(r.prompt) for r in requests) // 16    # chunked: more steps than one prefill
    for request in report.requests:
        logits = recompute_logits(serve, shape, request, torch.float64, "cpu")
        for i, token in enumerate(request.generated):
            row = logits[len(request.prompt) - 1 + i]
            top2 = row.topk(2).values
            if top2[0] - top2[1] > 1e-3:                               # (a near tie may go either way in fp32)
                assert token == int(row.argmax()), (request.rid, i)
    assert "output tokens/s" in report.summary() and "ms per output token" in report.summary()
    serve.main(["--requests", "2", "--max-prompt", "20", "--max-new", "2", "--chunk", "8"])
    assert "2 requests" in capsys.readouterr().out


@pytest.mark.gpu
def test_decode_steps_from_cuda_graphs_give_the_eager_runs_tokens():
    serve = load_example()
    shape = serve.SHAPES["small"]

    def run(graphs: bool):
        requests = serve.make_requests(24, 0.0, shape.vocab, max_prompt=600, max_new=24, seed=1)
        return serve.serve(shape, requests, torch.bfloat16, "cuda", graphs=graphs)

    graphed, eager = run(True), run(False)
    assert graphed.graph_steps > 0 and eager.graph_steps == 0
    assert all(r.done for r in graphed.requests)
    same = sum(a == b for g, e in zip(graphed.requests, eager.requests) for a, b in zip(g.generated, e.generated))
    # bf16 through two different decode kernels (varlen vs kvcache): a rare near tie may flip a greedy token, and
    # the request's tokens after it then differ too
    assert same >= 0.9 * eager.output_tokens, (same, eager.output_tokens)
    print(graphed.summary())
