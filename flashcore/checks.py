"""Input checks for the public API: each failure names the argument and what was expected."""
from __future__ import annotations

import math

import torch

from .device import interpreter_mode

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
BATCHED = "(batch, seqlen, heads, head_dim)"          # the layouts of tensors, as errors name them
PACKED = "(total_tokens, heads, head_dim)"
PAGED = "(num_blocks, block_size, heads, head_dim)"


def check_tensor(name: str, t, rank: int, interpret: bool | None = None, layout: str = BATCHED) -> None:
    """Type, rank, dtype, device and a unit stride on the last dimension. Cheap on the valid path: it runs on
    every call (`interpret`: interpreter_mode(), read once per call by the caller)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if interpret is None:
        interpret = interpreter_mode()
    if interpret:
        if not t.is_cpu:
            raise ValueError(f"{name} is on {t.device}, but TRITON_INTERPRET=1 runs kernels on the CPU: "
                             "pass CPU tensors or unset TRITON_INTERPRET")
    elif not t.is_cuda:
        raise ValueError(f"{name} is on {t.device}; FlashCore kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 for the CPU interpreter)")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (head_dim), got strides {t.stride()}")


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; they must match")


def check_q_and_kv(q, k, v, k_name: str = "k", v_name: str = "v", q_layout: str = BATCHED,
                   kv_layout: str = BATCHED) -> None:
    """q (B, Sq, Hq, D) and k, v (rank 4, ..., Hkv, D: inputs or caches), or the layouts given (q packed: PACKED):
    types, ranks, dtypes, devices, the head_dim they share and the GQA group."""
    interpret = interpreter_mode()
    for name, t, layout in (("q", q, q_layout), (k_name, k, kv_layout), (v_name, v, kv_layout)):
        check_tensor(name, t, layout.count(",") + 1, interpret, layout)
    check_same(("q", k_name, v_name), (q, k, v))
    if interpret and q.dtype == torch.bfloat16:   # Triton's interpreter computes tl.dot wrongly for bf16 (3.6 - 3.9)
        raise TypeError(f"q, {k_name}, {v_name} are bfloat16, which the Triton interpreter (TRITON_INTERPRET=1) "
                        "computes wrongly: use float16 or float32 on the CPU, bfloat16 on a GPU")
    if k.shape != v.shape:
        raise ValueError(f"{k_name} and {v_name} must have the same shape, got {k_name} {tuple(k.shape)} and "
                         f"{v_name} {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, {k_name} and {v_name} have {k.shape[-1]}")
    check_head_dim(head_dim)
    check_heads(q.shape[-2], k.shape[-2], k_name)


# The rules on a call's integers, shared with the ops' call descriptions (flashcore/ops/*/call.py), so that
# `flashcore info` and `flashcore gen` refuse what the API refuses, with its messages.

def check_head_dim(head_dim: int) -> None:
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0):
        raise ValueError(f"head_dim must be a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")


def check_heads(heads_q: int, heads_kv: int, k_name: str = "k") -> None:
    """MQA/GQA: every key/value head serves the same number of query heads (`k_name`: the tensor holding them)."""
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"the number of query heads ({heads_q}) must be a multiple of the number of key/value heads "
                         f"({heads_kv}) of {k_name} for MQA/GQA")


MAX_DECODE_ROWS = 128   # seqlen_q * Hq / Hkv: one decode program's query tile (16 speculative tokens x GQA 8)


def check_decode_rows(seqlen_q: int, heads_q: int, heads_kv: int) -> None:
    """flash_attn_with_kvcache: the query rows of one kv head (its tokens x the heads sharing it) fit one tile."""
    rows = seqlen_q * (heads_q // heads_kv)
    if rows > MAX_DECODE_ROWS:
        raise ValueError(f"q: seqlen_q ({seqlen_q}) x query heads per kv head ({heads_q // heads_kv}) = {rows} query "
                         f"rows per kv head; the decode kernel holds at most {MAX_DECODE_ROWS} in one tile: pass fewer "
                         "query tokens per call (prefill belongs to flash_attn_varlen_func or flash_attn_func)")


def check_attention_inputs(q, k, v) -> None:
    """q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D): ranks, dtypes, devices, and the shapes that must agree."""
    check_q_and_kv(q, k, v)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch size mismatch: q has {q.shape[0]}, k and v have {k.shape[0]}")


def check_packed(name: str, t, parts: int, batched: bool) -> None:
    """A packed qkv (parts 3) or kv (parts 2): (batch, seqlen, parts, heads, head_dim) if `batched`, else
    (total_tokens, parts, heads, head_dim). The views sliced out of it get the tensor checks."""
    layout = f"({'batch, seqlen' if batched else 'total_tokens'}, {parts}, heads, head_dim)"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != layout.count(",") + 1 or t.shape[-3] != parts:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


def check_dropout(dropout_p) -> None:
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0:
        raise NotImplementedError(f"dropout_p={dropout_p}: FlashCore has no dropout (inference kernels); "
                                  "pass dropout_p=0.0")


def all_tensors(*arguments) -> bool:
    """Whether every argument is a torch.Tensor or None (what a custom op's Tensor / Tensor? schema takes)."""
    return all(a is None or isinstance(a, torch.Tensor) for a in arguments)


def needs_grad(*tensors) -> bool:
    """Whether autograd would record a call on `tensors`: one of them requires grad and grad mode is on (in that
    order: an inference call pays only the attribute reads). Non-tensors (None, a bad argument) count as not."""
    for t in tensors:
        if getattr(t, "requires_grad", False):
            return torch.is_grad_enabled()
    return False


def refuse_gradients(function: str, why: str, **tensors) -> None:
    """Raises for a call that `needs_grad` but whose backward FlashCore does not have: its output would carry no
    gradient to `tensors`, and a model's loss would train everything but attention, silently."""
    name = next(name for name, t in tensors.items() if getattr(t, "requires_grad", False))
    raise NotImplementedError(
        f"{function}: {name} requires grad, but {why}, so its gradients would be lost. For inference, call it under "
        f"torch.no_grad() or torch.inference_mode(), or pass tensors that do not require grad ({name}.detach())")


def check_flags(**flags) -> None:
    """Each keyword's value is a bool (flash-attn's flags: a truthy int or tensor is refused, not guessed at)."""
    for name, flag in flags.items():
        if type(flag) is not bool:    # bool has no subclasses
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def check_alibi_slopes(alibi_slopes, q, batch: int | None = None) -> None:
    """(Hq,) or (B, Hq) float32 on q's device, unit stride over heads (`batch`: the sequences, if not q's first
    dimension)."""
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    heads_q = q.shape[-2]
    batch = q.shape[0] if batch is None else batch
    if tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q)):
        raise ValueError(f"alibi_slopes must have shape ({heads_q},) or ({batch}, {heads_q}) (heads of q), got "
                         f"{tuple(alibi_slopes.shape)}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}; they must match")
    if alibi_slopes.stride(-1) != 1 and heads_q > 1:
        raise ValueError(f"alibi_slopes must be contiguous over heads, got strides {alibi_slopes.stride()}")


def check_softmax_scale(softmax_scale) -> None:
    if softmax_scale is None:
        return
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale}")


def check_window(window_size) -> None:
    pair = isinstance(window_size, (tuple, list)) and len(window_size) == 2
    left, right = window_size if pair else (None, None)
    if not (isinstance(left, int) and isinstance(right, int)) or isinstance(left, bool) or isinstance(right, bool):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if left < -1:
        raise ValueError(f"window_size left must be >= 0, or -1 for unbounded, got {left}")
    if right < -1:
        raise ValueError(f"window_size right must be >= 0, or -1 for unbounded, got {right}")


def check_softcap(softcap) -> None:
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap}")
