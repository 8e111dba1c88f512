"""PagedKVCache: block bookkeeping (allocation, free, fork; no block leaked or wrongly shared), the tensors it hands
to flash_attn_with_kvcache and flash_attn_varlen_func (block tables, seqlens, cu_seqlens, positions, slot mapping),
the write / write_packed / read paths, and its errors."""
from __future__ import annotations

import random

import pytest
import torch

import flashcore
from flashcore import PagedKVCache
from flashcore.paged_cache import OutOfBlocksError
from flashcore.reference import assert_close_varlen, bits


def make_cache(num_blocks=8, block_size=4, num_layers=2, max_blocks_per_seq=4, dtype=torch.float32, device="cpu"):
    return PagedKVCache(num_layers, num_blocks, block_size, num_kv_heads=2, head_dim=16, dtype=dtype, device=device,
                        max_blocks_per_seq=max_blocks_per_seq)


def assert_consistent(cache: PagedKVCache) -> None:
    """Every block is either free or held; a block's refcount is the number of sequences holding it; a sequence
    holds a block once; a block that can still be written (it covers a position >= its sequence's length) is
    held by that sequence alone."""
    holders = [0] * cache.num_blocks
    for seq_id in cache.seq_ids:
        blocks = cache.blocks(seq_id)
        assert len(set(blocks)) == len(blocks), f"{seq_id} holds a block twice: {blocks}"
        assert len(blocks) <= cache.max_blocks_per_seq
        assert cache.length(seq_id) <= len(blocks) * cache.block_size
        for block in blocks:
            holders[block] += 1
        for block in blocks[cache.length(seq_id) // cache.block_size:]:
            assert cache.refcount(block) == 1, f"writable block {block} of {seq_id} is shared"
    free = set(range(cache.num_blocks)) - {b for b in range(cache.num_blocks) if holders[b]}
    assert [cache.refcount(b) for b in range(cache.num_blocks)] == holders
    assert cache.num_free_blocks == len(free)


def fill(cache, seq_id, num_tokens):
    """Reserve, write random k/v into every layer and commit `num_tokens` tokens; returns the per-layer (k, v)."""
    cache.reserve([seq_id], num_tokens)
    written = []
    for layer in range(cache.num_layers):
        k = torch.randn(num_tokens, cache.num_kv_heads, cache.head_dim, dtype=cache.dtype)
        v = torch.randn(num_tokens, cache.num_kv_heads, cache.head_dim, dtype=cache.dtype)
        cache.write(layer, seq_id, k.to(cache.device), v.to(cache.device))
        written.append((k, v))
    cache.commit([seq_id], num_tokens)
    return written


# ---- construction ----------------------------------------------------------------------------------------------

def test_pools_have_the_paged_layout_per_layer():
    cache = PagedKVCache(3, num_blocks=10, block_size=5, num_kv_heads=2, head_dim=32, dtype=torch.float16,
                         max_seqlen=23)
    assert len(cache.k_pools) == len(cache.v_pools) == 3
    for pool in (*cache.k_pools, *cache.v_pools):
        assert pool.shape == (10, 5, 2, 32) and pool.dtype == torch.float16 and pool.device.type == "cpu"
    assert len({p.data_ptr() for p in (*cache.k_pools, *cache.v_pools)}) == 6
    assert cache.max_blocks_per_seq == 5 and cache.capacity == 25     # ceil(23 / 5) blocks
    assert cache.num_free_blocks == 10


def test_without_a_limit_one_sequence_may_hold_the_whole_pool():
    cache = PagedKVCache(1, num_blocks=6, block_size=3, num_kv_heads=1, head_dim=16)
    assert cache.max_blocks_per_seq == 6
    cache.add_sequence("a")
    cache.reserve(["a"], 18)
    assert cache.num_free_blocks == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_blocks=0), "num_blocks must be an int >= 1"),
    (dict(block_size=2.0), "block_size must be an int >= 1"),
    (dict(num_layers=True), "num_layers must be an int >= 1"),
    (dict(max_seqlen=0), "max_seqlen must be an int >= 1"),
    (dict(max_blocks_per_seq=-1), "max_blocks_per_seq must be an int >= 1"),
    (dict(max_blocks_per_seq=2, max_seqlen=8), "not both"),
])
def test_bad_construction_arguments_are_named(kwargs, match):
    args = dict(num_layers=1, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=16) | kwargs
    with pytest.raises(ValueError, match=match):
        PagedKVCache(**args)


