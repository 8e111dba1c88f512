"""Every forward variant compiles for sm90 (H100) on a CPU machine, with its default config fitting in shared memory;
so do the KV-cache op's kernels, with their sm90-only programmatic-launch branches, and the backward's atomic-dQ
dK/dV kernel, whose dq adds must be fire-and-forget reductions (red, not atom: no value comes back).

The interpreter runs kernels as Python, so it misses what only the compiler rejects (a non-constexpr global, a
descriptor load of the wrong rank, a layout the sm90 pipeliner cannot handle). Triton ships ptxas, so compiling
for a Hopper target needs no GPU: these tests catch such breaks in CI, before a device run. The compiles run in a
child process without TRITON_INTERPRET (Triton decorates its own library as interpreted when it is set).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SPECS = [
    dict(dtype="bf16", head_dim=128, causal=False, tma=True),
    dict(dtype="bf16", head_dim=128, causal=True, tma=True),
    dict(dtype="fp16", head_dim=64, causal=True, window=True, softcap=True, gqa_group=4, tma=True),
    dict(dtype="bf16", head_dim=256, causal=False, tma=True),
    dict(dtype="bf16", head_dim=80, causal=True, tma=False),
    dict(dtype="fp16", head_dim=192, causal=False, window=True, tma=False),
    dict(dtype="fp32", head_dim=128, causal=True, tma=True),
    dict(dtype="bf16", head_dim=128, causal=True, alibi=True, softcap=True, tma=True),
    dict(dtype="fp16", head_dim=96, causal=False, alibi=True, tma=False),
]


def compile_sm90(kernel, tensors: dict[str, str], constexprs: dict, num_warps: int, num_stages: int):
    """triton.compile of `kernel` for an H100: `tensors` gives the pointer / descriptor arguments' types, the
    constexprs of the kernel's parameters are bound, every other parameter is an i32 (fp32 for the scales)."""
    import triton
    from triton.backends.compiler import GPUTarget

    constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
    signature = {name: "constexpr" if name in constexprs else tensors.get(name) or (
                 "fp32" if name in ("qk_scale", "softcap_log2e") else "i32") for name in kernel.arg_names}
    return triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 128), options={"num_warps": num_warps,
                                                                      "num_stages": num_stages})


def compile_for_sm90(features: dict) -> dict:
    """Compile the spec's kernel with its default config for an H100; what the PTX and metadata show."""
    from flashcore.device import smem_limit
    from flashcore.ops.attn_fwd.host import default_config
    from flashcore.generator import KernelSpec, load

    spec = KernelSpec.make("attn_fwd", **{"arch": 90, "window": False, "softcap": False, "alibi": False,
                                          "gqa_group": 1,
                                          **features})
    config = default_config(spec)
    kernel = load(spec).attn_fwd
    elem, d = spec["dtype"], spec["head_dim"]
    if spec["tma"]:
        rows = {"Q": config["BLOCK_M"], "K": config["BLOCK_N"], "V": config["BLOCK_N"]}
        signature = {name: f"tensordesc<{elem}[1,{r},1,{d}]>" for name, r in rows.items()}
    else:
        signature = {name: f"*{elem}" for name in ("Q", "K", "V")}
    signature.update(Out=f"*{elem}", Lse="*fp32", **({"Alibi": "*fp32"} if spec["alibi"] else {}))
    constexprs = {"STORE_LSE": True, "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"],
                  "WARP_SPECIALIZE": False}
    compiled = compile_sm90(kernel, signature, constexprs, config["num_warps"], config["num_stages"])
    ptx = compiled.asm["ptx"]
    return {"shared": compiled.metadata.shared, "limit": smem_limit(90), "tma": spec["tma"], "dtype": elem,
            "wgmma": "wgmma.mma_async" in ptx, "bulk_copies": "cp.async.bulk.tensor" in ptx}


# the KV-cache op's kernels: (template, page_size, launch-time constexprs)
SPLIT = dict(BLOCK_M=16, BLOCK_N=64, WRITE_PARTIAL=True, CHECK=True, PDL=True, MERGE_INLINE=False, SPLITS_POW2=1,
             MERGE_ROWS=1)
