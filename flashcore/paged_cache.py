"""PagedKVCache: a small paged KV-cache manager to drive `flash_attn_with_kvcache` (decode) and
`flash_attn_varlen_func(..., block_table=...)` (chunked prefill, prefix caching, mixed prefill + decode batches) in
a generation loop.

Memory: per layer, a key pool and a value pool of shape (num_blocks, block_size, Hkv, D), the paged layout both
functions take. Token position p of a sequence lives in slot p % block_size of block blocks[p // block_size], where
`blocks` is that sequence's block list; flattened, that is slot blocks[p // block_size] * block_size + p % block_size
of `pool.view(-1, Hkv, D)` (vLLM's slot mapping). The same block list serves every layer (block b of layer l is
`k_pools[l][b]`).

Bookkeeping (host side, plain Python): a free-block list, a reference count per block, and per sequence its
block list and its length (tokens stored in the cache). A step of a decode loop, appending through the kernel:

    cache.reserve(ids, n)                         # blocks for n more tokens per sequence (all or nothing)
    table, lens = cache.block_table(ids), cache.seqlens(ids)
    for layer in range(num_layers):               # appends k/v at positions lens[b] .. lens[b] + n - 1
        out = flash_attn_with_kvcache(q, cache.k_pools[layer], cache.v_pools[layer], k=k, v=v,
                                      cache_seqlens=lens, block_table=table, causal=True)
    cache.commit(ids, n)                          # those n tokens now count as stored

A step of a server loop (vLLM style): every scheduled sequence brings num_new[i] tokens, a prompt chunk or the
one token it decodes, packed along the token dimension in one varlen call per layer:

    cache.reserve(ids, num_new)
    cu_seqlens_q, cu_seqlens_k = cache.cu_seqlens(ids, num_new)     # new tokens; prefix + new tokens
    table, positions = cache.block_table(ids), cache.positions(ids, num_new)   # positions: for rotary
    for layer in range(num_layers):               # q, k, v: (total_new, H, D), rotary applied at `positions`
        cache.write_packed(layer, ids, k, v, num_new)
        out = flash_attn_varlen_func(q, cache.k_pools[layer], cache.v_pools[layer], cu_seqlens_q, cu_seqlens_k,
                                     max(num_new), cache.capacity, causal=True, block_table=table)
    cache.commit(ids, num_new)

Lengths move only on `commit`, so every layer of a step sees the same lengths. The step helpers build their
tensors from the host bookkeeping and copy them to the pools' device without waiting for it (pinned memory on
CUDA): no call reads a device tensor back, so a loop never syncs on them.

Fork shares what can never be written again: the parent's full blocks (positions < length, which appends and
writes never touch) are shared by reference count; a partly filled last block is copied into a fresh block for
the child (every layer), so each sequence writes only into blocks it owns alone (copy-on-write done at the fork:
`reserve` and the writes never meet a shared block). Blocks the parent reserved beyond its length are not shared.
A block returns to the free list when its last sequence is freed. Freed blocks are reused last-freed first.
"""
from __future__ import annotations

