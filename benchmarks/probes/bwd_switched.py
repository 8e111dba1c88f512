"""flashcore-bench with the backward's gated paths switched on for this card, as main runs them once a switch lists
it: the A/B of a switch is the `bwd` bench without it and with it, in one call on one card.

    atomic   host.ATOMIC_DQ_ARCHS: deterministic=False (flash-attn's default) runs atomic dQ
    tma      host.TMA_ARCHS: the dense backward loads q, dO, k, v tiles through tensor descriptors

    python benchmarks/probes/bwd_switched.py atomic,tma --op attn_bwd --suite backward ...   (GPU; the rest of the
                                                                        arguments are flashcore-bench's)
"""
from __future__ import annotations

import sys

from flashcore.device import arch
from flashcore.ops.attn_bwd import host
from flashcore.tools.bench import main

SWITCHES = {"atomic": "ATOMIC_DQ_ARCHS", "tma": "TMA_ARCHS"}


if __name__ == "__main__":
    for name in sys.argv[1].split(","):
        setattr(host, SWITCHES[name], frozenset({arch()}))
    sys.exit(main(sys.argv[2:]))
