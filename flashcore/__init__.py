"""FlashCore: attention kernels generated from templates and tuned per GPU."""
from .interface import flash_attn_func

__version__ = "0.1.0"
__all__ = ["flash_attn_func", "__version__"]
