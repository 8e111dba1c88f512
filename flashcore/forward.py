"""Host side of templates/attn_fwd.py.jinja: features of a call, default tile table, shape buckets, launch."""
from __future__ import annotations

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from . import dispatch
from .device import arch
from .generator import KernelSpec, load

TEMPLATE = "attn_fwd"
LOG2E = 1.4426950408889634
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Heuristic defaults, (arch class, head_dim up to, causal) -> (BLOCK_M, BLOCK_N, num_warps, num_stages).
# Used until the tuner has a record for a spec, and always a candidate in tuning. Arch class: "sm90" for
# Hopper and newer, "sm80" for Ampere/Ada, "cpu" for the interpreter (small tiles keep CPU tests fast).
# sm90 rows: best of a 7-config sweep per head_dim on an H100, bf16, 16k tokens per batch (BENCHMARKS.md).
DEFAULT_TILES = {
    ("sm90", 64, False): (128, 64, 8, 3),
    ("sm90", 64, True): (128, 64, 8, 3),
    ("sm90", 128, False): (128, 128, 8, 3),
    ("sm90", 128, True): (128, 128, 8, 3),
    ("sm90", 256, False): (128, 64, 8, 3),
    ("sm90", 256, True): (128, 64, 8, 3),
    ("sm80", 64, False): (128, 64, 4, 3),
    ("sm80", 64, True): (128, 64, 4, 3),
    ("sm80", 128, False): (128, 64, 8, 3),
    ("sm80", 128, True): (128, 64, 8, 3),
    ("sm80", 256, False): (64, 64, 8, 2),
    ("sm80", 256, True): (64, 64, 8, 2),
    ("cpu", 256, False): (32, 32, 4, 1),
    ("cpu", 256, True): (32, 32, 4, 1),
}


def _arch_class(cc: int) -> str:
    return "cpu" if cc == 0 else "sm90" if cc >= 90 else "sm80"


# Shared memory one block may use (bytes), by compute capability: the opt-in maximum.
SMEM_LIMIT = {90: 232448, 100: 232448, 80: 166912, 87: 166912, 86: 101376, 89: 101376, 120: 101376}
ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def smem_bytes(spec: KernelSpec, config: dict[str, int]) -> int:
    """num_stages buffers of the K and V tiles, + the Q tile on the pointer path (with host-built tensor
    descriptors Triton 3.6 on an H100 reports exactly the K/V buffers: 197 KB at 128/128/3, D=128)."""
    block_d = triton.next_power_of_2(spec["head_dim"])
    rows = 2 * config["BLOCK_N"] * max(config["num_stages"], 1) + (0 if spec["tma"] else config["BLOCK_M"])
    return rows * block_d * ELEM_BYTES[spec["dtype"]]


def smem_limit(cc: int) -> int:
    return SMEM_LIMIT.get(cc, SMEM_LIMIT[90] if cc >= 90 else SMEM_LIMIT[86])


def default_config(spec: KernelSpec) -> dict[str, int]:
    """The heuristic tile config for `spec`: always valid, never tuned."""
    cls = _arch_class(spec["arch"])
    head_dim_cap = 256 if cls == "cpu" else next(d for d in (64, 128, 256) if spec["head_dim"] <= d)
    block_m, block_n, num_warps, num_stages = DEFAULT_TILES[(cls, head_dim_cap, spec["causal"])]
    if spec["dtype"] == "fp32" and cls != "cpu":   # twice the bytes per tile: halve the key tile
        block_n //= 2
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}
    # the table assumes TMA's shared memory; the pointer path also stages Q: drop pipeline stages to fit
    while cls != "cpu" and config["num_stages"] > 1 and smem_bytes(spec, config) > smem_limit(spec["arch"]):
        config["num_stages"] -= 1
    return config


def shape_bucket(batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> tuple[int, int, int]:
    """(seqlen_q, seqlen_k, batch * heads), each rounded up to a power of two."""
    return (triton.next_power_of_2(seqlen_q), triton.next_power_of_2(seqlen_k),
            triton.next_power_of_2(batch * heads))


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors (bulk tensor copies) need 16-byte aligned bases and positive 16-byte aligned strides
    (a broadcast dimension, stride 0, takes the pointer path)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s <= 0 or (s * size) % 16 for s in t.stride()[:-1]):
            return False
    return True


