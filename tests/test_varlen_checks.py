"""Every bad input of flash_attn_varlen_func (flashcore/varlen.py's checks and the value checks of
flashcore/ops/attn_varlen/host.py and the kernel): rejected with the expected exception type and a message naming
the argument.

Types, ranks, shapes, dtypes and devices (cu_seqlens, max_seqlen, q / k / v, head_dim, heads, block_table,
alibi_slopes) raise at the call in every mode. Values (cu_seqlens rising from 0 to total_q / total_k, lengths
within max_seqlen and the block table's capacity, used block-table entries in [0, num_blocks)) raise at the call
for CPU tensors by default (strict mode on a GPU). Deferred value checks ($FLASHCORE_KV_CHECKS=deferred, the GPU's
default; run under the interpreter here): the bad call does not raise, the failing sequences' rows are NaN and the
other sequences are right, and the next FlashCore call (varlen, dense, or check_errors) raises once, naming the
argument and the failing call. Also: dropout_p != 0 and a paged call whose inputs require grad raise
NotImplementedError (the latter runs under torch.no_grad()); packed K/V has a backward (test_backward_varlen.py).

Each call refused at the call runs cold (dispatch cleared: no kept plan) and warm (right after a valid call of the
same signature, whose kept plan the bad call must not slip through); a deferred one runs warm (a bad value that
changes the signature, max_seqlen, runs cold there anyway).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import flashcore
from flashcore import dispatch
from flashcore.reference import assert_close_attention, assert_close_varlen, varlen_sequences
from flashcore.value_errors import REPORTERS, pending_error
from test_kvcache_checks import _set, _set_item, other_device

HEADS_Q, HEADS_KV, HEAD_DIM = 1, 1, 64        # (one head: the interpreter runs a program per head)
LENS_Q, LENS_K = [3, 2, 5], [4, 2, 6]         # total_q 10, total_k 12; max_seqlen 5 / 6
BLOCK, MAX_BLOCKS, NUM_BLOCKS = 4, 3, 10      # paged: capacity 12, one spare block


@pytest.fixture(autouse=True)
def _no_report_left_pending():
    """A test that fails half-way may leave a deferred failure pending: dropped after each test, so that the next
    one starts clean."""
    yield
    for device in list(REPORTERS):
        pending_error(device)


def cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def valid_args(layout: str, device) -> dict:
    """A valid causal call on packed K/V or a paged cache (a shuffled table over NUM_BLOCKS blocks)."""
    def rand(*shape):
        return torch.randn(*shape, device=device).to(torch.float16)
    args = dict(q=rand(sum(LENS_Q), HEADS_Q, HEAD_DIM), cu_seqlens_q=cu(LENS_Q, device),
                cu_seqlens_k=cu(LENS_K, device), max_seqlen_q=max(LENS_Q), max_seqlen_k=max(LENS_K), causal=True)
    if layout == "paged":
        table = torch.randperm(NUM_BLOCKS)[: len(LENS_K) * MAX_BLOCKS].reshape(len(LENS_K), MAX_BLOCKS)
        return dict(args, k=rand(NUM_BLOCKS, BLOCK, HEADS_KV, HEAD_DIM), v=rand(NUM_BLOCKS, BLOCK, HEADS_KV, HEAD_DIM),
                    block_table=table.to(torch.int32).to(device))
    return dict(args, k=rand(sum(LENS_K), HEADS_KV, HEAD_DIM), v=rand(sum(LENS_K), HEADS_KV, HEAD_DIM))


def _cast(name, dtype):
    return _set(name, lambda args, device: args[name].to(dtype))


def _move(name):
    return _set(name, lambda args, device: args[name].to(other_device(device)))


def _both(*mutations):
    def mutate(args, device):
        for m in mutations:
            m(args, device)
    return mutate


def _resized(name, heads=None, head_dim=None):
    """args[name] replaced by random values with `heads` heads and / or `head_dim` (its other sizes kept)."""
    def make(args, device):
        shape = list(args[name].shape)
        shape[-2] = shape[-2] if heads is None else heads
        shape[-1] = shape[-1] if head_dim is None else head_dim
        return torch.randn(*shape, device=device).to(args[name].dtype)
    return _set(name, make)


# (id, layouts it applies to, mutation of a valid call, exception type, regex the message must contain)
BAD_ARGUMENTS = [
    # cu_seqlens
    ("cu_seqlens_q_int64", "both", _cast("cu_seqlens_q", torch.int64), TypeError, r"cu_seqlens_q must be int32"),
    ("cu_seqlens_k_int64", "both", _cast("cu_seqlens_k", torch.int64), TypeError, r"cu_seqlens_k must be int32"),
    ("cu_seqlens_q_a_list", "both", _set("cu_seqlens_q", [0, 3, 5, 10]), TypeError,
     r"cu_seqlens_q must be an int32 torch.Tensor"),
    ("cu_seqlens_q_2d", "both", _set("cu_seqlens_q", lambda args, device: args["cu_seqlens_q"][None]), ValueError,
     r"cu_seqlens_q must have 1 dimension"),
    ("cu_seqlens_k_2d", "both", _set("cu_seqlens_k", lambda args, device: args["cu_seqlens_k"][None]), ValueError,
     r"cu_seqlens_k must have 1 dimension"),
    ("cu_seqlens_lengths_differ", "both", _set("cu_seqlens_k", lambda args, device: args["cu_seqlens_k"][:-1]),
     ValueError, r"cu_seqlens_q and cu_seqlens_k must both have shape \(batch \+ 1,\)"),
    ("cu_seqlens_q_no_sequence", "both",
     _both(_set("cu_seqlens_q", lambda args, device: cu([], device)),
           _set("cu_seqlens_k", lambda args, device: cu([], device))), ValueError, r"cu_seqlens_q has no sequence"),
    ("cu_seqlens_q_elsewhere", "both", _move("cu_seqlens_q"), ValueError, r"cu_seqlens_q is on"),
    ("cu_seqlens_k_elsewhere", "both", _move("cu_seqlens_k"), ValueError, r"cu_seqlens_k is on"),
    # max_seqlen
    ("max_seqlen_q_float", "both", _set("max_seqlen_q", 5.0), TypeError, r"max_seqlen_q must be an int"),
    ("max_seqlen_q_tensor", "both", _set("max_seqlen_q", lambda args, device: torch.tensor(5)), TypeError,
     r"max_seqlen_q must be an int"),
    ("max_seqlen_k_bool", "both", _set("max_seqlen_k", True), TypeError, r"max_seqlen_k must be an int"),
    ("max_seqlen_k_negative", "both", _set("max_seqlen_k", -1), ValueError, r"max_seqlen_k must be an int >= 0"),
    # q, k, v
    ("q_rank", "both", _set("q", lambda args, device: args["q"][None]), ValueError, r"\bq must have 3 dimensions"),
    ("k_rank", "both", _set("k", lambda args, device: args["k"][None] if args["k"].dim() == 3 else args["k"][0]),
     ValueError, r"\bk must have [34] dimensions"),
    ("q_float64", "both", _cast("q", torch.float64), TypeError, r"\bq must be float16, bfloat16 or float32"),
    ("v_dtype_differs", "both", _cast("v", torch.float32), TypeError, r"\bv has dtype torch.float32"),
    ("v_shape_differs", "both", _set("v", lambda args, device: args["v"][:-1]), ValueError,
     r"k and v must have the same shape"),
    ("head_dim_59", "both", _both(*(_resized(name, head_dim=59) for name in "qkv")), ValueError,
     r"head_dim must be a multiple of 8 in \[16, 256\], got 59"),
    ("head_dim_q_vs_k", "both", _resized("q", head_dim=32), ValueError, r"head_dim mismatch: q has 32"),
    ("heads_not_a_multiple", "both", _both(_resized("q", heads=3), _resized("k", heads=2), _resized("v", heads=2)),
     ValueError, r"query heads \(3\) must be a multiple of the number of key/value heads \(2\)"),
    ("q_elsewhere", "both", _move("q"), ValueError, r"\bq is on"),
    ("k_elsewhere", "both", _move("k"), ValueError, r"\bk is on"),
    # block_table
    ("block_table_int64", "paged", _cast("block_table", torch.int64), TypeError, r"block_table must be int32"),
    ("block_table_1d", "paged", _set("block_table", lambda args, device: args["block_table"][0]), ValueError,
     r"block_table must have 2 dimensions"),
    ("block_table_rows", "paged", _set("block_table", lambda args, device: args["block_table"][:-1]), ValueError,
     r"block_table must have shape \(batch 3, max_blocks >= 1\)"),
    ("block_table_not_contiguous", "paged", _set("block_table", lambda args, device: args["block_table"][:, ::2]),
     ValueError, r"block_table must be contiguous"),
    ("block_table_elsewhere", "paged", _move("block_table"), ValueError, r"block_table is on"),
    # alibi_slopes
    ("alibi_slopes_shape", "packed", _set("alibi_slopes", lambda args, device: torch.rand(HEADS_Q + 1, device=device)),
     ValueError, r"alibi_slopes must have shape \(1,\) or \(3, 1\)"),
    ("alibi_slopes_fp16", "packed",
     _set("alibi_slopes", lambda args, device: torch.rand(HEADS_Q, device=device).half()), TypeError,
     r"alibi_slopes must be float32"),
]


# (id, layouts, mutation, regex the message must contain, the sequences whose rows a deferred check turns to NaN;
# None: rows that overlap another sequence's or only some of whose rows see the failure, not compared)
BAD_VALUES = [
    ("cu_seqlens_q_not_from_0", "both", _set_item("cu_seqlens_q", 0, 1),
     r"cu_seqlens_q\[0\], cu_seqlens_q\[1\] = 1, 3", {0}),
    ("cu_seqlens_q_decreasing", "both", _set_item("cu_seqlens_q", 2, 2),
     r"cu_seqlens_q\[1\], cu_seqlens_q\[2\] = 3, 2", None),
    ("cu_seqlens_q_decreasing_at_the_end", "both", _set_item("cu_seqlens_q", 3, 4),
     r"cu_seqlens_q\[2\], cu_seqlens_q\[3\] = 5, 4", {2}),
    ("cu_seqlens_q_short_of_total_q", "both", _set_item("cu_seqlens_q", 3, 9),
     r"cu_seqlens_q\[2\], cu_seqlens_q\[3\] = 5, 9: expected cu_seqlens_q to rise from 0 to total_q = 10", {2}),
    ("cu_seqlens_k_not_from_0", "both", _set_item("cu_seqlens_k", 0, 1),
     r"cu_seqlens_k\[0\], cu_seqlens_k\[1\] = 1, 4", {0}),
    ("cu_seqlens_k_decreasing", "both", _set_item("cu_seqlens_k", 2, 3),     # (sequence 2 then has 9 keys > 6)
     r"cu_seqlens_k\[1\], cu_seqlens_k\[2\] = 4, 3", {1, 2}),
    ("cu_seqlens_k_short_of_total_k", "packed", _set_item("cu_seqlens_k", 3, 11),
     r"cu_seqlens_k\[2\], cu_seqlens_k\[3\] = 6, 11(.|\n)*total_k = 12", {2}),
    ("cu_seqlens_k_beyond_total_k", "packed", _set_item("cu_seqlens_k", 3, 13),
     r"cu_seqlens_k\[2\], cu_seqlens_k\[3\] = 6, 13", {2}),
    ("max_seqlen_q_too_small", "both", _set("max_seqlen_q", 4),
     r"sequence 2 has 5 query tokens \(cu_seqlens_q\), more than max_seqlen_q = 4", {2}),
    ("max_seqlen_k_too_small", "both", _set("max_seqlen_k", 5),
     r"sequence 2 has 6 keys \(cu_seqlens_k\), more than max_seqlen_k = 5", {2}),
    ("keys_beyond_the_table_capacity", "paged", _both(_set_item("cu_seqlens_k", 3, 19), _set("max_seqlen_k", 13)),
     r"sequence 2 has 13 keys \(cu_seqlens_k\), more than its block_table row holds \(12", {2}),
    ("block_table_entry_too_large", "paged", _set_item("block_table", (1, 0), NUM_BLOCKS),
     r"block_table\[1, 0\] = 10 is outside \[0, 10\)", {1}),
    ("block_table_entry_negative", "paged", _set_item("block_table", (2, 0), -1),
     r"block_table\[2, 0\] = -1 is outside \[0, 10\)", {2}),
    ("block_table_entry_of_a_later_block", "paged", _set_item("block_table", (2, 1), 2**31 - 1),   # keys 4, 5
     r"block_table\[2, 1\] = 2147483647", None),
]


def _params(table):
    """pytest params of a table's rows (all but the id and layouts), one per layout a row applies to."""
    return [pytest.param(layout, *rest, id=f"{name}-{layout}")
            for name, layouts, *rest in table
            for layout in (("packed", "paged") if layouts == "both" else (layouts,))]


