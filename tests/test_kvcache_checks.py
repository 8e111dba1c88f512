"""Every bad input of flash_attn_with_kvcache (the value and shape checks of flashcore/kvcache.py): rejected with
the expected exception type and a message naming the argument, before anything is written.

Strict value checks ($FLASHCORE_KV_CHECKS=strict, and by default for values the host holds: an int cache_seqlens,
CPU tensors), and shape / dtype / device checks in every mode: the bad call raises and both caches are
bit-identical afterwards. Deferred value checks (the default for GPU tensors; $FLASHCORE_KV_CHECKS=deferred runs
them under the interpreter): the bad call writes nothing for its failing sequences and returns NaN for them, the
passing sequences get exactly what a call of theirs alone gives, and the next FlashCore call raises, naming the
failing call.

Each bad call runs twice: cold (no launch plan kept: dispatch cleared first) and warm (right after a valid call of
the same signature, whose kept plan a bad call must not slip through: shape and dtype checks that run only for a
new signature would miss a cache of another dtype with the same shape and strides). Every call here appends new
tokens, so a check that comes after the append shows as changed cache slots.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import flashcore
from flashcore import dispatch
from flashcore.reference import assert_close_kvcache, bits

BATCH, HEADS_Q, HEADS_KV, HEAD_DIM, NEW = 2, 4, 2, 64, 2
BLOCK, MAX_BLOCKS, NUM_BLOCKS = 16, 2, 6         # paged: capacity 32, two spare blocks
CAPACITY = 32                                     # contiguous: (BATCH + 1, 32, Hkv, D), one spare row
SEQLENS = [5, 20]


def valid_args(layout: str, device) -> dict:
    """A valid call (appending NEW tokens with rotary) on a contiguous or paged cache."""
    dtype = torch.float16
    if layout == "paged":
        shape = (NUM_BLOCKS, BLOCK, HEADS_KV, HEAD_DIM)
        extra = dict(block_table=torch.randperm(NUM_BLOCKS)[: BATCH * MAX_BLOCKS].reshape(BATCH, MAX_BLOCKS)
                     .to(torch.int32).to(device))
    else:
        shape = (BATCH + 1, CAPACITY, HEADS_KV, HEAD_DIM)
        extra = dict(cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32, device=device))
    angles = torch.rand(CAPACITY, HEAD_DIM // 2) * 6
    return dict(q=torch.randn(BATCH, 1, HEADS_Q, HEAD_DIM, device=device).to(dtype),
                k_cache=torch.randn(shape, device=device).to(dtype), v_cache=torch.randn(shape, device=device).to(dtype),
                k=torch.randn(BATCH, NEW, HEADS_KV, HEAD_DIM, device=device).to(dtype),
                v=torch.randn(BATCH, NEW, HEADS_KV, HEAD_DIM, device=device).to(dtype),
                rotary_cos=angles.cos().to(dtype).to(device), rotary_sin=angles.sin().to(dtype).to(device),
                cache_seqlens=torch.tensor(SEQLENS, dtype=torch.int32, device=device),
                cache_leftpad=torch.zeros(BATCH, dtype=torch.int32, device=device), causal=True, **extra)


def other_device(device) -> str:
    """A device the call must refuse next to `device` (meta under the interpreter: there is no second one)."""
    return "meta" if device == "cpu" else "cpu"


def _set(name, value):
    def mutate(args, device):
        args[name] = value(args, device) if callable(value) else value
    return mutate


def _set_item(name, index, value):
    def mutate(args, device):
        args[name] = args[name].clone()
        args[name][index] = value(args) if callable(value) else value
    return mutate


def _cast(name, dtype):
    return _set(name, lambda args, device: args[name].to(dtype))


def _move(name):
    return _set(name, lambda args, device: args[name].to(other_device(device)))


# (id, layouts it applies to, mutation of a valid call, exception type, regex the message must contain)
HOST_VALUES = [    # values of an int cache_seqlens: checked at the call in every mode
    ("overflow_int_seqlens", "both", _set("cache_seqlens", CAPACITY - 1), ValueError,
     r"cache_seqlens = 31 plus 2 new tokens"),
    ("int_seqlens_negative", "both", _set("cache_seqlens", -3), ValueError, r"cache_seqlens = -3 is negative"),
    ("int_seqlens_beyond_rotary", "both",
     lambda args, device: (_set("cache_seqlens", 10)(args, device),
                           [_set(name, lambda args, device: args[name][:11])(args, device)
                            for name in ("rotary_cos", "rotary_sin")]), ValueError, r"rotary_cos"),
]
DEVICE_VALUES = [  # values of tensors: checked at the call on the CPU and in strict mode, else by the next call
    ("overflow", "both", _set_item("cache_seqlens", 1, CAPACITY - NEW + 1), ValueError, r"cache_seqlens"),
    ("seqlens_negative", "both", _set_item("cache_seqlens", 0, -1), ValueError, r"cache_seqlens"),
    ("leftpad_beyond_seqlens", "both", _set_item("cache_leftpad", 1, SEQLENS[1] + 1), ValueError, r"cache_leftpad"),
    ("leftpad_negative", "both", _set_item("cache_leftpad", 0, -1), ValueError, r"cache_leftpad"),
    ("block_table_entry_too_large", "paged", _set_item("block_table", (1, 0), NUM_BLOCKS), ValueError,
     r"block_table"),
    ("block_table_entry_negative", "paged", _set_item("block_table", (0, 0), -1), ValueError, r"block_table"),
    # sequence 0 has 5 tokens: block 1 is used only by an append reaching position 16 (seqlens 15 + 2 new)
    ("block_table_entry_of_the_append", "paged",
     lambda args, device: (_set_item("cache_seqlens", 0, 15)(args, device),
                           _set_item("block_table", (0, 1), NUM_BLOCKS + 7)(args, device)), ValueError,
     r"block_table"),
    ("cache_batch_idx_too_large", "contig", _set_item("cache_batch_idx", 1, BATCH + 1), ValueError,
     r"cache_batch_idx"),
    ("cache_batch_idx_negative", "contig", _set_item("cache_batch_idx", 0, -1), ValueError, r"cache_batch_idx"),
    ("rotary_table_too_short", "both",
     lambda args, device: [_set(name, lambda args, device: args[name][: SEQLENS[1] + NEW - 1])(args, device)
                           for name in ("rotary_cos", "rotary_sin")], ValueError, r"rotary_cos"),
]
BAD_INPUTS = HOST_VALUES + DEVICE_VALUES + [
    # index dtypes and devices
    ("block_table_int64", "paged", _cast("block_table", torch.int64), TypeError, r"block_table"),
    ("cache_batch_idx_int64", "contig", _cast("cache_batch_idx", torch.int64), TypeError, r"cache_batch_idx"),
    ("cache_seqlens_int64", "both", _cast("cache_seqlens", torch.int64), TypeError, r"cache_seqlens"),
    ("cache_leftpad_int64", "both", _cast("cache_leftpad", torch.int64), TypeError, r"cache_leftpad"),
    ("cache_batch_idx_with_block_table", "paged",
     _set("cache_batch_idx", lambda args, device: torch.tensor([0, 1], dtype=torch.int32, device=device)),
     ValueError, r"cache_batch_idx"),
    ("cache_seqlens_elsewhere", "both", _move("cache_seqlens"), ValueError, r"cache_seqlens"),
    ("block_table_elsewhere", "paged", _move("block_table"), ValueError, r"block_table"),
    # shapes, dtypes, devices of the tensors
    ("heads_not_a_multiple", "both",
     _set("q", lambda args, device: torch.randn(BATCH, 1, 3, HEAD_DIM, device=device).half()), ValueError,
     r"(\bq\b|query heads).*(k_cache|key/value heads)"),
    ("head_dim_q_vs_cache", "both",
     _set("q", lambda args, device: torch.randn(BATCH, 1, HEADS_Q, 128, device=device).half()), ValueError,
     r"k_cache"),
    ("k_heads", "both", _set("k", lambda args, device: args["k"][:, :, :1]), ValueError, r"\bk\b"),
    ("k_head_dim", "both",
     _set("k", lambda args, device: torch.randn(BATCH, NEW, HEADS_KV, 32, device=device).half()), ValueError,
     r"\bk\b"),
    ("v_cache_shape", "both", _set("v_cache", lambda args, device: args["v_cache"][:, :-1]), ValueError,
     r"v_cache"),
    ("query_rows_beyond_one_tile", "both",
     _set("q", lambda args, device: torch.randn(BATCH, 65, HEADS_Q, HEAD_DIM, device=device).half()), ValueError,
     r"\bq\b.*query rows"),
    ("k_cache_dtype", "both", _cast("k_cache", torch.float32), TypeError, r"k_cache"),
    ("v_cache_dtype", "both", _cast("v_cache", torch.float32), TypeError, r"v_cache"),
    ("k_dtype", "both", _cast("k", torch.float32), TypeError, r"\bk\b"),
    ("v_dtype", "both", _cast("v", torch.float32), TypeError, r"\bv\b"),
    ("rotary_dtype", "both", _cast("rotary_cos", torch.float32), TypeError, r"rotary_cos"),
    ("rotary_tables_differ", "both", _set("rotary_cos", lambda args, device: args["rotary_cos"][:-1]), ValueError,
     r"rotary_cos"),
    ("k_cache_elsewhere", "both", _move("k_cache"), ValueError, r"k_cache"),
    ("k_elsewhere", "both", _move("k"), ValueError, r"\bk\b"),
    # arguments that need each other
    ("k_without_v", "both", _set("v", None), ValueError, r"\bv\b"),
    ("v_without_k", "both", _set("k", None), ValueError, r"\bk\b"),
    ("rotary_without_k", "both",
     lambda args, device: (_set("k", None)(args, device), _set("v", None)(args, device)), ValueError,
     r"rotary_cos|rotary_sin"),
    ("append_without_cache_seqlens", "both",
     lambda args, device: (_set("cache_seqlens", None)(args, device), _set("cache_leftpad", None)(args, device)),
     ValueError, r"cache_seqlens"),
]


def _params(table):
    """pytest params (layout, mutate, exc, match) of a table's rows, one per layout a row applies to."""
    return [pytest.param(layout, mutate, exc, match, id=f"{name}-{layout}")
            for name, layouts, mutate, exc, match in table
            for layout in (("contig", "paged") if layouts == "both" else (layouts,))]