DECODE_KERNELS = [
    ("attn_decode", 0, SPLIT),
    ("attn_decode", 16, dict(SPLIT, TABLE_CHUNK=256, CHUNK_KEYS=4032, CHUNKED=False)),
    ("attn_decode", 16, dict(SPLIT, TABLE_CHUNK=256, CHUNK_KEYS=4032, CHUNKED=True)),
    ("attn_decode", 16, dict(SPLIT, PDL=False, MERGE_INLINE=True, SPLITS_POW2=16, MERGE_ROWS=4, TABLE_CHUNK=256,
                             CHUNK_KEYS=4032, CHUNKED=False)),
    ("attn_decode_combine", 0, dict(STORE_LSE=True, SPLITS_POW2=16, MERGE_D=32, PDL=True)),
    ("kv_append", 16, dict(CHECK=True, ROTARY_DIM=64, INTERLEAVED=False, Q_PER_TOKEN=False, HEADS_KV=8,
                           HEADS_Q=32)),
]
DECODE_TENSORS = {"Q": "bf16", "QRot": "bf16", "KCache": "bf16", "VCache": "bf16", "KNew": "bf16", "VNew": "bf16",
                  "Cos": "bf16", "Sin": "bf16", "Out": "bf16", "Lse": "fp32", "Partial": "fp32"}


def compile_decode_for_sm90(template: str, page_size: int, constexprs: dict) -> dict:
    """Compile one of the KV-cache op's kernels (bf16, D 128, GQA 4) for an H100; its shared memory, whether
    the decode's dots run on the tensor cores, and its programmatic-launch instructions."""
    from flashcore.device import smem_limit
    from flashcore.generator import KernelSpec, load

    spec = KernelSpec.make("attn_decode", arch=90, dtype="bf16", head_dim=128, gqa_group=4, page_size=page_size,
                           causal=False, window=False, softcap=False, alibi=False)
    kernel = getattr(load(spec, template), template)
    # tensors are CamelCase parameters; the per-sequence metadata ones are int32
    tensors = {name: f"*{DECODE_TENSORS.get(name, 'i32')}" for name in kernel.arg_names if name[0].isupper()}
    compiled = compile_sm90(kernel, tensors, {"HAS_SEQLENS": True, "HAS_BATCH_IDX": False, "HAS_LEFTPAD": False,
                                              "STORE_LSE": False, **constexprs}, num_warps=4, num_stages=3)
    ptx = compiled.asm["ptx"]
    return {"template": template, "shared": compiled.metadata.shared, "limit": smem_limit(90),
            "mma": "mma.sync" in ptx or "wgmma.mma_async" in ptx, "merge_inline": constexprs.get("MERGE_INLINE"),
            "ticket": any("atom" in line and "acq_rel" in line for line in ptx.splitlines()),
            "pdl": bool(constexprs.get("PDL")), "wait": "griddepcontrol.wait" in ptx,
            "launch_dependents": "griddepcontrol.launch_dependents" in ptx}


# the backward's dK/dV kernel with dq_atomic: bf16 D 128 causal, and D 80 GQA 4 varlen softcap
BWD_SPECS = [dict(head_dim=128, causal=True, gqa_group=1, softcap=False),
             dict(head_dim=80, causal=True, gqa_group=4, softcap=True, varlen=True)]
# the backward's descriptor path (host.TMA_ARCHS): both main kernels, bf16 D 128 causal, in either scheme (the
# atomic one runs no dQ kernel)
BWD_TMA_KERNELS = [("attn_bwd_dkdv", False), ("attn_bwd_dkdv", True), ("attn_bwd_dq", False)]


def compile_bwd_for_sm90(template: str, features: dict) -> dict:
    """Compile a backward kernel with its spec's default config for an H100; its shared memory, whether its dots
    run on wgmma and its tiles come by bulk tensor copy, and the PTX instructions of its atomics."""
    import re

    from flashcore.device import smem_limit
    from flashcore.generator import KernelSpec, load
    from flashcore.ops.attn_bwd.host import default_config

    spec = KernelSpec.make("attn_bwd", **{"arch": 90, "dtype": "bf16", "window": False, "alibi": False, "tma": False,
                                          **features})
    config = default_config(spec)
    kernel = template.removeprefix("attn_bwd_")
    rows = {"Q": config[f"{kernel}.BLOCK_M"], "DOut": config[f"{kernel}.BLOCK_M"], "K": config[f"{kernel}.BLOCK_N"],
            "V": config[f"{kernel}.BLOCK_N"]}
    tensors = {**{name: (f"tensordesc<bf16[1,{r},1,{spec['head_dim']}]>" if spec["tma"] else "*bf16")
                  for name, r in rows.items()},
               **{name: "*bf16" for name in ("DQ", "DK", "DV")},
               **{name: "*fp32" for name in ("Lse", "Delta", "DQAcc")}, "softmax_scale": "fp32",
               **({"CuSeqlensQ": "*i32", "CuSeqlensK": "*i32"} if features.get("varlen") else {})}
    compiled = compile_sm90(getattr(load(spec, template), template), tensors,
                            {"BLOCK_M": config[f"{kernel}.BLOCK_M"], "BLOCK_N": config[f"{kernel}.BLOCK_N"],
                             "SEQ_CHUNK": 32}, config[f"{kernel}.num_warps"], config[f"{kernel}.num_stages"])
    ptx = compiled.asm["ptx"]
    return {"shared": compiled.metadata.shared, "limit": smem_limit(90), "wgmma": "wgmma.mma_async" in ptx,
            "bulk_copies": "cp.async.bulk.tensor" in ptx,
            "atomics": sorted(set(re.findall(r"\b(?:red|atom)\.[a-z0-9.]+", ptx)))}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FLASHCORE_CACHE_DIR"] = str(tmp_path_factory.mktemp("sm90-kernels"))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SPECS)), ids=[
    "-".join(f"{k}={v}" for k, v in f.items()) for f in SPECS])
