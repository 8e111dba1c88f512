"""A toy op registered from tests/ (FLASHCORE_OPS=toy_op): its own template, call description, bucket axes,
tuning declaration and bench suite, with no line of flashcore's tools, dispatch or tuning DB edited for it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from flashcore import dispatch, ops
from flashcore.generator import KernelSpec, add_template_dir, load
from flashcore.tools.bench_suite import Case, Prepared, Suite
from flashcore.tuning import CheckResult, Problem, Tuning

add_template_dir(Path(__file__).resolve().parent / "toy_templates")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ToyCall:
    n: int
    dtype: str = "fp32"

    def describe(self) -> str:
        return f"n={self.n} {self.dtype}"


def spec_of(call: ToyCall, cc: int) -> KernelSpec:
    return KernelSpec.make("toy_scale", arch=cc, dtype=call.dtype)


OP = ops.register(ops.Op(
    name="toy_scale", kernels=("toy_scale",), call_type=ToyCall,
    axes=(ops.Axis("n", ("n",)),),
    tunables=(ops.Param("BLOCK", (16, 32, 64, 128)), ops.Param("num_warps", (1, 2, 4))),
    default_config=lambda spec: {"BLOCK": 16, "num_warps": 1},
    spec_of=spec_of,
    tuning="toy_op:TUNING",
    bench="toy_op:SUITES",
    metric_unit="GB/s",
    cli_defaults={"n": 100},
))


def toy_scale(x: torch.Tensor, scale: float, config: dict | None = None) -> torch.Tensor:
    """x (N,) contiguous fp16 / fp32 -> x * scale, through dispatch's config."""
    call = ToyCall(x.numel(), {v: k for k, v in DTYPES.items()}[x.dtype])
    spec = spec_of(call, 0)
    config = config or dispatch.config_for(OP, spec, OP.bucket_of(call))
    out = torch.empty_like(x)
    load(spec).toy_scale[(triton.cdiv(x.numel(), config["BLOCK"]),)](X=x, Out=out, n=x.numel(), scale=scale, **config)
    return out


def make_problem(spec: KernelSpec, call: ToyCall, device: str) -> Problem:
    x = torch.randn(call.n, dtype=DTYPES[call.dtype], device=device)

    def runner(config):
        return lambda i: toy_scale(x, 2.0, config)

    def check(config):
        fresh = torch.randn(call.n + 3, dtype=DTYPES[call.dtype], device=device)
        err = (toy_scale(fresh, 2.0, config).double() - fresh.double() * 2).abs().max().item()
        return CheckResult(ok=err <= 1e-6, error=err, tolerance=1e-6)

    return Problem(spec=spec, call=call, bucket=OP.bucket_of(call), work=2.0 * x.numel() * x.element_size(),
                   metric_unit="GB/s", n_sets=1, runner=runner, check=check, device=device)


TUNING = Tuning(
    op=OP, plan_axes={"dtype": ("fp32",)},
    search_space=lambda spec, bucket: {"BLOCK": [16, 32, 64], "num_warps": [1]},
    plan_buckets=lambda spec, interpret: [(64,), (256,)],
    call_for=lambda features, coords: ToyCall(n=coords[0], dtype=features.get("dtype", "fp32")),
    make_problem=make_problem,
    heldout_axes=("n",),
)


class ToyScaleSuite(Suite):
    """GB/s of x * scale against torch's own elementwise multiply."""
    name = "scale"
    title = "toy_scale: out = x * scale"
    unit = "GB/s"
    labels = {"flashcore": "FlashCore", "torch": "torch"}
    ratios = {"vs_torch": "torch"}

    def cases(self, args):
        return [Case(call=ToyCall(n), columns=(("n", str(n)),), label=f"n={n}", work=8.0 * n) for n in (1 << 20, 1 << 24)]

    def setup(self, case, impls):
        x = torch.randn(case.call.n, device="cuda")
        return Prepared({"flashcore": lambda: toy_scale(x, 2.0), "torch": lambda: x * 2.0})


SUITES = [ToyScaleSuite()]