def _call(args: dict):
    return flashcore.flash_attn_varlen_func(**args)


def _prepare(layout, warm, device) -> dict:
    """A valid call's arguments; warm: after that call (its plan kept), else with dispatch cleared."""
    args = valid_args(layout, device)
    if warm:
        _call(args)
    else:
        dispatch.clear()
    return args


# ---------------------------------------------------------------------------------------------------------------
# raised at the call

@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("layout,mutate,exc,match", _params(BAD_ARGUMENTS))
def test_bad_argument_is_refused_naming_it(layout, mutate, exc, match, warm, device):
    args = _prepare(layout, warm, device)
    mutate(args, device)
    with pytest.raises(exc, match=match):
        _call(args)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("layout,mutate,match,failing", _params(BAD_VALUES))
def test_bad_value_raises_at_the_call(layout, mutate, match, failing, warm, device, kv_checks):
    """CPU tensors' values are the host's: by default checked at the call (on a GPU, strict mode does that)."""
    kv_checks("auto" if device == "cpu" else "strict")
    args = _prepare(layout, warm, device)
    mutate(args, device)
    with pytest.raises(ValueError, match=match):
        _call(args)
    flashcore.check_errors()                       # nothing left pending


def test_valid_edges_pass(device, kv_checks):
    """The limits themselves are valid: max_seqlen equal to the longest sequence, a table row filled to capacity,
    block ids 0 and num_blocks - 1, the last sequence empty."""
    kv_checks("auto" if device == "cpu" else "strict")
    args = valid_args("paged", device)
    lens_k = [4, MAX_BLOCKS * BLOCK, 0]
    args.update(cu_seqlens_k=cu(lens_k, device), max_seqlen_k=MAX_BLOCKS * BLOCK,
                cu_seqlens_q=cu([3, 7, 0], device), max_seqlen_q=7)
    args["block_table"][1] = torch.tensor([0, NUM_BLOCKS - 1, 5], dtype=torch.int32)
    out = _call(args)
    assert_close_varlen(out, args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                        block_table=args["block_table"], causal=True)