def test_default_config_compiles_for_sm90(compiled, index):
    result = compiled[index]
    assert "error" not in result, result.get("error")
    # fp16 / bf16 run on wgmma; fp32 asks for exact fp32 products, which the tensor cores do not give
    assert result["wgmma"] == (result["dtype"] != "fp32"), "wgmma for 16-bit inputs, FMA for fp32"
    assert result["shared"] <= result["limit"], f"{result['shared']} bytes of shared memory"
    assert result["bulk_copies"] == result["tma"], "tma specs (and only they) load tiles with bulk tensor copies"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(DECODE_KERNELS)), ids=[
    f"{name}-page{page}{'-merge' if c.get('MERGE_INLINE') else ''}" for name, page, c in DECODE_KERNELS])
def test_kvcache_kernels_compile_for_sm90(compiled, index):
    result = compiled[len(SPECS) + index]
    assert "error" not in result, result.get("error")
    assert result["shared"] <= result["limit"], f"{result['shared']} bytes of shared memory"
    assert result["mma"] == (result["template"] == "attn_decode"), "tensor-core dots in the decode (only)"
    assert result["ticket"] == bool(result["merge_inline"]), "an acq_rel ticket where the last split merges (only)"
    # PDL: the decode lets the combine start early, and the combine waits for the decode before reading
    assert result["launch_dependents"] == (result["pdl"] and result["template"] == "attn_decode")
    assert result["wait"] == (result["pdl"] and result["template"] == "attn_decode_combine")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BWD_SPECS)), ids=["-".join(f"{k}={v}" for k, v in f.items())
                                                              for f in BWD_SPECS])
def test_atomic_dq_kernel_adds_with_fp32_reductions_on_sm90(compiled, index):
    result = compiled[len(SPECS) + len(DECODE_KERNELS) + index]
    assert "error" not in result, result.get("error")
    assert result["shared"] <= result["limit"], f"{result['shared']} bytes of shared memory"
    assert result["wgmma"], "the dK/dV kernel's dots on wgmma"
    # relaxed fp32 adds whose result is unused: `red.global[.gpu].relaxed.add.f32`, the only atomics there
    assert result["atomics"] and all(a.startswith("red.global") and a.endswith(".add.f32")
                                     for a in result["atomics"]), result["atomics"]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BWD_TMA_KERNELS)), ids=[f"{t}-atomic={a}" for t, a in BWD_TMA_KERNELS])
def test_backward_descriptor_path_loads_by_bulk_copy_on_sm90(compiled, index):
    result = compiled[len(SPECS) + len(DECODE_KERNELS) + len(BWD_SPECS) + index]
    assert "error" not in result, result.get("error")
    assert result["shared"] <= result["limit"], f"{result['shared']} bytes of shared memory"
    assert result["wgmma"] and result["bulk_copies"], "dots on wgmma, q / dO / k / v tiles by bulk tensor copy"
    _, atomic = BWD_TMA_KERNELS[index]
    assert bool(result["atomics"]) == atomic, "dq adds in the atomic scheme's dK/dV kernel (only)"


if __name__ == "__main__":
    jobs = [(compile_for_sm90, (features,)) for features in SPECS] + [(compile_decode_for_sm90, kernel)
                                                                       for kernel in DECODE_KERNELS]
    jobs += [(compile_bwd_for_sm90, ("attn_bwd_dkdv", dict(features, dq_atomic=True))) for features in BWD_SPECS]
    jobs += [(compile_bwd_for_sm90, (template, dict(head_dim=128, causal=True, gqa_group=1, softcap=False, tma=True,
                                                    **({"dq_atomic": True} if atomic else {}))))
             for template, atomic in BWD_TMA_KERNELS]
    for compile_one, args in jobs:
        try:
            print(json.dumps(compile_one(*args)), flush=True)
        except Exception as e:   # one broken variant must not hide the others
            print(json.dumps({"error": f"{type(e).__name__}: {str(e)[-2000:]}"}), flush=True)
