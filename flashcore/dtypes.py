"""The dtypes FlashCore kernels take, by the names specs, calls and tuning records use."""
from __future__ import annotations

import torch

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
