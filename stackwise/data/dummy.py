# SPDX-License-Identifier: MIT
"""Seeded dummy token data with learnable structure, for smoke tests and the tiny preset.

Pure uniform ids carry no signal, so a falling loss would prove nothing. Here every sequence is a walk on
a seeded random Markov chain: each token has ``branching`` possible successors. A model that learns the
chain lowers its masked-token loss well below ln(vocab_size), from either side of a masked position.
"""

from __future__ import annotations

import torch


class DummyTokens(torch.utils.data.Dataset):
    """``n`` sequences of ``seq_len`` ids in [0, vocab_size), never equal to ``mask_id``.

    Item i is regenerated from (seed, i), so the dataset is identical on every rank and every run. The successor
    table comes from ``table_seed`` (default: ``seed``), so a validation set with another ``seed`` and the training
    ``table_seed`` walks the same chain with different sequences.
    """

    def __init__(self, vocab_size: int, seq_len: int, n: int, *, seed: int = 0, mask_id: int | None = None,
                 branching: int = 4, table_seed: int | None = None):
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 for dummy data, got {vocab_size}")
        self.vocab_size, self.seq_len, self.n, self.seed = vocab_size, seq_len, n, seed
        self.mask_id = vocab_size - 1 if mask_id is None else mask_id
        g = torch.Generator().manual_seed(seed if table_seed is None else table_seed)
        usable = torch.tensor([t for t in range(vocab_size) if t != self.mask_id])
        self.usable = usable
        # successor table: [V, branching] ids drawn from the usable tokens
        self.succ = usable[torch.randint(0, len(usable), (vocab_size, branching), generator=g)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} dummy sequences")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        ids = torch.empty(self.seq_len, dtype=torch.long)
        ids[0] = self.usable[torch.randint(0, len(self.usable), (1,), generator=g)]
        choice = torch.randint(0, self.succ.shape[1], (self.seq_len,), generator=g)
        for t in range(1, self.seq_len):
            ids[t] = self.succ[ids[t - 1], choice[t]]
        return ids
