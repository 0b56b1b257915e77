# SPDX-License-Identifier: MIT
"""Multi-head latent attention, the DeepSeek-V2 formulation (DeepSeek-AI 2024, arXiv:2405.04434, sec. 2.1).

Per token x [C]:
- query: low rank when ``mla_rq > 0``: q = W_qb RMSNorm(W_qa x) [H, d_nope + d_rope] (else q = W_q x);
- key/value: a compressed latent c = RMSNorm(first ``mla_rkv`` channels of W_kva x) and a decoupled RoPE
  key k_rope [d_rope] (the last channels of W_kva x) shared by all heads; W_kvb c gives per head
  k_nope [d_nope] and v [d_v];
- q = [q_nope, RoPE(q_rope)], k = [k_nope, RoPE(k_rope)] (k_rope broadcast to every head);
- softmax attention with scale (d_nope + d_rope) ** -0.5 and value dim d_v, then W_o [H d_v -> C].

Parameter names match Hugging Face ``DeepseekV2Attention`` (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``). RoPE here is rotate-half;
DeepSeek-V2 checkpoints use the interleaved layout and are permuted on import.
Decoding caches: a ``LatentKVCache`` keeps only [c, RoPE(k_rope)] per token (``mla_rkv + qk_rope_head_dim``
values, what MLA exists to cache) and decodes in DeepSeek-V2's absorbed form: W_UK (the k_nope rows of
``kv_b_proj``) is folded into the query, q_lat = q_nope W_UK [H, mla_rkv], so every head scores the shared
latent directly (multi-query attention over [c, k_rope]); the attention output stays in latent space until
W_UV (the v rows) and ``o_proj``. A ``KVCache`` keeps the expanded per-head keys and values
(H * (d_nope + d_rope + d_v) values per token), kept for comparison.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ._init import seeded_normal_
from .attention import KVCache, allowed_keys, cached_attention, rotate
from .norm import RMSNorm


class LatentKVCache:
    """MLA's decoding cache for one layer: kv [B, S, mla_rkv + qk_rope_head_dim] = [c, RoPE(k_rope)] per token,
    c the normalised KV latent (DeepSeek's compressed_kv) and k_rope the key part shared by all heads."""

    def __init__(self) -> None:
        self.kv: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.kv is None else self.kv.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held (all rows and positions)."""
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()

    def append(self, kv: torch.Tensor) -> torch.Tensor:
        self.kv = kv if self.kv is None else torch.cat([self.kv, kv], dim=1)
        return self.kv


class MultiLatentAttention(nn.Module):
    """DeepSeek-V2 MLA: x [B, T, C] -> [B, T, C]. ``rope`` must rotate ``qk_rope_head_dim`` channels."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        a = cfg.attention
        self.layer_idx, self.init_seed, self.init_std = layer_idx, cfg.init_seed, cfg.init_std
        self.n_layers = cfg.init_depth  # the depth its o_proj is initialised for
        self.n_heads, self.backend = cfg.n_heads, a.backend
        self.d_nope, self.d_rope, self.d_v, self.rkv = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.mla_rkv
        self.q_head_dim = self.d_nope + self.d_rope
        self.scale = self.q_head_dim**-0.5
        C, H = cfg.d_model, cfg.n_heads
        self.rq = a.mla_rq
        if self.rq > 0:
            self.q_a_proj = nn.Linear(C, self.rq, bias=False)
            self.q_a_layernorm = RMSNorm(self.rq, cfg.norm_eps)
            self.q_b_proj = nn.Linear(self.rq, H * self.q_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(C, H * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, self.rkv + self.d_rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rkv, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(self.rkv, H * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(H * self.d_v, C, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, mod in self.named_children():
            if isinstance(mod, nn.Linear):
                std = self.init_std / (2 * self.n_layers) ** 0.5 if name == "o_proj" else self.init_std
                seeded_normal_(mod.weight, std, self.init_seed, self.layer_idx, f"attn.{name}")
            elif isinstance(mod, RMSNorm):
                mod.reset_parameters()

    def forward(self, x, rope=None, *, causal: bool, cache: KVCache | LatentKVCache | None = None, start_pos=0,
                key_mask=None):
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.rq > 0 else self.q_proj(x)
        q = q.view(B, T, H, self.q_head_dim).transpose(1, 2)  # [B, H, T, d_nope + d_rope]
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        kv_a = self.kv_a_proj_with_mqa(x)  # [B, T, rkv + d_rope]
        latent, k_rope = kv_a.split([self.rkv, self.d_rope], dim=-1)
        c = self.kv_a_layernorm(latent)  # [B, T, rkv]
        k_rope = k_rope.unsqueeze(1)  # [B, 1, T, d_rope], shared by all heads
        if rope is not None and self.d_rope:
            q_rope, k_rope = rotate(rope, q_rope, start_pos), rotate(rope, k_rope, start_pos)
        if isinstance(cache, LatentKVCache):
            had = cache.length
            kv_all = cache.append(torch.cat([c, k_rope.squeeze(1)], dim=-1))  # [B, S, rkv + d_rope]
            if had:  # decoding: absorbed form on the cached latent
                o = self._absorbed(q_nope, q_rope, kv_all, causal=causal, key_mask=key_mask)
                return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.d_v))
            cache = None  # prefill: the expanded form below (compute-bound; equal to the uncached forward)
        kv = self.kv_b_proj(c).view(B, T, H, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)  # [B, H, T, d_nope], [B, H, T, d_v]
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, T, self.d_rope)], dim=-1)
        o = cached_attention(q, k, v.contiguous(), causal=causal, cache=cache, scale=self.scale, backend=self.backend,
                             key_mask=key_mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.d_v))

    def _absorbed(self, q_nope, q_rope, kv, *, causal: bool, key_mask=None) -> torch.Tensor:
        """q_nope [B, H, T, d_nope], q_rope [B, H, T, d_rope] (rotated), kv [B, S, rkv + d_rope] -> o [B, H, T, d_v].

        The T queries are the last T of the S cached positions. Scores q.k = (q_nope W_UK) . c + q_rope . k_rope.
        """
        B, H, T, _ = q_nope.shape
        S = kv.shape[1]
        w = self.kv_b_proj.weight.view(H, self.d_nope + self.d_v, self.rkv)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope :]  # [H, d_nope, rkv], [H, d_v, rkv]
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # [B, H, T, rkv]
        q_all = torch.cat([q_lat, q_rope], dim=-1).reshape(B, H * T, self.rkv + self.d_rope)
        scores = torch.matmul(q_all, kv.transpose(1, 2)).view(B, H, T, S).float() * self.scale
        if key_mask is not None or (causal and T > 1):
            mask = torch.ones(B, S, dtype=torch.bool, device=kv.device) if key_mask is None else key_mask
            scores = scores.masked_fill(~allowed_keys(mask.to(kv.device), T, causal=causal), float("-inf"))
        p = torch.softmax(scores, dim=-1).to(kv.dtype)
        o_lat = torch.matmul(p.view(B, H * T, S), kv[..., : self.rkv]).view(B, H, T, self.rkv)
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)  # [B, H, T, d_v]