@pytest.mark.parametrize("function", ["flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
                                      "flash_attn_varlen_qkvpacked_func"])
def test_dropout_is_refused(function, device):
    args = valid_args("packed", device)
    q, k, v = args["q"], args["k"], args["v"]
    cu_q, cu_k = args["cu_seqlens_q"], args["cu_seqlens_k"]
    call = {"flash_attn_varlen_func": lambda: flashcore.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, 0.1),
            "flash_attn_varlen_kvpacked_func": lambda: flashcore.flash_attn_varlen_kvpacked_func(
                q, torch.stack([k, v], 1), cu_q, cu_k, 5, 6, dropout_p=0.1),
            "flash_attn_varlen_qkvpacked_func": lambda: flashcore.flash_attn_varlen_qkvpacked_func(
                torch.stack([q, q, q], 1), cu_q, 5, dropout_p=0.1)}[function]
    with pytest.raises(NotImplementedError, match=r"dropout_p=0.1"):
        call()


@pytest.mark.parametrize("function,packed,match", [
    ("flash_attn_varlen_kvpacked_func", lambda q, k, v: torch.stack([k, v], 0), r"kv must have shape"),
    ("flash_attn_varlen_kvpacked_func", lambda q, k, v: k, r"kv must have shape \(total_tokens, 2, heads"),
    ("flash_attn_varlen_qkvpacked_func", lambda q, k, v: torch.stack([q, q], 1), r"qkv must have shape"),
], ids=["kv_parts_first", "kv_unpacked", "qkv_two_parts"])
def test_packed_layout_is_checked(function, packed, match, device):
    args = valid_args("packed", device)
    tensor = packed(args["q"], args["k"], args["v"])
    with pytest.raises(ValueError, match=match):
        if function == "flash_attn_varlen_kvpacked_func":
            flashcore.flash_attn_varlen_kvpacked_func(args["q"], tensor, args["cu_seqlens_q"], args["cu_seqlens_k"],
                                                      5, 6)
        else:
            flashcore.flash_attn_varlen_qkvpacked_func(tensor, args["cu_seqlens_q"], 5)