CASES = _params(BAD_INPUTS)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("layout,mutate,exc,match", CASES)
def test_bad_input_rejected_before_any_write(layout, mutate, exc, match, warm, device, kv_checks):
    kv_checks("strict")
    args = valid_args(layout, device)
    if warm:
        flashcore.flash_attn_with_kvcache(**args)        # keeps the signature's plan; appends (caches copied after)
    else:
        dispatch.clear()
    mutate(args, device)
    caches = [t for t in (args["k_cache"], args["v_cache"]) if t.device.type != "meta"]
    before = [bits(t).clone() for t in caches]
    with pytest.raises(exc, match=match):
        flashcore.flash_attn_with_kvcache(**args)
    for t, old in zip(caches, before):
        assert torch.equal(bits(t), old), "a rejected call changed the cache"


def test_valid_edges_pass(device):
    """The limits themselves are valid: a cache filled exactly to capacity, leftpad equal to cache_seqlens (only the
    new tokens seen), a rotary table exactly long enough."""
    args = valid_args("paged", device)
    args["cache_seqlens"] = torch.tensor([0, CAPACITY - NEW], dtype=torch.int32, device=device)
    args["cache_leftpad"] = args["cache_seqlens"].clone()
    assert args["rotary_cos"].shape[0] == CAPACITY                  # (valid_args' tables: exactly long enough)
    before = {name: args[name].clone() for name in ("k_cache", "v_cache")}
    out = flashcore.flash_attn_with_kvcache(**args)
    q, k_cache, v_cache = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
    assert_close_kvcache(out, q, before["k_cache"], before["v_cache"], k_cache, v_cache, **args)


