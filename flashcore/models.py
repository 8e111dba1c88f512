"""The attention shapes of widely used open models: what `flashcore-tune --plan models` tunes (each op says which
calls a model makes of it: Tuning.model_calls).

Head configurations from the models' published configs (config.json). Window: the sliding window of the model's
local layers (Mistral 7B v0.1, Gemma 2 / 3); softcap: Gemma 2's attention-logit cap. A model whose layers differ
(Gemma's global and local layers) contributes both kinds.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelHeads:
    name: str
    heads_q: int
    heads_kv: int
    head_dim: int
    window: int = 0            # keys on the left a local layer's rows see (0: every layer global)
    softcap: float = 0.0
    all_local: bool = False    # every layer windowed (Mistral 7B v0.1), else local and global layers alternate

    def layers(self) -> list["ModelHeads"]:
        """The attention kinds of the model's layers: global ones, and local (windowed) ones where it has them."""
        if not self.window or self.all_local:
            return [self]
        return [replace(self, window=0), self]


MODELS = (
    ModelHeads("Llama 3.1 8B", 32, 8, 128),
    ModelHeads("Llama 3.1 70B", 64, 8, 128),
    ModelHeads("Mistral 7B v0.1", 32, 8, 128, window=4096, all_local=True),
    ModelHeads("Mixtral 8x7B", 32, 8, 128),
    ModelHeads("Qwen2.5 7B", 28, 4, 128),
    ModelHeads("Qwen2.5 72B", 64, 8, 128),
    ModelHeads("Qwen3 8B", 32, 8, 128),
    ModelHeads("Gemma 2 9B", 16, 8, 256, window=4096, softcap=50.0),
    ModelHeads("Gemma 2 27B", 32, 16, 128, window=4096, softcap=50.0),
    ModelHeads("Gemma 3 12B", 16, 8, 256, window=1024),
    ModelHeads("Phi-3 mini", 32, 32, 96),
)

# (batch, tokens per sequence) of prefill and training calls: a short prompt to long-context batches
PREFILL_SHAPES = ((1, 512), (8, 512), (64, 512), (1, 2048), (8, 2048), (32, 2048), (1, 8192), (8, 8192),
                  (1, 32768), (4, 32768))
# (batch, cached tokens per sequence) of decode steps: one request to a full serving batch, short to long contexts
DECODE_SHAPES = ((1, 1024), (8, 1024), (32, 1024), (128, 1024), (1, 8192), (8, 8192), (32, 8192), (1, 32768),
                 (8, 32768))
DECODE_PAGES = (0, 16)         # a contiguous cache, and vLLM's default block size
# a server's prefill batches: fresh prompts packed (tokens in the batch, longest prompt), and chunks against a
# cached prefix in pages of VARLEN_PAGE tokens (sequences, chunk, keys = prefix + chunk)
VARLEN_PACKED = ((4096, 1024), (16384, 4096), (65536, 4096))
VARLEN_CHUNKED = ((1, 512, 4096), (8, 512, 16384), (1, 2048, 65536), (8, 2048, 16384))
VARLEN_PAGE = 16
# (batch, tokens per sequence) of training steps (forward + backward)
TRAINING_SHAPES = ((16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384))

# What a window or softcap spec is tuned with (their values are not in the spec): Mistral 7B's and Gemma 2 / 3's
# local window, at most half the keys of the tuned call so that it masks there; Gemma 2's attention softcap
WINDOW = 4096
SOFTCAP = 50.0


def tuned_scores(causal: bool, window: bool, softcap: bool, keys: int) -> dict:
    """flash-attn's window_size and softcap for a spec with these features, tuned on a call of `keys` keys per
    sequence: a window of min(WINDOW, keys / 2) on the left (and on the right unless causal: causal's right side is
    0), softcap SOFTCAP; (-1, -1) / (-1, 0) and 0.0 without them. Every op's tuning problem runs and checks these."""
    left = min(WINDOW, max(1, keys // 2)) if window else -1
    return dict(window_size=(left, 0 if causal else left), softcap=SOFTCAP if softcap else 0.0)