def build_spec(cc: int, dtype: str = "bf16", head_dim: int = 128, causal: bool = False, window: bool = False,
               softcap: bool = False, gqa_group: int = 1, aligned: bool = True) -> KernelSpec:
    """The spec for a call on compute capability `cc` (0: interpreter); `aligned`: inputs fit tensor descriptors."""
    tma = cc >= 90 and head_dim == triton.next_power_of_2(head_dim) and aligned
    return KernelSpec.make(TEMPLATE, arch=int(cc), dtype=str(dtype), head_dim=int(head_dim), causal=bool(causal),
                           window=bool(window), softcap=bool(softcap), gqa_group=int(gqa_group), tma=tma)


def make_spec(q, k, v, causal: bool, window: bool, softcap: bool) -> KernelSpec:
    cc = arch(q.device.index or 0) if q.is_cuda else 0
    return build_spec(cc, DTYPE_NAMES[q.dtype], q.shape[-1], causal, window, softcap, q.shape[2] // k.shape[2],
                      aligned=cc >= 90 and _tma_ok(q, k, v))


def _check_row_offsets(spec: KernelSpec, q, k, v, out) -> None:
    """The kernel adds row * row_stride in int32 to an int64 (batch, head) base: refuse what would overflow."""
    tensors = (("out", out),) if spec["tma"] else (("q", q), ("k", k), ("v", v), ("out", out))
    for name, t in tensors:
        if (t.shape[1] - 1) * t.stride(1) + t.shape[3] > 2**31 - 1:
            raise ValueError(f"{name}: seqlen {t.shape[1]} x row stride {t.stride(1)} exceeds the kernel's 32-bit "
                             "row offsets (2^31 elements per batch and head); split the batch or the sequence")


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A (1, rows, 1, head_dim) tile descriptor over a whole (B, S, H, D) tensor, strides as they are."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, t.shape[-1]])


def attention_forward(q, k, v, softmax_scale: float, causal: bool, window_left: int, window_right: int,
                      softcap: float, return_lse: bool, config: dict[str, int] | None = None):
    """Checked inputs in, (out, lse) out. lse is an empty tensor unless `return_lse`.

    window_left / window_right are -1 when unbounded; causal must already be folded in (window_right = 0).
    `config` overrides dispatch (the tuner and tests use it).
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q) if return_lse else (0,), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if seqlen_k == 0:   # no key to attend to (and tensor descriptors reject empty dimensions)
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse

    has_window = window_left >= 0 or (window_right >= 0 and not causal)
    spec = make_spec(q, k, v, causal, has_window, softcap > 0)
    _check_row_offsets(spec, q, k, v, out)
    if config is None:
        config = dispatch.config_for(spec, shape_bucket(batch, heads_q, seqlen_q, seqlen_k), default_config)
    kernel = load(spec).attn_fwd
    if spec["tma"]:
        q_arg, k_arg, v_arg = (_descriptor(q, config["BLOCK_M"]), _descriptor(k, config["BLOCK_N"]),
                               _descriptor(v, config["BLOCK_N"]))
    else:
        q_arg, k_arg, v_arg = q, k, v

    unbounded = max(seqlen_q, seqlen_k)   # a window side of -1 reaches every key
    qk_scale = softmax_scale / softcap if softcap > 0 else softmax_scale * LOG2E
    grid = (triton.cdiv(seqlen_q, config["BLOCK_M"]), batch * heads_q)
    kernel[grid](
        q_arg, k_arg, v_arg, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads_q, seqlen_q, seqlen_k,
        qk_scale, softcap * LOG2E,
        window_left if window_left >= 0 else unbounded, window_right if window_right >= 0 else unbounded,
        STORE_LSE=return_lse,
        **config,
    )
    return out, lse


def flops(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs as the peers count them: 4 * B * H * Sq * Sk * D, halved when causal."""
    total = 4.0 * batch * heads_q * seqlen_q * seqlen_k * head_dim
    return total / 2 if causal else total

