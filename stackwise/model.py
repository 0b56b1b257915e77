# SPDX-License-Identifier: MIT
"""StackWiseLM: token embeddings, a stack of Transformer blocks, final RMSNorm and a (tied) output head.

Layer-wise training uses the pieces separately: ``embed`` (ids -> h), ``run_layers(h, start, end)`` and
``head`` (h -> logits); ``forward`` chains them. The attention mask is chosen per call
(``attention_mode="bidirectional" | "causal"``, default from the config), so one set of weights serves
diffusion / MLM training and causal generation.

References: Llama (Touvron et al. 2023) for the block; weight tying (Press & Wolf 2017).
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import KVCache, RMSNorm, RotaryEmbedding, TransformerBlock
from .blocks._init import seeded_normal_
from .config import ATTENTION_MODES, ModelConfig


class StackWiseLM(nn.Module):
    """Decoder Transformer. ``StackWiseLM(cfg)(input_ids [B, T]) -> logits [B, T, vocab_size]``.

    Args:
        cfg: the model section of the config.
        layers: which block indices to build (default all); layer-wise stages build only what they need,
            and missing blocks are ``None`` in ``self.layers``.
    """

    def __init__(self, cfg: ModelConfig, layers: list[int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        wanted = set(range(cfg.n_layers) if layers is None else layers)
        bad = sorted(i for i in wanted if not 0 <= i < cfg.n_layers)
        if bad:
            raise ValueError(f"layers {bad} are out of range for model.n_layers={cfg.n_layers}")
        self.layers = nn.ModuleList(
            [TransformerBlock(cfg, i) if i in wanted else nn.Identity() for i in range(cfg.n_layers)]
        )
        self.built_layers = sorted(wanted)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = self._build_rope(cfg)
        self.reset_parameters()

    @staticmethod
    def _build_rope(cfg: ModelConfig) -> RotaryEmbedding | None:
        if not cfg.use_rope:
            return None
        a = cfg.attention
        if a.attention_type == "mla":
            return RotaryEmbedding(a.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta) if a.qk_rope_head_dim else None
        return RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)

    def reset_parameters(self) -> None:
        seeded_normal_(self.tok_embeddings.weight, self.cfg.init_std, self.cfg.init_seed, "tok_embeddings")
        if not self.cfg.tie_embeddings:
            seeded_normal_(self.output.weight, self.cfg.init_std, self.cfg.init_seed, "output")
        self.norm.reset_parameters()

    @property
    def mask_id(self) -> int:
        return self.cfg.mask_id

    def _causal(self, attention_mode: str | None) -> bool:
        mode = attention_mode or self.cfg.attention.attention_mode
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {list(ATTENTION_MODES)}, got {mode!r}")
        return mode == "causal"

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (int) -> h [B, T, C]. Raises ValueError on ids outside [0, vocab_size)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise TypeError(f"input_ids must be an int64/int32 tensor [B, T], got {got}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(
                    f"token ids must be in [0, model.vocab_size={self.cfg.vocab_size}), got min {lo}, max {hi}; "
                    f"the tokenizer and model.vocab_size disagree"
                )
        return self.tok_embeddings(input_ids)

    def run_layers(
        self,
        h: torch.Tensor,
        start: int = 0,
        end: int | None = None,
        attention_mode: str | None = None,
        caches: list[KVCache] | None = None,
        start_pos: int | torch.Tensor = 0,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start .. end-1`` on h [B, T, C]; every block in the range must be built.

        For left-padded batches (``stackwise.generate``) ``start_pos`` may be per-row RoPE positions [B, T]
        (int64) and ``key_mask`` [B, S] bool marks the real keys (S = cached + new positions).
        """
        end = self.cfg.n_layers if end is None else end
        if not 0 <= start <= end <= self.cfg.n_layers:
            raise ValueError(f"layer range [{start}, {end}) is invalid for model.n_layers={self.cfg.n_layers}")
        causal = self._causal(attention_mode)
        for i in range(start, end):
            block = self.layers[i]
            if not isinstance(block, TransformerBlock):
                raise RuntimeError(f"layer {i} was not built in this model (built: {self.built_layers})")
            cache = caches[i] if caches is not None else None
            kw = {} if key_mask is None else {"key_mask": key_mask}
            h = block(h, self.rope, causal=causal, cache=cache, start_pos=start_pos, **kw)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, C] -> logits [B, T, vocab_size] (final RMSNorm, then the output projection)."""
        return self.output(self.norm(h))

    def forward(self, input_ids: torch.Tensor, *, attention_mode: str | None = None) -> torch.Tensor:
        return self.head(self.run_layers(self.embed(input_ids), attention_mode=attention_mode))

    def seeded_parameter_names(self) -> list[str]:
        """Names of parameters stored in checkpoints as a seed (the frozen SwiGLU projections)."""
        names = []
        for i, block in enumerate(self.layers):
            if isinstance(block, TransformerBlock):
                names += [f"layers.{i}.mlp.{n}" for n in block.mlp.seeded_names()]
        return names

    def regenerate_frozen(self) -> None:
        for block in self.layers:
            if isinstance(block, TransformerBlock):
                block.mlp.regenerate_frozen()

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameter count (tied weights once); ZeRO-3-aware via ``ds_numel``."""
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel())
        return total
