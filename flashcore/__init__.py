"""FlashCore: attention kernels generated from templates and tuned per GPU."""
from .interface import flash_attn_func
from .kvcache import flash_attn_with_kvcache
from .paged_cache import PagedKVCache
from .value_errors import check_errors

__version__ = "0.1.0"
__all__ = ["flash_attn_func", "flash_attn_with_kvcache", "PagedKVCache", "check_errors", "__version__"]