def test_integer_dtype_is_refused():
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        PagedKVCache(1, 4, 4, 2, 16, dtype=torch.int32)


# ---- allocation ------------------------------------------------------------------------------------------------

def test_reserve_allocates_only_the_blocks_the_new_tokens_need():
    cache = make_cache()
    cache.add_sequence("a")
    assert cache.blocks("a") == () and cache.length("a") == 0
    cache.reserve(["a"], 5)                          # 5 tokens, block_size 4: 2 blocks
    assert cache.blocks("a") == (0, 1) and cache.length("a") == 0
    cache.reserve(["a"], 5)                          # the same room again: nothing new
    assert cache.blocks("a") == (0, 1)
    cache.commit(["a"], 5)
    cache.reserve(["a"], 3)                          # positions 5..7 fit in block 1
    assert cache.blocks("a") == (0, 1)
    cache.reserve(["a"], 4)                          # position 8 needs a third block
    assert cache.blocks("a") == (0, 1, 2) and cache.num_free_blocks == 5
    assert_consistent(cache)


def test_sequences_reserving_in_turn_get_interleaved_blocks():
    cache = make_cache()
    for seq_id in "ab":
        cache.add_sequence(seq_id)
    for _ in range(3):
        cache.reserve(["a", "b"], 4)
        cache.commit(["a", "b"], 4)
    assert cache.blocks("a") == (0, 2, 4) and cache.blocks("b") == (1, 3, 5)
    assert_consistent(cache)


def test_block_table_and_seqlens_describe_the_batch_in_its_order():
    cache = make_cache()
    for seq_id, n in (("a", 6), ("b", 1), ("c", 0)):
        cache.add_sequence(seq_id)
        cache.reserve([seq_id], n)
        cache.commit([seq_id], n)
    cache.reserve(["b"], 4)                          # reserved, not committed: in the table, not in seqlens
    table = cache.block_table(["c", "a", "b"])
    assert table.dtype == torch.int32 and table.shape == (3, cache.max_blocks_per_seq)
    assert table.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [2, 3, 0, 0]]
    lens = cache.seqlens(["c", "a", "b"])
    assert lens.dtype == torch.int32 and lens.tolist() == [0, 6, 1]


def test_out_of_blocks_raises_and_allocates_nothing():
    cache = make_cache(num_blocks=5)
    for seq_id in "ab":
        cache.add_sequence(seq_id)
    cache.reserve(["a"], 8)                          # 2 blocks
    cache.commit(["a"], 8)
    with pytest.raises(OutOfBlocksError, match=r"out of KV-cache blocks .* 4 needed, 3 free of 5"):
        cache.reserve(["a", "b"], [8, 8])            # a: 2 more, b: 2
    assert cache.blocks("a") == (0, 1) and cache.blocks("b") == () and cache.num_free_blocks == 3
    cache.reserve(["a", "b"], [4, 8])                # 1 + 2: fits exactly
    assert cache.num_free_blocks == 0
    assert_consistent(cache)


def test_reserving_past_the_capacity_raises_and_allocates_nothing():
    cache = make_cache(max_blocks_per_seq=2)
    for seq_id in "ab":
        cache.add_sequence(seq_id)
    with pytest.raises(ValueError, match=r"'b' would hold 9 tokens, more than the capacity 8"):
        cache.reserve(["a", "b"], [1, 9])
    assert cache.blocks("a") == () and cache.num_free_blocks == 8


def test_commit_needs_reserved_room():
    cache = make_cache()
    cache.add_sequence("a")
    cache.reserve(["a"], 3)
    with pytest.raises(ValueError, match="reserve them first"):
        cache.commit(["a"], 5)                      # 3 reserved, but the block holds 4: 5 does not fit
    cache.commit(["a"], 4)                          # the whole block is room, reserved or not
    assert cache.length("a") == 4


# ---- free ------------------------------------------------------------------------------------------------------

