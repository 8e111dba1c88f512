"""flash_attn_varlen_func's sm90 path (tensor descriptors over the packed q / k / v or the paged cache), run here
under the Triton interpreter, whose descriptor loads zero-fill past a tensor's end as the copy engine does.

A descriptor does not stop at a sequence's end: a key tile may run into the next sequence's rows (packed) or a
block's unwritten tail (paged). These tests hold that such rows change nothing: the NaN-tailed buffers and NaN
cache slots of tests/test_varlen.py, and a neighbouring sequence whose values are inf, which must not reach any
other sequence's rows. On a GPU machine the runtime takes this path on its own (tests/test_varlen_gpu.py).
"""
from __future__ import annotations

import pytest
import torch

import flashcore
from flashcore import dispatch
from flashcore.generator import KernelSpec
from flashcore.ops.attn_varlen import host
from flashcore.reference import assert_close_varlen
from poison import poisoned_allocations
from test_varlen import INTERPRET, make_paged, make_varlen, run_and_check, run_with_config

FP16 = torch.float16
pytestmark = [] if INTERPRET else [pytest.mark.gpu_extended]


@pytest.fixture(autouse=True)
def tma_path(monkeypatch):
    """Under the interpreter every call takes the descriptor path where a sm90 card would (power-of-two head_dim,
    packed K/V or blocks of a multiple of host.TMA_PAGE keys), with the interpreter's tiles; on a card, the spec
    the runtime picks. Either way the kernels built are checked to be TMA ones."""
    if torch.cuda.is_available() and not INTERPRET and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the descriptor path is sm90's")
    specs = []
    runtime_spec = host.make_spec

    def make_spec(q, k, v, call):
        spec = runtime_spec(q, k, v, call)
        if not q.is_cuda:           # the interpreter: sm90's rule for this call (spec_of), the interpreter's arch
            spec = KernelSpec.make(spec.op, **{**spec.as_dict(), "tma": host.spec_of(call, 90)["tma"]})
        specs.append(spec)
        return spec

    monkeypatch.setattr(host, "make_spec", make_spec)
    dispatch.clear()            # (forgets kept plans of the pointer path)
    yield specs
    dispatch.clear()
    assert specs and all(s["tma"] for s in specs), "the calls did not take the descriptor path"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mixed_lengths_with_empty_and_single_token_sequences(causal, device):
    lens = [5, 0, 33, 1, 17, 0]
    run_and_check(make_varlen(lens, lens, 2, 1, 64, FP16, device), causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seqlen_q_differs_from_seqlen_k_per_sequence(causal, device):
    run_and_check(make_varlen([3, 30, 1, 20, 7, 0], [40, 9, 33, 0, 7, 12], 4, 2, 32, FP16, device),
                  causal=causal)


def test_window_softcap_alibi(device):
    args = make_varlen([6, 41, 19], [50, 41, 3], 2, 1, 64, FP16, device)
    run_and_check(args, causal=True, window_size=(18, -1), softcap=5.0, alibi_slopes=torch.rand(2, device=device))


@pytest.mark.parametrize("block_size,causal", [(64, True), (128, False)])
def test_paged_blocks_with_unwritten_tails(block_size, causal, device):
    """Shuffled tables; the slots past each sequence's keys in its last block are NaN (a tile reads them)."""
    run_and_check(make_paged([9, 0, 70, 1], [37, 0, 140, 64], block_size, 2, 1, 64, FP16, device), causal=causal)


def test_chunked_prefill_over_a_paged_prefix(device):
    prefix, new = [40, 0, 70, 20], [8, 13, 30, 1]
    keys = [p + n for p, n in zip(prefix, new)]
    run_and_check(make_paged(new, keys, 64, 4, 1, 32, FP16, device), causal=True)


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
def test_a_sequence_never_sees_its_neighbours_values(paged, device):
    """The second sequence's keys and values are inf: every other sequence's rows stay right (a key tile of the
    first one runs into them); the second one's own rows are not checked."""
    lens_q, lens_k = [5, 7, 20], [37, 30, 20]
    args = make_paged(lens_q, lens_k, 64, 2, 1, 64, FP16, device) if paged else \
        make_varlen(lens_q, lens_k, 2, 1, 64, FP16, device)
    poisoned = {name: args[name].clone() for name in ("k", "v")}
    if paged:
        table = args["block_table"]
        for name in ("k", "v"):
            poisoned[name][table[1, 0]] = float("inf")      # the whole block: its tail too
    else:
        for name in ("k", "v"):
            poisoned[name][37:67] = float("inf")
    with poisoned_allocations():
        out, lse, _ = flashcore.flash_attn_varlen_func(**{**args, **poisoned}, causal=True, return_attn_probs=True)
    for b, rows in ((0, slice(0, 5)), (2, slice(12, 32))):
        one = {name: args[name] for name in ("q", "k", "v")}
        cu_k = args["cu_seqlens_k"]
        assert torch.isfinite(out[rows]).all(), f"sequence {b} saw its neighbour's inf"
        assert_close_varlen(out[rows], one["q"][rows], one["k"] if paged else one["k"][cu_k[b]:cu_k[b + 1]],
                            one["v"] if paged else one["v"][cu_k[b]:cu_k[b + 1]],
                            torch.tensor([0, rows.stop - rows.start], dtype=torch.int32, device=device),
                            torch.tensor([0, int(cu_k[b + 1] - cu_k[b])], dtype=torch.int32, device=device),
                            lse=lse[:, rows], block_table=args["block_table"][b:b + 1] if paged else None,
                            causal=True)


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
@pytest.mark.parametrize("config", [{"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
                                    {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}],
                         ids=["m16n64", "m64n16"])
def test_explicit_tile_configs(config, paged, device):
    lens_q, lens_k = [5, 0, 40, 17], [33, 2, 80, 9]
    args = make_paged(lens_q, lens_k, 64, 2, 1, 64, FP16, device) if paged else \
        make_varlen(lens_q, lens_k, 2, 1, 64, FP16, device)
    run_with_config(args, config)

