"""PagedKVCache: block bookkeeping (allocation, free, fork; no block leaked or wrongly shared), the tensors it hands
to flash_attn_with_kvcache, the write / read paths, and its errors."""
from __future__ import annotations

import random

import pytest
import torch

import flashcore
from flashcore import PagedKVCache
from flashcore.paged_cache import OutOfBlocksError


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
    for call in (lambda: cache.reserve(["x"], 1), lambda: cache.commit(["x"], 1), lambda: cache.block_table(["x"]),
                 lambda: cache.seqlens(["x"]), lambda: cache.length("x"), lambda: cache.blocks("x"),
                 lambda: cache.read(0, "x")):
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