def test_free_returns_blocks_and_the_next_sequence_reuses_them():
    cache = make_cache()
    for seq_id in "abc":
        cache.add_sequence(seq_id)
        cache.reserve([seq_id], 6)
    freed = cache.blocks("b")
    cache.free("b")
    assert "b" not in cache and cache.num_free_blocks == 4 and all(cache.refcount(x) == 0 for x in freed)
    cache.add_sequence("d")
    cache.reserve(["d"], 8)
    assert cache.blocks("d") == freed                # last freed, first reused, in the same order
    assert_consistent(cache)


def test_double_free_and_unknown_ids_raise():
    cache = make_cache()
    cache.add_sequence("a")
    cache.free("a")
    with pytest.raises(ValueError, match=r"seq_id 'a' is not in the cache \(never added, or already freed\)"):
        cache.free("a")
    k = torch.randn(1, 2, 16)
    for call in (lambda: cache.reserve(["x"], 1), lambda: cache.commit(["x"], 1), lambda: cache.block_table(["x"]),
                 lambda: cache.seqlens(["x"]), lambda: cache.length("x"), lambda: cache.blocks("x"),
                 lambda: cache.read(0, "x"), lambda: cache.cu_seqlens(["x"], 1), lambda: cache.positions(["x"], 1),
                 lambda: cache.slot_mapping(["x"], 1), lambda: cache.write_packed(0, ["x"], k, k, 1)):
        with pytest.raises(ValueError, match="seq_id 'x' is not in the cache"):
            call()
    with pytest.raises(ValueError, match="parent 'x' is not in the cache"):
        cache.fork("x", "y")


def test_adding_an_existing_sequence_raises():
    cache = make_cache()
    cache.add_sequence(7)
    with pytest.raises(ValueError, match="seq_id 7 is already in the cache"):
        cache.add_sequence(7)


def test_batches_with_duplicates_or_bad_counts_raise():
    cache = make_cache()
    cache.add_sequence("a")
    cache.add_sequence("b")
    with pytest.raises(ValueError, match="duplicates"):
        cache.block_table(["a", "a"])
    with pytest.raises(ValueError, match="duplicates"):
        cache.reserve(["a", "b", "a"], 1)
    with pytest.raises(TypeError, match="seq_ids must be a list"):
        cache.seqlens("a")
    for bad in (-1, [1], [1, -2], 1.5, True):
        with pytest.raises(ValueError, match="num_tokens must be"):
            cache.reserve(["a", "b"], bad)
    assert cache.num_free_blocks == cache.num_blocks


# ---- fork ------------------------------------------------------------------------------------------------------

def test_fork_shares_full_blocks_and_copies_the_partial_one():
    cache = make_cache()
    cache.add_sequence("p")
    written = fill(cache, "p", 6)                   # block 0 full, block 1 holds 2 of 4
    cache.fork("p", "c")
    parent, child = cache.blocks("p"), cache.blocks("c")
    assert child[0] == parent[0] and cache.refcount(parent[0]) == 2
    assert child[1] != parent[1] and cache.refcount(child[1]) == 1
    assert cache.length("c") == 6
    for layer, (k, v) in enumerate(written):
        ck, cv = cache.read(layer, "c")
        assert torch.equal(ck, k) and torch.equal(cv, v)
    assert_consistent(cache)


def test_appending_to_a_fork_leaves_the_parent_unchanged():
    cache = make_cache()
    cache.add_sequence("p")
    written = fill(cache, "p", 6)
    cache.fork("p", "c")
    fill(cache, "c", 5)                              # into the copied block, then a new one
    extra = fill(cache, "p", 2)                      # into the parent's own partial block
    for layer in range(cache.num_layers):
        pk, pv = cache.read(layer, "p")
        assert torch.equal(pk, torch.cat([written[layer][0], extra[layer][0]]))
        assert torch.equal(pv, torch.cat([written[layer][1], extra[layer][1]]))
        ck, _ = cache.read(layer, "c")
        assert torch.equal(ck[:6], written[layer][0])
    assert_consistent(cache)


def test_fork_at_a_block_boundary_allocates_nothing_and_skips_reserved_blocks():
    cache = make_cache()
    cache.add_sequence("p")
    fill(cache, "p", 8)
    cache.reserve(["p"], 1)                         # a third block, reserved but empty
    free_before = cache.num_free_blocks
    cache.fork("p", "c")
    assert cache.blocks("c") == cache.blocks("p")[:2] and cache.num_free_blocks == free_before
    assert_consistent(cache)


