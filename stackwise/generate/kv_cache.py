# SPDX-License-Identifier: MIT
"""Per-layer decoding caches for ``generate_clm``.

- standard / gqa: ``KVCache``, keys and values per KV head: 2 * n_kv_heads * head_dim values per token and layer.
- mla: ``LatentKVCache`` (default), the normalised KV latent and the shared RoPE key: mla_rkv + qk_rope_head_dim
  values per token and layer, decoded with the up-projections absorbed (``MultiLatentAttention._absorbed``);
  ``mla_cache="expanded"`` keeps ``KVCache`` with per-head keys and values, n_heads * (d_nope + d_rope + d_v).
- kernel (random-feature) attention: no cache; ``generate_clm`` recomputes the prefix.

``stackwise.plan_kv`` plans the same bytes from a config without building anything.
"""

from __future__ import annotations

from ..blocks import KVCache, LatentKVCache

MLA_CACHES = ("latent", "expanded")


def make_caches(model, mla_cache: str = "latent") -> list[KVCache | LatentKVCache]:
    """One empty cache per layer of ``model`` (a ``StackWiseLM``) for its attention type."""
    if mla_cache not in MLA_CACHES:
        raise ValueError(f"mla_cache must be one of {list(MLA_CACHES)}, got {mla_cache!r}")
    a = model.cfg.attention
    if a.attention_type == "kernel":
        raise NotImplementedError("kernel (random-feature) attention has no KV cache; decode by recomputing")
    latent = a.attention_type == "mla" and mla_cache == "latent"
    return [LatentKVCache() if latent else KVCache() for _ in range(model.cfg.n_layers)]


def cache_bytes(caches) -> int:
    """Bytes held by a list of per-layer caches (every row and position)."""
    return sum(c.nbytes for c in caches)
