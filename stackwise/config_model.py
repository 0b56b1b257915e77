# SPDX-License-Identifier: MIT
"""The model section of the config tree: :class:`AttentionConfig` (MHA / GQA / MLA / kernel attention) and
:class:`ModelConfig`. Defaults are the SRD table's; every field has a one-line docstring (the CLI help and README)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config_base import (ATTENTION_MODES, ATTENTION_TYPES, KERNEL_BACKENDS, KERNEL_FAMILIES, KERNEL_FEATURE_MAPS,
                          MLP_PROJECTIONS, ConfigError, _in_range, _one_of)

@dataclass(kw_only=True)
class AttentionConfig:
    """Which attention every block uses, and the knobs of MLA and random-feature attention."""

    attention_type: str = "standard"
    """Attention kind: standard (MHA), gqa (n_kv_heads shared K/V heads), mla (DeepSeek-V2 latent), kernel (random features)."""
    attention_mode: str = "bidirectional"
    """Default mask when a call does not choose one: bidirectional (layer-wise training, MLM, diffusion) or causal (CLM)."""
    backend: str = "auto"
    """Kernel backend: auto (Triton on CUDA or under TRITON_INTERPRET=1, torch otherwise), triton, torch."""
    mla_rq: int = 1024
    """MLA query low-rank dimension (DeepSeek q_lora_rank); 0 means a full-rank query projection."""
    mla_rkv: int = 512
    """MLA compressed key/value latent dimension (DeepSeek kv_lora_rank)."""
    qk_nope_head_dim: int = 128
    """MLA per-head query/key dimension without RoPE (DeepSeek qk_nope_head_dim)."""
    qk_rope_head_dim: int = 64
    """MLA per-head decoupled RoPE dimension, the key part shared by all heads (DeepSeek qk_rope_head_dim)."""
    v_head_dim: int = 128
    """MLA per-head value dimension (DeepSeek v_head_dim)."""
    kernel_feature_map: str = "softmax"
    """Random-feature map: softmax (positive features estimating exp(q.k*scale)) or trig (random Fourier cos/sin)."""
    kernel_family: str = "gaussian"
    """Distribution of the random projection: gaussian, orthogonal (orthogonal Gaussian blocks), laplacian (Cauchy, trig only)."""
    kernel_n_features: int = 256
    """Number of random features M per head (shared by all heads and layers of one model)."""
    kernel_seed: int = 0
    """Seed of the random-feature matrix; the matrix is regenerated from it, never stored."""
    kernel_trig_temperature: float = 1.0
    """Initial trig-map temperature tau > 0 (learnt per kv head as log tau): weight exp(tau^2 s^2 (cos - 1)); 1 = untempered."""

    def __post_init__(self) -> None:
        _one_of("model.attention.attention_type", self.attention_type, ATTENTION_TYPES)
        _one_of("model.attention.attention_mode", self.attention_mode, ATTENTION_MODES)
        _one_of("model.attention.backend", self.backend, KERNEL_BACKENDS)
        _one_of("model.attention.kernel_feature_map", self.kernel_feature_map, KERNEL_FEATURE_MAPS)
        _one_of("model.attention.kernel_family", self.kernel_family, KERNEL_FAMILIES)
        for name in ("mla_rkv", "qk_nope_head_dim", "v_head_dim", "kernel_n_features"):
            _in_range(f"model.attention.{name}", getattr(self, name), 1)
        _in_range("model.attention.mla_rq", self.mla_rq, 0)
        _in_range("model.attention.kernel_trig_temperature", self.kernel_trig_temperature, 0.0, lo_open=True)
        _in_range("model.attention.qk_rope_head_dim", self.qk_rope_head_dim, 0)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"model.attention.qk_rope_head_dim must be even for RoPE (it rotates pairs), got "
                f"{self.qk_rope_head_dim}; use {self.qk_rope_head_dim + 1}"
            )
        if self.kernel_feature_map == "softmax" and self.kernel_family == "laplacian":
            raise ConfigError(
                "model.attention.kernel_family='laplacian' (Cauchy projections) has no positive softmax-kernel "
                "estimator; use kernel_feature_map='trig' with it, or kernel_family='gaussian'/'orthogonal'"
            )


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the decoder: embeddings, blocks (RMSNorm, RoPE, attention, SwiGLU), tied head."""

    vocab_size: int = 128000
    """Number of token ids, including the mask token."""
    d_model: int = 4096
    """Residual stream width."""
    n_layers: int = 8
    """Number of Transformer blocks."""
    n_heads: int = 32
    """Query heads per block."""
    n_kv_heads: int = 8
    """Key/value heads for attention_type gqa (n_heads must be a multiple); standard uses n_heads."""
    d_ff: int = 14336
    """SwiGLU hidden width."""
    dropout: float = 0.0
    """Dropout on attention and MLP outputs during training."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    use_rope: bool = True
    """Rotary position embeddings on queries and keys (MLA: on its decoupled RoPE part)."""
    rope_theta: float = 500000.0
    """RoPE base frequency (Llama 3 uses 500000)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    max_seq_len: int = 8192
    """Longest sequence the RoPE tables are built for."""
    init_std: float = 0.02
    """Std of the normal init of trained weights."""
    residual_init_depth: int = 0
    """Depth L the residual-branch output projections (attention o_proj, MLP down) are initialised for: std
    init_std / sqrt(2 L); 0 means model.n_layers (GPT-2 style). Layer-wise stages train one layer at a time:
    1 gives each block the init of a 1-layer model (issue 13: with the 4-layer scaling a stage-0 layer sat on
    the unigram plateau for all of a 400-step stage)."""
    init_seed: int = 0
    """Seed of weight init and of the frozen SwiGLU projections (regenerated from (init_seed, layer, name))."""
    frozen_mlp: list[str] = field(default_factory=lambda: ["gate", "up"])
    """SwiGLU projections that stay frozen random (never trained, stored as a seed): any of gate, up, down."""
    frozen_mlp_seeded: bool = True
    """Frozen MLP projections are regenerated from the seed (true) or stored as tensors (false: imported weights)."""
    mask_token_id: int = -1
    """Id of the mask token; -1 means the last id (vocab_size - 1)."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention settings."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            _in_range(f"model.{name}", getattr(self, name), 1)
        _in_range("model.dropout", self.dropout, 0.0, 1.0)
        _in_range("model.norm_eps", self.norm_eps, 0.0, lo_open=True)
        _in_range("model.rope_theta", self.rope_theta, 0.0, lo_open=True)
        _in_range("model.init_std", self.init_std, 0.0, lo_open=True)
        _in_range("model.residual_init_depth", self.residual_init_depth, 0)
        for p in self.frozen_mlp:
            _one_of("model.frozen_mlp[]", p, MLP_PROJECTIONS)
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, min(self.d_model, 256) + 1) if self.d_model % h == 0]
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}); "
                f"choose n_heads in {divisors[-8:]}"
            )
        if self.attention.attention_type == "gqa" and self.n_heads % self.n_kv_heads:
            choices = [h for h in range(1, self.n_heads + 1) if self.n_heads % h == 0]
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads}); "
                f"choose n_kv_heads in {choices}"
            )
        if self.use_rope and self.attention.attention_type != "mla" and self.head_dim % 2:
            raise ConfigError(
                f"head dim d_model/n_heads = {self.head_dim} must be even when model.use_rope is true (RoPE "
                f"rotates pairs); change model.d_model or model.n_heads, or set model.use_rope=false"
            )
        if not (-1 <= self.mask_token_id < self.vocab_size):
            raise ConfigError(
                f"model.mask_token_id must be -1 (last id) or in [0, {self.vocab_size}), got {self.mask_token_id}"
            )

    @property
    def init_depth(self) -> int:
        """The depth residual output projections are initialised for (``residual_init_depth`` or n_layers)."""
        return self.residual_init_depth or self.n_layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """K/V heads actually used: n_kv_heads for gqa, n_heads otherwise."""
        return self.n_kv_heads if self.attention.attention_type == "gqa" else self.n_heads

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1 if self.mask_token_id == -1 else self.mask_token_id