def test_freeing_a_parent_keeps_the_blocks_its_fork_shares():
    cache = make_cache()
    cache.add_sequence("p")
    fill(cache, "p", 6)
    cache.fork("p", "c")
    shared = cache.blocks("p")[0]
    cache.free("p")
    assert cache.refcount(shared) == 1 and cache.num_free_blocks == cache.num_blocks - 2
    cache.free("c")
    assert cache.num_free_blocks == cache.num_blocks
    assert_consistent(cache)


def test_fork_out_of_blocks_or_onto_an_existing_id_changes_nothing():
    cache = make_cache(num_blocks=2)
    cache.add_sequence("p")
    cache.add_sequence("q")
    fill(cache, "p", 6)
    with pytest.raises(ValueError, match="child 'q' is already in the cache"):
        cache.fork("p", "q")
    with pytest.raises(OutOfBlocksError, match="to fork 'p'"):
        cache.fork("p", "c")
    assert "c" not in cache and [cache.refcount(b) for b in range(2)] == [1, 1]


def test_random_operations_never_leak_or_wrongly_share_a_block():
    rng = random.Random(0)
    cache = make_cache(num_blocks=12, block_size=3, num_layers=1, max_blocks_per_seq=5)
    next_id = 0
    for _ in range(400):
        live = cache.seq_ids
        op = rng.choice(["add", "fork", "grow", "free"] if live else ["add"])
        try:
            if op == "add":
                cache.add_sequence(next_id)
                next_id += 1
            elif op == "fork":
                cache.fork(rng.choice(live), next_id)
                next_id += 1
            elif op == "grow":
                batch = rng.sample(live, rng.randint(1, len(live)))
                counts = [rng.randint(0, 4) for _ in batch]
                cache.reserve(batch, counts)
                if rng.random() < 0.8:
                    cache.commit(batch, counts)
            else:
                cache.free(rng.choice(live))
        except OutOfBlocksError:
            cache.free(rng.choice(live))
        except ValueError as e:
            assert "capacity" in str(e)
        assert_consistent(cache)
    for seq_id in cache.seq_ids:
        cache.free(seq_id)
    assert cache.num_free_blocks == cache.num_blocks and not any(cache.refcount(b) for b in range(12))
    # The free list holds each block once: the whole pool can be handed out again, every block exactly once.
    for seq_id in range(4):
        cache.add_sequence(seq_id)
    cache.reserve(list(range(4)), 9)
    assert sorted(b for s in range(4) for b in cache.blocks(s)) == list(range(12))


# ---- write / read, and the layout flash_attn_with_kvcache reads ------------------------------------------------

def test_write_puts_tokens_where_the_block_table_says():
    cache = make_cache(block_size=3)
    for seq_id in "ab":
        cache.add_sequence(seq_id)
    cache.reserve(["a", "b"], 2)                     # interleave a's and b's blocks
    cache.commit(["a", "b"], 2)
    written = fill(cache, "a", 7)                    # positions 2..8 of a
    table = cache.block_table(["b", "a"])
    positions = torch.arange(2, 9)
    for layer, (k, v) in enumerate(written):
        blocks = table[1, positions // 3].long()
        assert torch.equal(cache.k_pools[layer][blocks, positions % 3], k)
        assert torch.equal(cache.v_pools[layer][blocks, positions % 3], v)


def test_write_errors():
    cache = make_cache()
    cache.add_sequence("a")
    cache.reserve(["a"], 3)
    k = torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="layer must be an int in"):
        cache.write(2, "a", k, k)
    with pytest.raises(ValueError, match=r"k must have shape \(S, 2, 16\)"):
        cache.write(0, "a", k[:, :1], k)
    with pytest.raises(ValueError, match=r"v must have shape"):
        cache.write(0, "a", k, k[:2])
    with pytest.raises(TypeError, match="k must be torch.float32"):
        cache.write(0, "a", k.half(), k)
    with pytest.raises(ValueError, match="writing 5 tokens after 0 needs room"):
        cache.write(0, "a", torch.randn(5, 2, 16), torch.randn(5, 2, 16))
    assert not cache.k_pools[0].any()


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_a_kvcache_append_through_the_block_table_is_what_read_returns(device, block_size):
    """One step the way a model drives it: reserve, append through flash_attn_with_kvcache, commit."""
    cache = make_cache(block_size=block_size, num_layers=1, dtype=torch.float16, device=device,
                       num_blocks=24, max_blocks_per_seq=8)
    ids = ["a", "b", "c"]
    for seq_id, n in zip(ids, (5, 0, 3)):
        cache.add_sequence(seq_id)
        if n:
            fill(cache, seq_id, n)
    before = {s: cache.read(0, s) for s in ids}
    k = torch.randn(3, 2, 2, 16, device=device, dtype=torch.float16)
    v = torch.randn_like(k)
    q = torch.randn(3, 2, 4, 16, device=device, dtype=torch.float16)
    cache.reserve(ids, 2)
    flashcore.flash_attn_with_kvcache(q, cache.k_pools[0], cache.v_pools[0], k=k, v=v,
                                      cache_seqlens=cache.seqlens(ids), block_table=cache.block_table(ids),
                                      causal=True)
    cache.commit(ids, 2)
    for b, seq_id in enumerate(ids):
        rk, rv = cache.read(0, seq_id)
        assert torch.equal(rk, torch.cat([before[seq_id][0], k[b]]))
        assert torch.equal(rv, torch.cat([before[seq_id][1], v[b]]))