def test_bfloat16_is_refused_under_the_interpreter(cpu_only):
    args = valid_args("packed", "cpu")
    args.update({name: args[name].bfloat16() for name in "qkv"})
    with pytest.raises(TypeError, match=r"bfloat16(.|\n)*Triton interpreter"):
        _call(args)


# ---------------------------------------------------------------------------------------------------------------
# gradients

@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_a_paged_input_requiring_grad_is_refused(arg, warm, device):
    args = _prepare("paged", warm, device)
    args[arg] = args[arg].clone().requires_grad_()
    with pytest.raises(NotImplementedError,
                       match=rf"flash_attn_varlen_func: {arg} requires grad(.|\n)*block_table(.|\n)*no_grad"):
        _call(args)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_inputs_requiring_grad_run_under_no_grad(mode, device):
    args = valid_args("paged", device)
    expected = _call(args)
    grad_args = dict(args, **{name: args[name].clone().requires_grad_() for name in "qkv"})
    with mode():
        out = _call(grad_args)
    assert not out.requires_grad
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------------------------
# deferred: reported by the next call

def _assert_deferred_output(out, args, failing) -> None:
    """The failing sequences' rows (by the bad call's own cu_seqlens) are NaN, every other sequence's rows match
    the float64 reference."""
    for b, rows, q_b, k_b, v_b in varlen_sequences(args["q"], args["k"], args["v"], args["cu_seqlens_q"],
                                                   args["cu_seqlens_k"], args.get("block_table")):
        if b in failing:
            assert torch.isnan(out[rows]).all(), f"sequence {b} failed its check: its rows must be NaN"
        else:
            assert_close_attention(out[None, rows], q_b, k_b, v_b, causal=True)