PER_SEQUENCE = ("q", "k", "v", "cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table")


def _only(args: dict, rows: list[int]) -> dict:
    """The call restricted to the sequences `rows`."""
    index = torch.tensor(rows, dtype=torch.long, device=args["q"].device)
    return {name: value[index] if name in PER_SEQUENCE and isinstance(value, torch.Tensor) else value
            for name, value in args.items()}


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("layout,mutate,exc,match", _params(DEVICE_VALUES))
def test_bad_value_reported_by_the_next_call(layout, mutate, exc, match, warm, device, kv_checks):
    """Deferred checks: no sync, no raise at the failing call; its failing sequences are not written and read NaN,
    the others match a call of theirs alone (caches bit-identical), and the next call raises naming the argument."""
    kv_checks("deferred")
    args = dict(valid_args(layout, device), num_splits=1)     # (one split: a sequence's answer is its own)
    if warm:
        flashcore.flash_attn_with_kvcache(**args)
    else:
        dispatch.clear()
    mutate(args, device)
    expected_caches = {name: args[name].clone() for name in ("k_cache", "v_cache")}
    out = flashcore.flash_attn_with_kvcache(**args)                        # does not raise
    failing = [b for b in range(BATCH) if torch.isnan(out[b].float()).all()]
    passing = [b for b in range(BATCH) if b not in failing]
    assert failing, "no sequence was marked as failing"
    assert not torch.isnan(out[passing].float()).any()
    with pytest.raises(exc, match=match):
        flashcore.flash_attn_with_kvcache(**valid_args(layout, device))
    flashcore.flash_attn_with_kvcache(**valid_args(layout, device))       # reported once: this one runs
    if passing:
        alone = _only(dict(args, **expected_caches), passing)
        if not isinstance(args["cache_seqlens"], torch.Tensor):
            alone["cache_seqlens"] = args["cache_seqlens"]
        expected_out = flashcore.flash_attn_with_kvcache(**alone)
        assert torch.equal(out[passing], expected_out)
    for name, expected in expected_caches.items():
        assert torch.equal(bits(args[name]), bits(expected)), f"{name}: not what the passing sequences alone write"


