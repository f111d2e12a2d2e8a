"""Prompt token ids for requests: deterministic per request id, inside the vocabulary, no special tokens."""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np
from transformers import PretrainedConfig

from revati.workloads import Request

# Every engine serves this request before t0, unobserved: lazy initialisation (allocators, kernels, the
# engine's worker) happens there rather than inside the first measured request.
WARMUP_REQUEST = Request("revati-warmup", 0.0, 8, 2)


def special_token_ids(config: PretrainedConfig) -> frozenset[int]:
    """The bos / eos / pad ids a model config names (eos may be a list)."""
    ids = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        values = value if isinstance(value, list | tuple) else [value]
        ids.update(int(v) for v in values if v is not None and v >= 0)
    return frozenset(ids)


@lru_cache(maxsize=8)
def _allowed_ids(vocab_size: int, special: frozenset[int]) -> np.ndarray:
    return np.setdiff1d(np.arange(vocab_size), np.fromiter(special, dtype=np.int64, count=len(special)))


def prompt_ids(request: Request, config: PretrainedConfig) -> list[int]:
    """`request.prompt_tokens` ids drawn with a seed taken from the request id, avoiding bos / eos / pad.

    >>> from transformers import LlamaConfig
    >>> ids = prompt_ids(Request("r1", 0.0, 5, 3), LlamaConfig(vocab_size=512))
    >>> len(ids), {1, 2}.isdisjoint(ids), max(ids) < 512  # Llama: bos 1, eos 2
    (5, True, True)
    """
    text_config = config.get_text_config()
    allowed = _allowed_ids(text_config.vocab_size, special_token_ids(text_config))
    rng = np.random.default_rng(zlib.crc32(request.request_id.encode()))
    return rng.choice(allowed, size=request.prompt_tokens).tolist()
