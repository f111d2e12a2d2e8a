"""The token oracle: values nobody has, synthesized so the serving code keeps going.

Index-producing ops (argmax, multinomial, top-k indices) on tensors without values get valid token ids
that avoid EOS and the other special tokens; the engine's own length limits (max_new_tokens, the
workload's output lengths) decide when a request ends. Every synthesized value is counted.
"""

from __future__ import annotations

from collections import Counter

import torch


class TokenOracle:
    """Deterministic pseudo-random token ids in [0, vocab) that avoid `special` ids."""

    def __init__(self, special: set[int] | None = None, seed: int = 0):
        self.special = set(special or ())
        self.synthesized: Counter[str] = Counter()
        self._gen = torch.Generator().manual_seed(seed)

    def token_ids(self, shape: tuple[int, ...], vocab: int, what: str) -> torch.Tensor:
        """Token ids of `shape` for an op reducing over a vocabulary of size `vocab`."""
        n = int(torch.Size(shape).numel())
        self.synthesized[what] += n
        ids = torch.randint(0, max(vocab, 1), (n,), generator=self._gen)
        avoid = [s for s in self.special if 0 <= s < vocab]
        if avoid and vocab > len(avoid) + 1:
            bad = torch.isin(ids, torch.tensor(avoid))
            while bool(bad.any()):
                ids[bad] = torch.randint(0, vocab, (int(bad.sum()),), generator=self._gen)
                bad = torch.isin(ids, torch.tensor(avoid))
        return ids.reshape(shape)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
        """Contents nobody computed, read by the host: zeros, counted."""
        self.synthesized[what] += int(torch.Size(shape).numel())
        return torch.zeros(shape, dtype=dtype)