@pytest.mark.parametrize("layout,mutate,match", [
    ("paged", _set_item("block_table", (1, 1), NUM_BLOCKS + 3), r"block_table\[1, 1\] = 9"),
    ("paged", _set_item("cache_seqlens", 0, MAX_BLOCKS * BLOCK + 1), r"cache_seqlens\[0\]"),
    ("contig", _set_item("cache_batch_idx", 0, BATCH + 1), r"cache_batch_idx\[0\]"),
    ("contig", _set_item("cache_leftpad", 1, SEQLENS[1] + 1), r"cache_leftpad\[1\]"),
], ids=["block_table_entry_read", "overflow", "cache_batch_idx", "leftpad"])
# the failing sequence's split partials are NaN by design, and the interpreter's max over them (numpy's nanmax, for
# the GPU's NaN-ignoring max) warns on an all-NaN slice
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_decode_without_append_reports_what_it_reads(layout, mutate, match, device, kv_checks):
    """No append, so no append kernel: the decode checks the lengths and the table entries it reads, returns NaN for
    the failing sequence (the other one is right) and the next call raises."""
    kv_checks("deferred")
    args = {name: value for name, value in valid_args(layout, device).items()
            if name not in ("k", "v", "rotary_cos", "rotary_sin")}
    args["num_splits"] = 2                                  # (the NaN goes through the combine)
    mutate(args, device)
    out = flashcore.flash_attn_with_kvcache(**args)
    failing = [b for b in range(BATCH) if torch.isnan(out[b].float()).all()]
    assert len(failing) == 1 and not torch.isnan(out[1 - failing[0]].float()).any()
    with pytest.raises(ValueError, match=match):
        flashcore.flash_attn_with_kvcache(**args)


@pytest.mark.parametrize("option,value,exc,match", [
    ("window_size", (4, -3), ValueError, r"window_size"),       # causal folds right to 0: the key alone hides it
    ("window_size", (1, 2, 3), TypeError, r"window_size"),
    ("softcap", -1.0, ValueError, r"softcap"),
    ("softmax_scale", float("nan"), ValueError, r"softmax_scale"),
    ("num_splits", -1, ValueError, r"num_splits"),
    ("causal", 1, TypeError, r"causal"),
    ("return_softmax_lse", None, TypeError, r"return_softmax_lse"),
])
def test_a_bad_option_is_refused_on_a_seen_signature(option, value, exc, match, device):
    """Options are checked on every call, not once per signature: right after a valid call, one bad option."""
    args = valid_args("paged", device)
    flashcore.flash_attn_with_kvcache(**args, window_size=(4, 0))
    with pytest.raises(exc, match=match):
        flashcore.flash_attn_with_kvcache(**{**args, "window_size": (4, 0), option: value})