import itertools
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
        # Bumped by every change of blocks or lengths: a kept slot map (_step_slots) is valid for one epoch.
        self._epoch = 0
        self._kept_slots: tuple[tuple, torch.Tensor] | None = None

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
        self._epoch += 1

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
        self._epoch += 1

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
        self._epoch += 1

    # ---- a step: reserve, hand out the call's tensors, write, commit ------------------------------------------

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
        self._epoch += 1

    def commit(self, seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int]) -> None:
        """Count `num_tokens` more tokens (an int for all, or one per sequence) as stored, after they were
        written (by flash_attn_with_kvcache's append, `write` or `write_packed`, in every layer). They must fit in
        the sequence's blocks (`reserve` them first)."""
        counts = self._counts(seq_ids, num_tokens)
        self._check_room(seq_ids, counts, "committing")
        for seq_id, n in zip(seq_ids, counts):
            self._lengths[seq_id] += n
        self._epoch += 1

    def block_table(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """(B, max_blocks_per_seq) int32 on the pools' device: row b lists seq_ids[b]'s blocks in position
        order, then 0 in the unused entries (never read: they cover positions past the sequence's tokens)."""
        self._check_batch(seq_ids)
        table = torch.zeros(len(seq_ids), self.max_blocks_per_seq, dtype=torch.int32)
        for row, seq_id in enumerate(seq_ids):
            blocks = self._blocks[seq_id]
            table[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return self._to_device(table)

    def seqlens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """(B,) int32 on the pools' device: tokens stored per sequence (flash_attn_with_kvcache's cache_seqlens)."""
        self._check_batch(seq_ids)
        return self._to_device(torch.tensor([self._lengths[s] for s in seq_ids], dtype=torch.int32))

    def cu_seqlens(self, seq_ids: Sequence[Hashable],
                   num_new: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cu_seqlens_q, cu_seqlens_k) of a step in which seq_ids[b] brings num_new[b] new tokens (an int for
        all, or one per sequence), for `flash_attn_varlen_func(..., block_table=self.block_table(seq_ids))`.

        Returns two (B + 1,) int32 tensors on the pools' device, 0 then running totals:
            cu_seqlens_q: of the new tokens (sequence b's are rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of
                the packed q, k, v, as `write_packed`, `positions` and `slot_mapping` pack them);
            cu_seqlens_k: of the keys each sequence attends: its length (committed) plus its new tokens.
        The new tokens must be reserved. The varlen call's max_seqlen_q / max_seqlen_k: max(num_new) (or the
        largest chunk a step schedules) and `capacity` (fixed values replay a CUDA graph across steps)."""
        counts = self._new_tokens(seq_ids, num_new)
        keys = [self._lengths[s] + n for s, n in zip(seq_ids, counts)]
        return self._to_device(_running_totals(counts)), self._to_device(_running_totals(keys))

    def positions(self, seq_ids: Sequence[Hashable], num_new: int | Sequence[int]) -> torch.Tensor:
        """(total_new,) int64 on the pools' device, packed like cu_seqlens_q: each new token's position in its
        sequence, length(seq_ids[b]) + 0, 1, .., num_new[b] - 1 (what rotary embeddings index). The new tokens
        must be reserved."""
        counts = self._new_tokens(seq_ids, num_new)
        return self._packed(seq_ids, [self._lengths[s] for s in seq_ids], counts)[1]

    def slot_mapping(self, seq_ids: Sequence[Hashable], num_new: int | Sequence[int]) -> torch.Tensor:
        """(total_new,) int64 on the pools' device, packed like cu_seqlens_q: the flat slot each new token goes
        to, block * block_size + row, an index into pool.view(-1, Hkv, D) (vLLM's slot_mapping). The new tokens
        must be reserved."""
        counts = self._new_tokens(seq_ids, num_new)
        return self._slot_map(seq_ids, [self._lengths[s] for s in seq_ids], counts)

    def write_packed(self, layer: int, seq_ids: Sequence[Hashable], k: torch.Tensor, v: torch.Tensor,
                     num_new: int | Sequence[int]) -> None:
        """Store a step's new keys and values in `layer`: k, v (total_new, Hkv, D) packed, sequence b's num_new[b]
        tokens at rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 (num_new an int for all, or one per sequence;
        total_new = sum(num_new); rotary already applied to k), going to its positions length .. length +
        num_new[b] - 1. One indexed assignment per pool; the slot map (`slot_mapping`) is built once per step and
        kept for the other layers; nothing is read back from the device. The positions must be reserved; `commit`
        them once every layer is written. Writes land only in blocks the sequence holds alone (see fork)."""
        self._check_layer(layer)
        counts = self._counts(seq_ids, num_new, "num_new")
        self._check_kv(k, v, "total_new")
        if k.shape[0] != sum(counts):
            raise ValueError(f"k and v have {k.shape[0]} rows but num_new {list(counts)} sums to {sum(counts)}: "
                             "they must hold every new token, packed in seq_ids' order")
        self._check_room(seq_ids, counts, "writing")
        self._scatter(layer, self._step_slots(seq_ids, counts), k, v)

    def write(self, layer: int, seq_id: Hashable, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (S, Hkv, D) (e.g. a prompt's keys and values, rotary already applied to k) at positions
        length .. length + S - 1 of `seq_id` in `layer`: `write_packed` for one sequence. The positions must be
        reserved; `commit` them once every layer is written."""
        self._check_known(seq_id)
        self._check_layer(layer)
        self._check_kv(k, v, "S")
        self._check_room([seq_id], [k.shape[0]], "writing")
        self._scatter(layer, self._step_slots([seq_id], [k.shape[0]]), k, v)

    def read(self, layer: int, seq_id: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of `seq_id`'s stored tokens in `layer`, each (length, Hkv, D), gathered into new tensors."""
        self._check_known(seq_id)
        self._check_layer(layer)
        slots = self._slot_map([seq_id], [0], [self._lengths[seq_id]])
        return self._flat(self.k_pools[layer])[slots], self._flat(self.v_pools[layer])[slots]

    # ---- internals: allocation --------------------------------------------------------------------------------

    def _allocate(self, count: int, purpose: str) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"out of KV-cache blocks {purpose}: {count} needed, {len(self._free)} free of "
                                   f"{self.num_blocks}; free or preempt a sequence, or make the pool larger")
        taken = [self._free.pop() for _ in range(count)]
        for block in taken:
            self._refcount[block] = 1
        return taken

    # ---- internals: slots ------------------------------------------------------------------------------------

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the pools' device. On CUDA through pinned memory, non-blocking: a pageable copy would
        wait for the stream's queued work."""
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def _packed(self, seq_ids: Sequence[Hashable], starts: list[int],
                counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position), each (sum(counts),) int64 on the pools' device, for the tokens of seq_ids packed in
        order: sequence b contributes counts[b] tokens at positions starts[b] .. starts[b] + counts[b] - 1; row
        is b. Torch ops on the device, from one copy of (starts, counts)."""
        total = sum(counts)
        start, count = self._to_device(torch.tensor([starts, counts], dtype=torch.long).view(2, len(seq_ids)))
        row = torch.repeat_interleave(torch.arange(len(seq_ids), device=self.device), count, output_size=total)
        first = torch.cumsum(count, 0) - count            # packed index of each sequence's first token
        return row, start[row] + torch.arange(total, device=self.device) - first[row]

    def _slot_map(self, seq_ids: Sequence[Hashable], starts: list[int], counts: list[int]) -> torch.Tensor:
        """Flat slots (block * block_size + row) of the tokens `_packed` describes."""
        row, position = self._packed(seq_ids, starts, counts)
        blocks = self.block_table(seq_ids).long()[row, position // self.block_size]
        return blocks * self.block_size + position % self.block_size

    def _step_slots(self, seq_ids: Sequence[Hashable], counts: list[int]) -> torch.Tensor:
        """The slot map of the new tokens, kept while the bookkeeping is unchanged: the same step's other layers
        reuse it."""
        key = (self._epoch, tuple(seq_ids), tuple(counts))
        if self._kept_slots is None or self._kept_slots[0] != key:
            self._kept_slots = (key, self._slot_map(seq_ids, [self._lengths[s] for s in seq_ids], counts))
        return self._kept_slots[1]

    def _flat(self, pool: torch.Tensor) -> torch.Tensor:
        """pool as (num_blocks * block_size, Hkv, D), a view: slot s is row s % block_size of block s // block_size."""
        return pool.view(-1, self.num_kv_heads, self.head_dim)

    def _scatter(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._flat(self.k_pools[layer])[slots] = k
        self._flat(self.v_pools[layer])[slots] = v

    # ---- internals: argument checks ---------------------------------------------------------------------------

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

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def _check_kv(self, k: torch.Tensor, v: torch.Tensor, rows: str) -> None:
        expected = (self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or tuple(t.shape[1:]) != expected or t.shape[0] != k.shape[0]:
                raise ValueError(f"{name} must have shape ({rows}, {expected[0]}, {expected[1]}) ({rows} the same "
                                 f"for k and v), got {tuple(t.shape)}")
            if t.dtype != self.dtype or t.device != self.device:
                raise TypeError(f"{name} must be {self.dtype} on {self.device}, got {t.dtype} on {t.device}")

    def _check_room(self, seq_ids: Sequence[Hashable], counts: list[int], doing: str) -> None:
        """The positions length .. length + n - 1 of each sequence lie in its blocks (were reserved)."""
        for seq_id, n in zip(seq_ids, counts):
            length, room = self._lengths[seq_id], len(self._blocks[seq_id]) * self.block_size
            if length + n > room:
                raise ValueError(f"seq_id {seq_id!r}: {doing} {n} tokens after {length} needs room for them (its "
                                 f"blocks hold {room}): reserve them first")

    def _counts(self, seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int],
                name: str = "num_tokens") -> list[int]:
        self._check_batch(seq_ids)
        if isinstance(num_tokens, torch.Tensor):
            raise TypeError(f"{name} must be host ints (an int, or a list of one per sequence), not a tensor: the "
                            "cache builds its tensors from its host bookkeeping and never reads the device")
        counts = ([num_tokens] * len(seq_ids) if isinstance(num_tokens, int)
                  else list(num_tokens) if isinstance(num_tokens, Sequence) else [])
        if len(counts) != len(seq_ids) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in counts):
            raise ValueError(f"{name} must be an int >= 0 or one such int per sequence ({len(seq_ids)}), got "
                             f"{num_tokens!r}")
        return counts

    def _new_tokens(self, seq_ids: Sequence[Hashable], num_new: int | Sequence[int]) -> list[int]:
        """num_new as one count per sequence, checked, its tokens reserved."""
        counts = self._counts(seq_ids, num_new, "num_new")
        self._check_room(seq_ids, counts, "a step of")
        return counts


def _running_totals(counts: list[int]) -> torch.Tensor:
    """(len(counts) + 1,) int32 host tensor: 0, then the running totals of counts (a cu_seqlens)."""
    return torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