@pytest.mark.parametrize("layout,mutate,match,failing", _params(BAD_VALUES))
def test_bad_value_is_reported_by_the_next_call(layout, mutate, match, failing, device, kv_checks):
    """Deferred checks: no sync and no raise at the bad call; its failing sequences read NaN, the others are right;
    the next call raises naming the argument and the failing call."""
    kv_checks("deferred")
    args = _prepare(layout, True, device)
    mutate(args, device)
    out = _call(args)                                                        # does not raise
    if failing is not None:
        _assert_deferred_output(out, args, failing)
    with pytest.raises(ValueError, match=rf"{match}(.|\n)*earlier call(.|\n)*flash_attn_varlen_func with"):
        _call(valid_args(layout, device))


def _deferred_failure(device) -> dict:
    """A paged call whose sequence 1 reads a block-table entry past the cache, made in deferred mode (it does not
    raise); returns its arguments."""
    args = valid_args("paged", device)
    args["block_table"][1, 0] = NUM_BLOCKS
    _call(args)
    return args


@pytest.mark.parametrize("next_call", ["flash_attn_varlen_func", "flash_attn_func", "check_errors"])
def test_a_deferred_failure_surfaces_at_the_next_flashcore_call_of_any_kind(next_call, device, kv_checks):
    """Not only the next varlen call: a dense forward on the device raises it too, as does check_errors(); once.
    The message names the argument and the failing call by its shapes."""
    kv_checks("deferred")
    _deferred_failure(device)
    q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.float16)
    valid = valid_args("packed", device)
    run = {"flash_attn_varlen_func": lambda: _call(valid),
           "flash_attn_func": lambda: flashcore.flash_attn_func(q, q, q),
           "check_errors": lambda: flashcore.check_errors(device)}[next_call]
    shapes = (rf"flash_attn_varlen_func with q \(10, {HEADS_Q}, 64\) fp16, "
              rf"k \({NUM_BLOCKS}, {BLOCK}, {HEADS_KV}, 64\), cu_seqlens_q \(4,\), max_seqlen_q=5, max_seqlen_k=6, "
              rf"block_table \(3, {MAX_BLOCKS}\), causal")
    with pytest.raises(ValueError, match=rf"block_table\[1, 0\] = 10(.|\n)*earlier call(.|\n)*{shapes}"):
        run()
    run()                                                    # raised once: this one passes
    flashcore.check_errors()


@pytest.mark.parametrize("layout,mutate", [
    ("packed", _set_item("cu_seqlens_k", 3, 40)),                 # keys past k's end
    ("packed", _set_item("cu_seqlens_q", 3, 30)),                 # rows past q's end
    ("paged", _set_item("block_table", (2, 1), -(2**31))),
    ("paged", _both(_set_item("cu_seqlens_k", 3, 60), _set("max_seqlen_k", 60))),   # keys past the table's row
], ids=["keys_past_k", "rows_past_q", "table_entry", "keys_past_the_table"])
def test_checks_off_bad_values_read_nothing_outside(layout, mutate, device, kv_checks):
    """$FLASHCORE_KV_CHECKS=0: bad values are not reported, and the kernel still addresses nothing outside the
    tensors (it clamps): the call returns, nothing is raised then or later."""
    kv_checks("0")
    args = valid_args(layout, device)
    mutate(args, device)
    out = _call(args)
    assert out.shape == args["q"].shape
    flashcore.check_errors()
    _call(valid_args(layout, device))