@pytest.mark.parametrize("mode", ["auto", "deferred", "strict"])
@pytest.mark.parametrize("layout,mutate,exc,match", _params(HOST_VALUES))
def test_int_cache_seqlens_raise_at_the_call_in_every_mode(layout, mutate, exc, match, mode, device, kv_checks):
    """An int cache_seqlens is the host's: its overflow, sign and rotary reach raise at the call that passes it (not
    at the next one, with an earlier call's message), nothing written, whatever the check mode."""
    kv_checks(mode)
    args = valid_args(layout, device)
    mutate(args, device)
    before = [bits(args[name]).clone() for name in ("k_cache", "v_cache")]
    with pytest.raises(exc, match=match):
        flashcore.flash_attn_with_kvcache(**args)
    assert all(torch.equal(bits(args[name]), old) for name, old in zip(("k_cache", "v_cache"), before))
    flashcore.flash_attn_with_kvcache(**valid_args(layout, device))      # nothing left pending


@pytest.mark.parametrize("layout,mutate,exc,match", _params(DEVICE_VALUES))
def test_cpu_tensor_values_raise_at_the_call_by_default(layout, mutate, exc, match, kv_checks, cpu_only):
    """Under the interpreter the tensors are host memory: by default their values are checked at the call."""
    kv_checks("auto")
    args = valid_args(layout, "cpu")
    mutate(args, "cpu")
    before = [bits(args[name]).clone() for name in ("k_cache", "v_cache")]
    with pytest.raises(exc, match=match):
        flashcore.flash_attn_with_kvcache(**args)
    assert all(torch.equal(bits(args[name]), old) for name, old in zip(("k_cache", "v_cache"), before))


def _deferred_failure(layout: str, device) -> dict:
    """A call whose sequence 1 overflows, made in deferred mode (it does not raise); returns its arguments."""
    args = valid_args(layout, device)
    args["cache_seqlens"] = torch.tensor([5, CAPACITY - 1], dtype=torch.int32, device=device)
    flashcore.flash_attn_with_kvcache(**args)
    return args


@pytest.mark.parametrize("layout", ["contig", "paged"])
def test_a_deferred_failure_names_its_call_and_argument(layout, device, kv_checks):
    """The next call's error names the argument, the failing sequence, and the failing call by its shapes and its
    number among the calls since the last report (not the call that happens to raise it)."""
    kv_checks("deferred")
    for _ in range(2):                                       # calls #1, #2 of another signature, then the bad one
        flashcore.flash_attn_with_kvcache(**dict(valid_args(layout, device), causal=False))
    args = _deferred_failure(layout, device)
    shapes = rf"q \({BATCH}, 1, {HEADS_Q}, {HEAD_DIM}\) fp16, k_cache \({', '.join(map(str, args['k_cache'].shape))}\)"
    with pytest.raises(ValueError, match=rf"cache_seqlens\[1\] = 31 plus 2 new tokens(.|\n)*{shapes}"
                                         rf"(.|\n)*causal \(its last one was call #3 of the 3 value-checked calls"):
        flashcore.flash_attn_with_kvcache(**valid_args(layout, device))


@pytest.mark.parametrize("next_call", ["flash_attn_func", "check_errors"])
def test_a_deferred_failure_surfaces_at_the_next_flashcore_call_of_any_kind(next_call, device, kv_checks):
    """Not only the next KV-cache call: a dense forward on the device raises it too, as does check_errors(); once."""
    kv_checks("deferred")
    _deferred_failure("paged", device)
    q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.float16)
    run = {"flash_attn_func": lambda: flashcore.flash_attn_func(q, q, q),
           "check_errors": lambda: flashcore.check_errors(device)}[next_call]
    with pytest.raises(ValueError,
                       match=r"cache_seqlens\[1\] = 31(.|\n)*earlier call(.|\n)*flash_attn_with_kvcache with"):
        run()
    run()                                                    # raised once: this one passes
    flashcore.check_errors()


def test_a_deferred_failure_pending_at_exit_is_printed(cpu_only, cache_dir):
    """A failure no later call raised is printed as a warning when the process exits."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from test_kvcache_checks import _deferred_failure
        _deferred_failure("paged", "cpu")
        print("exiting")
    """)
    env = dict(__import__("os").environ, TRITON_INTERPRET="1", FLASHCORE_KV_CHECKS="deferred",
               FLASHCORE_CACHE_DIR=cache_dir)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "exiting" in done.stdout
    assert "RuntimeWarning" in done.stderr and "cache_seqlens[1] = 31" in done.stderr, done.stderr
