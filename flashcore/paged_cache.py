"""PagedKVCache: a small paged KV-cache manager to drive `flash_attn_with_kvcache` in a generation loop.

Memory: per layer, a key pool and a value pool of shape (num_blocks, block_size, Hkv, D), the paged layout
`flash_attn_with_kvcache(..., block_table=...)` takes. Token position p of a sequence lives in slot
p % block_size of block blocks[p // block_size], where `blocks` is that sequence's block list. The same block
list serves every layer (block b of layer l is `k_pools[l][b]`).

Bookkeeping (host side, plain Python): a free-block list, a reference count per block, and per sequence its
block list and its length (tokens stored in the cache). A step of a loop:

    cache.reserve(ids, n)                         # blocks for n more tokens per sequence (all or nothing)
    table, lens = cache.block_table(ids), cache.seqlens(ids)
    for layer in range(num_layers):               # appends k/v at positions lens[b] .. lens[b] + n - 1
        out = flash_attn_with_kvcache(q, cache.k_pools[layer], cache.v_pools[layer], k=k, v=v,
                                      cache_seqlens=lens, block_table=table, causal=True)
    cache.commit(ids, n)                          # those n tokens now count as stored

Lengths move only on `commit`, so every layer of a step sees the same `seqlens`.

Fork shares what can never be written again: the parent's full blocks (positions < length, which appends never
touch) are shared by reference count; a partly filled last block is copied into a fresh block for the child
(every layer), so each sequence appends only into blocks it owns alone. Blocks the parent reserved beyond its
length are not shared. A block returns to the free list when its last sequence is freed. Freed blocks are reused
last-freed first.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch


class OutOfBlocksError(RuntimeError):
    """The block pool has too few free blocks for the request; nothing was allocated. A scheduler can catch it,
    free or preempt sequences, and retry."""


class PagedKVCache:
    """Block pools for `num_layers` layers plus the block bookkeeping of the sequences stored in them.

    Args:
        num_layers: layers (one key pool and one value pool each).
        num_blocks: blocks per pool, shared by all sequences.
        block_size: token slots per block (any size >= 1).
        num_kv_heads, head_dim: Hkv and D of the cached keys and values.
        dtype, device: of the pools (the dtype and device q, k and v must have in the attention call).
        max_blocks_per_seq: blocks one sequence may hold, which is the width of `block_table`; or
        max_seqlen: the longest sequence, giving max_blocks_per_seq = ceil(max_seqlen / block_size).
            Give at most one of them; with neither, one sequence may hold the whole pool.

    Attributes:
        k_pools, v_pools: lists (one per layer) of (num_blocks, block_size, num_kv_heads, head_dim) tensors.
        max_blocks_per_seq: the block table's width; a sequence holds at most
            capacity = max_blocks_per_seq * block_size tokens.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 max_blocks_per_seq: int | None = None, max_seqlen: int | None = None):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            _check_positive_int(name, value)
        if max_blocks_per_seq is not None and max_seqlen is not None:
            raise ValueError("give max_blocks_per_seq or max_seqlen, not both")
        if max_seqlen is not None:
            _check_positive_int("max_seqlen", max_seqlen)
            max_blocks_per_seq = math.ceil(max_seqlen / block_size)
        elif max_blocks_per_seq is not None:
            _check_positive_int("max_blocks_per_seq", max_blocks_per_seq)
        else:
            max_blocks_per_seq = num_blocks
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")

        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.max_blocks_per_seq = max_blocks_per_seq
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # The allocated tensors' device: "cuda" becomes "cuda:<current>", which is what callers' tensors report.
        self.dtype, self.device = dtype, self.k_pools[0].device
        # Popped from the end: block 0 is handed out first, and a freed block is the next one reused.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refcount = [0] * num_blocks
        self._blocks: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    # ---- inspection -------------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Most tokens one sequence can hold (max_blocks_per_seq * block_size)."""
        return self.max_blocks_per_seq * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def seq_ids(self) -> list[Hashable]:
        """The sequences in the cache, in the order they were added."""
        return list(self._blocks)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._blocks

    def length(self, seq_id: Hashable) -> int:
        """Tokens of `seq_id` stored in the cache (committed)."""
        self._check_known(seq_id)
        return self._lengths[seq_id]

    def blocks(self, seq_id: Hashable) -> tuple[int, ...]:
        """The blocks `seq_id` holds, in position order (reserved ones included)."""
        self._check_known(seq_id)
        return tuple(self._blocks[seq_id])

    def refcount(self, block: int) -> int:
        """How many sequences hold `block` (0: it is free)."""
        return self._refcount[block]

    # ---- sequences --------------------------------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable) -> None:
        """A new, empty sequence (no block until tokens are reserved)."""
        if seq_id in self._blocks:
            raise ValueError(f"seq_id {seq_id!r} is already in the cache")
        self._blocks[seq_id] = []
        self._lengths[seq_id] = 0

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """`child` becomes a copy of `parent`'s stored tokens (same length), sharing its full blocks; a partly
        filled last block is copied (needs one free block, else OutOfBlocksError and nothing changes)."""
        self._check_known(parent, "parent")
        if child in self._blocks:
            raise ValueError(f"child {child!r} is already in the cache")
        length = self._lengths[parent]
        num_full, partial = divmod(length, self.block_size)
        shared = self._blocks[parent][:num_full]
        if partial:
            (copy,) = self._allocate(1, f"to fork {parent!r} (copy of its partly filled last block)")
            src = self._blocks[parent][num_full]
            for pool in (*self.k_pools, *self.v_pools):
                pool[copy].copy_(pool[src])
        for block in shared:
            self._refcount[block] += 1
        self._blocks[child] = shared + ([copy] if partial else [])
        self._lengths[child] = length

    def free(self, seq_id: Hashable) -> None:
        """Drop `seq_id`; its blocks no other sequence holds return to the free list."""
        if seq_id not in self._blocks:
            raise ValueError(f"seq_id {seq_id!r} is not in the cache (never added, or already freed)")
        # Reversed, so that the sequence's first block is the next one handed out again.
        for block in reversed(self._blocks.pop(seq_id)):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                self._free.append(block)
        del self._lengths[seq_id]

    # ---- a step: reserve, hand out tables, write, commit -------------------------------------------------------

    def reserve(self, seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int]) -> None:
        """Make room for `num_tokens` more tokens after each sequence's length (an int for all, or one per
        sequence), allocating blocks as needed. All or nothing: OutOfBlocksError (not enough free blocks) or
        ValueError (past `capacity`) leave the cache as it was. Reserving again without a commit in between
        asks for room from the same length, so it is idempotent."""
        counts = self._counts(seq_ids, num_tokens)
        needed = []
        for seq_id, n in zip(seq_ids, counts):
            total = self._lengths[seq_id] + n
            if total > self.capacity:
                raise ValueError(f"seq_id {seq_id!r} would hold {total} tokens, more than the capacity "
                                 f"{self.capacity} (max_blocks_per_seq {self.max_blocks_per_seq} x block_size "
                                 f"{self.block_size})")
            needed.append(max(0, math.ceil(total / self.block_size) - len(self._blocks[seq_id])))
        new = self._allocate(sum(needed), f"to reserve {list(counts)} tokens for {list(seq_ids)}")
        for seq_id, n in zip(seq_ids, needed):
            self._blocks[seq_id].extend(new[:n])
            new = new[n:]

    def commit(self, seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int]) -> None:
        """Count `num_tokens` more tokens (an int for all, or one per sequence) as stored, after they were
        written (by flash_attn_with_kvcache's append or `write`, in every layer). They must fit in the sequence's
        blocks (`reserve` them first)."""
        counts = self._counts(seq_ids, num_tokens)
        for seq_id, n in zip(seq_ids, counts):
            if self._lengths[seq_id] + n > len(self._blocks[seq_id]) * self.block_size:
                raise ValueError(f"seq_id {seq_id!r}: committing {n} tokens after {self._lengths[seq_id]} needs "
                                 f"room for them: reserve them first")
        for seq_id, n in zip(seq_ids, counts):
            self._lengths[seq_id] += n

    def block_table(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """(B, max_blocks_per_seq) int32 on the pools' device: row b lists seq_ids[b]'s blocks in position
        order, then 0 in the unused entries (never read: they cover positions past the sequence's tokens)."""
        self._check_batch(seq_ids)
        table = torch.zeros(len(seq_ids), self.max_blocks_per_seq, dtype=torch.int32)
        for row, seq_id in enumerate(seq_ids):
            blocks = self._blocks[seq_id]
            table[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return table.to(self.device)

    def seqlens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """(B,) int32 on the pools' device: tokens stored per sequence (flash_attn_with_kvcache's cache_seqlens)."""
        self._check_batch(seq_ids)
        return torch.tensor([self._lengths[s] for s in seq_ids], dtype=torch.int32).to(self.device)

    def write(self, layer: int, seq_id: Hashable, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (S, Hkv, D) (e.g. a prompt's keys and values, rotary already applied to k) at positions
        length .. length + S - 1 of `seq_id` in `layer`, by an index copy. The positions must be reserved;
        `commit` them once every layer is written."""
        self._check_known(seq_id)
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        expected = (self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or tuple(t.shape[1:]) != expected or t.shape[0] != k.shape[0]:
                raise ValueError(f"{name} must have shape (S, {expected[0]}, {expected[1]}) (S the same for k "
                                 f"and v), got {tuple(t.shape)}")
            if t.dtype != self.dtype or t.device != self.device:
                raise TypeError(f"{name} must be {self.dtype} on {self.device}, got {t.dtype} on {t.device}")
        start = self._lengths[seq_id]
        stop = start + k.shape[0]
        if stop > len(self._blocks[seq_id]) * self.block_size:
            raise ValueError(f"seq_id {seq_id!r}: writing {k.shape[0]} tokens after {start} needs room for them: "
                             f"reserve them first")
        blocks, slots = self._slots(seq_id, start, stop)
        self.k_pools[layer][blocks, slots] = k
        self.v_pools[layer][blocks, slots] = v

    def read(self, layer: int, seq_id: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of `seq_id`'s stored tokens in `layer`, each (length, Hkv, D), gathered into new tensors."""
        self._check_known(seq_id)
        blocks, slots = self._slots(seq_id, 0, self._lengths[seq_id])
        return self.k_pools[layer][blocks, slots], self.v_pools[layer][blocks, slots]

    # ---- internals --------------------------------------------------------------------------------------------

    def _allocate(self, count: int, purpose: str) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"out of KV-cache blocks {purpose}: {count} needed, {len(self._free)} free of "
                                   f"{self.num_blocks}; free or preempt a sequence, or make the pool larger")
        taken = [self._free.pop() for _ in range(count)]
        for block in taken:
            self._refcount[block] = 1
        return taken

    def _slots(self, seq_id: Hashable, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block and slot indices (on the pools' device) of positions start .. stop - 1 of `seq_id`."""
        pos = torch.arange(start, stop)
        table = torch.tensor(self._blocks[seq_id], dtype=torch.long)
        return table[pos // self.block_size].to(self.device), (pos % self.block_size).to(self.device)

    def _check_known(self, seq_id: Hashable, name: str = "seq_id") -> None:
        if seq_id not in self._blocks:
            raise ValueError(f"{name} {seq_id!r} is not in the cache (add_sequence it first)")

    def _check_batch(self, seq_ids: Sequence[Hashable]) -> None:
        if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, Sequence):
            raise TypeError(f"seq_ids must be a list of sequence ids, got {type(seq_ids).__name__}")
        for seq_id in seq_ids:
            self._check_known(seq_id)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids has duplicates: {list(seq_ids)}")

    def _counts(self, seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int]) -> list[int]:
        self._check_batch(seq_ids)
        counts = ([num_tokens] * len(seq_ids) if isinstance(num_tokens, int)
                  else list(num_tokens) if isinstance(num_tokens, Sequence) else [])
        if len(counts) != len(seq_ids) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in counts):
            raise ValueError(f"num_tokens must be an int >= 0 or one such int per sequence ({len(seq_ids)}), got "
                             f"{num_tokens!r}")
        return counts


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
