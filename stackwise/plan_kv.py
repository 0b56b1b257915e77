# SPDX-License-Identifier: MIT
"""KV-cache planner: decoding-cache bytes per token (or per sequence) for every attention type.

Values per token per layer, the layouts ``stackwise.generate.kv_cache`` allocates (tests compare the two):

- standard (MHA): keys and values of every head, 2 * n_heads * head_dim.
- gqa: keys and values of the shared K/V heads, 2 * n_kv_heads * head_dim.
- mla, latent cache (``generate_clm``'s default): the normalised KV latent and the RoPE key shared by all heads,
  mla_rkv + qk_rope_head_dim (DeepSeek-V2's kv_lora_rank + qk_rope_head_dim; 512 + 64 = 576 at the SRD's dims).
- mla, expanded cache (``mla_cache="expanded"``): per-head keys and values, n_heads * (d_nope + d_rope + d_v)
  (32 * (192 + 128) = 10,240 at the SRD's dims).
- kernel (random-feature attention): no per-token cache. A recurrent decoder keeps, per sequence and layer and
  K/V head, the state sum_j phi(k_j) [v_j, 1] of M' x (head_dim + 1) values (M' = n_features, 2 x n_features for
  the trig map) plus, for the softmax map, the running maximum that stabilises the features: the state bytes
  are per sequence and do not grow with its length. ``generate_clm`` does not decode this way yet: it
  recomputes the prefix and holds no cache.

Bytes = values x dtype bytes x n_layers; a batch of B sequences of T tokens needs
``B * T * bytes_per_token + B * state_bytes_per_sequence`` (:meth:`KVCachePlan.bytes_for`).
"""

from __future__ import annotations

import dataclasses

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CACHE_KINDS = ("mha", "gqa", "mla_latent", "mla_expanded", "kernel_state")


@dataclasses.dataclass
class KVCachePlan:
    """Decoding-cache size of one model for one cache kind."""

    cache: str
    """One of mha, gqa, mla_latent, mla_expanded, kernel_state."""
    values_per_token_per_layer: int
    """Cached values per token per layer (0 for kernel_state: its state does not grow with the sequence)."""
    state_values_per_sequence_per_layer: int
    """Values per sequence per layer whatever its length (kernel_state only, else 0)."""
    dtype: str
    """Dtype the cache is held in."""
    n_layers: int
    """Layers that each keep a cache."""
    formula: str
    """How values_per_token_per_layer (or the state) is computed, with this model's numbers."""

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes per token, all layers."""
        return self.values_per_token_per_layer * DTYPE_BYTES[self.dtype] * self.n_layers

    @property
    def state_bytes_per_sequence(self) -> int:
        """Recurrent-state bytes per sequence, all layers (kernel_state only)."""
        return self.state_values_per_sequence_per_layer * DTYPE_BYTES[self.dtype] * self.n_layers

    def to_dict(self) -> dict:
        """The fields plus bytes_per_token and state_bytes_per_sequence (for JSON)."""
        return dict(dataclasses.asdict(self), bytes_per_token=self.bytes_per_token,
                    state_bytes_per_sequence=self.state_bytes_per_sequence)

    def bytes_for(self, batch: int, seq_len: int) -> int:
        """Cache bytes of ``batch`` sequences of ``seq_len`` tokens."""
        return batch * seq_len * self.bytes_per_token + batch * self.state_bytes_per_sequence


def _model_cfg(cfg):
    m = getattr(cfg, "model", cfg)
    if not hasattr(m, "attention") or not hasattr(m, "n_heads"):
        raise TypeError(f"cfg must be a StackWiseConfig or its ModelConfig, got {type(cfg).__name__}")
    return m


def plan_kv_cache(cfg, *, dtype: str = "bfloat16", cache: str | None = None) -> KVCachePlan:
    """Plan the decoding cache of ``cfg``'s model.

    Args:
        cfg: a ``StackWiseConfig`` or its ``model`` section.
        dtype: float32, bfloat16 or float16 (the model's dtype at generation time).
        cache: one of ``CACHE_KINDS``; default the kind ``generate_clm`` uses for the model's attention type
            (mha for standard, gqa, mla_latent for mla, kernel_state for kernel). Any kind can be asked for, to
            compare what another attention type would cache at the same dimensions.

    Raises:
        ValueError: an unknown dtype or cache kind. TypeError: cfg is not a config.
    """
    m = _model_cfg(cfg)
    a = m.attention
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {list(DTYPE_BYTES)}, got {dtype!r}; e.g. dtype='bfloat16'")
    default = {"standard": "mha", "gqa": "gqa", "mla": "mla_latent", "kernel": "kernel_state"}[a.attention_type]
    cache = default if cache is None else cache
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {list(CACHE_KINDS)} or None, got {cache!r}")
    H, D, state = m.n_heads, m.head_dim, 0
    if cache == "mha":
        per_tok, formula = 2 * H * D, f"2 x n_heads x head_dim = 2 x {H} x {D}"
    elif cache == "gqa":
        per_tok, formula = 2 * m.n_kv_heads * D, f"2 x n_kv_heads x head_dim = 2 x {m.n_kv_heads} x {D}"
    elif cache == "mla_latent":
        per_tok = a.mla_rkv + a.qk_rope_head_dim
        formula = f"mla_rkv + qk_rope_head_dim = {a.mla_rkv} + {a.qk_rope_head_dim}"
    elif cache == "mla_expanded":
        dqk = a.qk_nope_head_dim + a.qk_rope_head_dim
        per_tok = H * (dqk + a.v_head_dim)
        formula = f"n_heads x (qk_nope + qk_rope + v_head_dim) = {H} x ({dqk} + {a.v_head_dim})"
    else:
        hkv = m.kv_heads
        mp = a.kernel_n_features * (2 if a.kernel_feature_map == "trig" else 1)
        stab = hkv if a.kernel_feature_map == "softmax" else 0
        per_tok, state = 0, hkv * mp * (D + 1) + stab
        formula = (f"per sequence: kv_heads x M' x (head_dim + 1){' + kv_heads' if stab else ''} = "
                   f"{hkv} x {mp} x {D + 1}{f' + {hkv}' if stab else ''} (not a per-token cache)")
    return KVCachePlan(cache=cache, values_per_token_per_layer=per_tok, state_values_per_sequence_per_layer=state,
                       dtype=dtype, n_layers=m.n_layers, formula=formula)


def plan_kv_caches(cfg, *, dtype: str = "bfloat16") -> list[KVCachePlan]:
    """Every cache kind at ``cfg``'s dimensions (mha, gqa, mla_latent, mla_expanded, kernel_state)."""
    return [plan_kv_cache(cfg, dtype=dtype, cache=c) for c in CACHE_KINDS]


def kv_cache_table(plans: list[KVCachePlan], *, batch: int = 1, seq_len: int = 4096) -> str:
    """Plain-text table: values per token per layer, bytes per token (all layers), bytes for batch x seq_len."""
    rows = [("cache", "values/token/layer", "bytes/token", f"bytes B={batch} T={seq_len}", "formula")]
    for p in plans:
        per_tok = str(p.values_per_token_per_layer) if p.values_per_token_per_layer else "-"
        by_tok = f"{p.bytes_per_token:,}" if p.values_per_token_per_layer else f"{p.state_bytes_per_sequence:,}/seq"
        rows.append((p.cache, per_tok, by_tok, f"{p.bytes_for(batch, seq_len) / 2**20:,.1f} MiB", p.formula))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)