# ---- a varlen step: cu_seqlens, positions, slot_mapping, write_packed ------------------------------------------

def mixed_step(num_layers=2, dtype=torch.float32, device="cpu"):
    """A cache in mid-stream and a step over it: 'a' prefills a 5-token chunk after 4 cached tokens (across a
    block end), 'b' its first 3 tokens, 'c' decodes one token after 7, 'd' (2 cached) gets none this step. Block
    size 3; the sequences' blocks interleave. Returns (cache, seq_ids, num_new), the new tokens reserved."""
    cache = make_cache(num_blocks=16, block_size=3, num_layers=num_layers, max_blocks_per_seq=5, dtype=dtype,
                       device=device)
    ids, cached, num_new = ["a", "b", "c", "d"], [4, 0, 7, 2], [5, 3, 1, 0]
    for seq_id in ids:
        cache.add_sequence(seq_id)
    for half in ([n // 2 for n in cached], [n - n // 2 for n in cached]):   # two rounds: the block lists interleave
        cache.reserve(ids, half)
        cache.commit(ids, half)
    cache.reserve(ids, num_new)
    return cache, ids, num_new


def expected_slots(cache, ids, num_new) -> list[tuple[int, int]]:
    """(block, row) of each new token, packed in ids' order, from the block table (one token at a time)."""
    table = cache.block_table(ids).tolist()
    return [(table[b][p // cache.block_size], p % cache.block_size)
            for b, (seq_id, n) in enumerate(zip(ids, num_new))
            for p in range(cache.length(seq_id), cache.length(seq_id) + n)]


def test_step_tensors_describe_the_packed_batch(device):
    cache, ids, num_new = mixed_step(device=device)
    cu_seqlens_q, cu_seqlens_k = cache.cu_seqlens(ids, num_new)
    for t in (cu_seqlens_q, cu_seqlens_k):
        assert t.dtype == torch.int32 and t.shape == (5,) and t.device == cache.device
    assert cu_seqlens_q.tolist() == [0, 5, 8, 9, 9]             # new tokens: 5, 3, 1, 0
    assert cu_seqlens_k.tolist() == [0, 9, 12, 20, 22]           # cached + new: 4 + 5, 0 + 3, 7 + 1, 2 + 0
    positions = cache.positions(ids, num_new)
    assert positions.dtype == torch.int64 and positions.device == cache.device
    assert positions.tolist() == [4, 5, 6, 7, 8, 0, 1, 2, 7]
    slots = cache.slot_mapping(ids, num_new)
    assert slots.dtype == torch.int64 and slots.device == cache.device
    assert slots.tolist() == [block * 3 + row for block, row in expected_slots(cache, ids, num_new)]
    assert cache.cu_seqlens(ids[1:3], 1)[0].tolist() == [0, 1, 2]      # an int: the same count for all
    assert [t.tolist() for t in cache.cu_seqlens([], 1)] == [[0], [0]]
    assert cache.slot_mapping([], 1).shape == cache.positions(["d"], 0).shape == (0,)


def test_write_packed_writes_its_slots_and_leaves_every_other_slot_bit_identical(device):
    cache, ids, num_new = mixed_step(device=device)
    gen = torch.Generator().manual_seed(0)
    for pool in (*cache.k_pools, *cache.v_pools):                 # poison: random values and NaNs everywhere
        pool.copy_(torch.randn(pool.shape, generator=gen))
        pool.view(-1)[::7] = float("nan")
    before_bits = [bits(p).clone() for p in (*cache.k_pools, *cache.v_pools)]
    before_read = {s: cache.read(1, s) for s in ids}
    k = torch.randn(sum(num_new), 2, 16, generator=gen).to(device)
    v = torch.randn(sum(num_new), 2, 16, generator=gen).to(device)
    cache.write_packed(1, ids, k, v, num_new)

    blocks, rows = (torch.tensor(x, device=device) for x in zip(*expected_slots(cache, ids, num_new)))
    written = torch.zeros(cache.num_blocks, cache.block_size, dtype=torch.bool, device=device)
    written[blocks, rows] = True
    k0, k1, v0, v1 = before_bits
    assert torch.equal(bits(cache.k_pools[0]), k0) and torch.equal(bits(cache.v_pools[0]), v0)   # other layer
    for pool, old, new in ((cache.k_pools[1], k1, k), (cache.v_pools[1], v1, v)):
        assert torch.equal(pool[blocks, rows], new)
        assert torch.equal(bits(pool)[~written], old[~written])
    cache.commit(ids, num_new)
    for b, seq_id in enumerate(ids):                             # read: the cached tokens, then the new ones
        rows_b = slice(sum(num_new[:b]), sum(num_new[:b + 1]))
        rk, rv = cache.read(1, seq_id)
        assert torch.equal(bits(rk), bits(torch.cat([before_read[seq_id][0], k[rows_b]])))
        assert torch.equal(bits(rv), bits(torch.cat([before_read[seq_id][1], v[rows_b]])))


def test_write_packed_builds_the_slot_map_once_per_step_without_per_token_work():
    """The first layer's write costs the same torch calls for 3 tokens as for 300 (no loop over tokens); the
    other layers of the step reuse its slot map: one indexed assignment per pool."""

    class Calls(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            if name not in ("__get__", "dim"):                  # (attribute reads: shape, dtype, device)
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    first_layer = []
    for tokens in (3, 300):
        cache = make_cache(num_blocks=100, num_layers=3, max_blocks_per_seq=90)
        for seq_id in "ab":
            cache.add_sequence(seq_id)
        cache.reserve(["a", "b"], [tokens, 2])
        k = torch.randn(tokens + 2, 2, 16)
        with Calls() as calls:
            cache.write_packed(0, ["a", "b"], k, k, [tokens, 2])
        first_layer.append(calls.names)
        for layer in (1, 2):
            with Calls() as calls:
                cache.write_packed(layer, ["a", "b"], k, k, [tokens, 2])
            assert calls.names == ["view", "__setitem__", "view", "__setitem__"], calls.names
    assert first_layer[0] == first_layer[1]


def test_write_packed_after_the_bookkeeping_changes_goes_to_the_new_positions():
    """The kept slot map belongs to one step: after a commit (same ids, same counts), or a free and re-add of the
    same id, the write lands at the new positions."""
    cache = make_cache()
    ids = ["a", "b"]
    for seq_id in ids:
        cache.add_sequence(seq_id)
    steps = []
    for _ in range(3):                               # 3 steps of 2 tokens each: 6 tokens, across a block end
        cache.reserve(ids, 2)
        k, v = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
        for layer in range(cache.num_layers):
            cache.write_packed(layer, ids, k, v, 2)
        cache.commit(ids, 2)
        steps.append((k, v))
    for b, seq_id in enumerate(ids):
        rk, rv = cache.read(1, seq_id)
        assert torch.equal(rk, torch.cat([k[2 * b: 2 * b + 2] for k, _ in steps]))
        assert torch.equal(rv, torch.cat([v[2 * b: 2 * b + 2] for _, v in steps]))
    cache.free("b")
    cache.add_sequence("b")
    cache.reserve(["a", "b"], 2)                    # 'b' again, empty: its tokens go to positions 0, 1
    k = torch.randn(4, 2, 16)
    cache.write_packed(0, ["a", "b"], k, k, 2)
    cache.commit(["a", "b"], 2)
    assert torch.equal(cache.read(0, "b")[0], k[2:]) and torch.equal(cache.read(0, "a")[0][6:], k[:2])


def test_write_packed_into_a_fork_and_its_parent_leaves_each_what_the_other_wrote():
    """Copy-on-write happens at the fork: the parent's partly filled last block is copied for the child, so
    `reserve` never has to un-share a block, and a step writing both sequences changes neither's tokens for the
    other; the shared full blocks stay bit-identical."""
    cache = make_cache()
    cache.add_sequence("p")
    prefix = fill(cache, "p", 6)                     # block 0 full (shared by the fork), block 1 holds 2 of 4
    cache.fork("p", "c")
    shared = cache.blocks("p")[0]
    shared_bits = [bits(pool[shared]).clone() for pool in (*cache.k_pools, *cache.v_pools)]
    free_before = cache.num_free_blocks
    cache.reserve(["p", "c"], 2)                     # positions 6, 7: in each one's own partial block
    assert cache.num_free_blocks == free_before, "reserve allocated: the fork left a shared block to write"
    slots = cache.slot_mapping(["p", "c"], 2)
    assert all(cache.refcount(int(s) // cache.block_size) == 1 for s in slots)
    new = []
    for layer in range(cache.num_layers):
        k, v = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
        cache.write_packed(layer, ["p", "c"], k, v, 2)
        new.append((k, v))
    cache.commit(["p", "c"], 2)
    for layer, ((pk, pv), (k, v)) in enumerate(zip(prefix, new)):
        for b, seq_id in enumerate(["p", "c"]):
            rk, rv = cache.read(layer, seq_id)
            assert torch.equal(rk, torch.cat([pk, k[2 * b: 2 * b + 2]]))
            assert torch.equal(rv, torch.cat([pv, v[2 * b: 2 * b + 2]]))
    assert all(torch.equal(bits(pool[shared]), old)
               for pool, old in zip((*cache.k_pools, *cache.v_pools), shared_bits))
    assert_consistent(cache)


def test_write_packed_after_a_fork_at_a_block_boundary_writes_into_fresh_blocks():
    cache = make_cache()
    cache.add_sequence("p")
    prefix = fill(cache, "p", 8)                     # two full blocks, both shared by the fork
    cache.fork("p", "c")
    cache.reserve(["p", "c"], 1)
    assert cache.blocks("p")[:2] == cache.blocks("c")[:2] and cache.blocks("p")[2] != cache.blocks("c")[2]
    k = torch.randn(2, 2, 16)
    for layer in range(cache.num_layers):
        cache.write_packed(layer, ["c", "p"], k, k, 1)      # (the batch in any order)
    cache.commit(["p", "c"], 1)
    for layer, (pk, _) in enumerate(prefix):
        assert torch.equal(cache.read(layer, "c")[0], torch.cat([pk, k[:1]]))
        assert torch.equal(cache.read(layer, "p")[0], torch.cat([pk, k[1:]]))
    assert_consistent(cache)


def test_write_packed_and_step_helper_errors_name_the_argument():
    cache = make_cache()
    ids = ["a", "b"]
    for seq_id in ids:
        cache.add_sequence(seq_id)
    cache.reserve(ids, [3, 2])                       # one block each: room for 4 tokens
    k = torch.randn(5, 2, 16)
    cases = [
        (lambda: cache.write_packed(0, ids, k, k, [3, 1]), ValueError,
         r"k and v have 5 rows but num_new \[3, 1\] sums to 4"),
        (lambda: cache.write_packed(0, ids, k, k, [5]), ValueError,
         r"num_new must be an int >= 0 or one such int per sequence \(2\)"),
        (lambda: cache.write_packed(0, ids, k, k, [6, -1]), ValueError, "num_new must be an int >= 0"),
        (lambda: cache.write_packed(0, ids, k, k, torch.tensor([3, 2])), TypeError, "num_new must be host ints"),
        (lambda: cache.write_packed(0, ids, k, k, [5, 0]), ValueError,
         r"seq_id 'a': writing 5 tokens after 0 needs room for them \(its blocks hold 4\): reserve them first"),
        (lambda: cache.write_packed(0, ids, k[:, :1], k, [3, 2]), ValueError,
         r"k must have shape \(total_new, 2, 16\)"),
        (lambda: cache.write_packed(0, ids, k, k[:4], [3, 2]), ValueError, r"v must have shape \(total_new, 2, 16\)"),
        (lambda: cache.write_packed(0, ids, k.tolist(), k, [3, 2]), TypeError, "k must be a torch.Tensor"),
        (lambda: cache.write_packed(0, ids, k, k.half(), [3, 2]), TypeError,
         "v must be torch.float32 on cpu, got torch.float16 on cpu"),
        (lambda: cache.write_packed(0, ids, k.to("meta"), k, [3, 2]), TypeError,
         "k must be torch.float32 on cpu, got torch.float32 on meta"),
        (lambda: cache.write_packed(2, ids, k, k, [3, 2]), ValueError, r"layer must be an int in \[0, 2\), got 2"),
        (lambda: cache.write_packed(True, ids, k, k, [3, 2]), ValueError, "layer must be an int in"),
        (lambda: cache.write_packed(0, "ab", k, k, [3, 2]), TypeError, "seq_ids must be a list"),
        (lambda: cache.write_packed(0, ["a", "a"], k, k, [3, 2]), ValueError, "seq_ids has duplicates"),
    ]
    for helper in (cache.cu_seqlens, cache.positions, cache.slot_mapping):
        cases += [(lambda: helper(ids, [5, 0]), ValueError,
                   r"seq_id 'a': a step of 5 tokens after 0 needs room for them \(its blocks hold 4\)"),
                  (lambda: helper(ids, [1]), ValueError, "num_new must be"),
                  (lambda: helper(ids, torch.tensor([1, 1])), TypeError, "num_new must be host ints")]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    assert not any(pool.any() for pool in (*cache.k_pools, *cache.v_pools))      # nothing was written
    assert [cache.length(s) for s in ids] == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_varlen_step_through_write_packed_attends_to_each_prefix_and_its_new_tokens(device, dtype):
    """One server step the way a model drives it: reserve, write_packed the packed new k/v, then one
    flash_attn_varlen_func over the paged cache with the cache's cu_seqlens and block table (chunked prefill,
    a fresh prompt, a decode and an idle sequence in one call)."""
    cache, ids, num_new = mixed_step(num_layers=1, dtype=dtype, device=device)
    for pool in (cache.k_pools[0], cache.v_pools[0]):   # the cached prefixes (and the rest): random k / v
        pool.copy_(torch.randn(pool.shape))
    total = sum(num_new)
    q = torch.randn(total, 4, 16, dtype=dtype, device=device)
    k, v = (torch.randn(total, 2, 16, dtype=dtype, device=device) for _ in range(2))
    cu_seqlens_q, cu_seqlens_k = cache.cu_seqlens(ids, num_new)
    table = cache.block_table(ids)
    cache.write_packed(0, ids, k, v, num_new)
    out = flashcore.flash_attn_varlen_func(q, cache.k_pools[0], cache.v_pools[0], cu_seqlens_q, cu_seqlens_k,
                                           max(num_new), cache.capacity, causal=True, block_table=table)
    assert_close_varlen(out, q, cache.k_pools[0], cache.v_pools[0], cu_seqlens_q, cu_seqlens_k, block_table=table,
                        causal=True)


@pytest.mark.gpu
def test_a_step_on_the_gpu_never_syncs():
    """reserve, the step helpers, write_packed in every layer and commit queue their copies and ops without
    waiting for the device (torch's sync debug mode raises at any synchronizing call)."""
    cache, ids, num_new = mixed_step(device="cuda")
    k = torch.randn(sum(num_new), 2, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)                    # a busy stream: a sync would have to wait for it
    torch.cuda.set_sync_debug_mode("error")
    try:
        cu_seqlens_q, cu_seqlens_k = cache.cu_seqlens(ids, num_new)
        table, positions = cache.block_table(ids), cache.positions(ids, num_new)
        slots = cache.slot_mapping(ids, num_new)
        for layer in range(cache.num_layers):
            cache.write_packed(layer, ids, k, k, num_new)
        cache.commit(ids, num_new)
        cache.reserve(ids, 1)
        cache.seqlens(ids)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert cu_seqlens_k.tolist() == [0, 9, 12, 20, 22] and positions.shape == slots.shape == (9,)
    assert table.shape == (4, 5)
