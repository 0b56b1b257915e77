# SPDX-License-Identifier: MIT
"""Typed configuration tree for StackWise: dataclasses, YAML load/save, dotted CLI overrides, validation.

Precedence is dataclass defaults < YAML file < CLI overrides (``--section.key=value``). The dataclass
defaults are the SRD table (an 8-layer, d_model 4096 model), so a preset names only what differs.
Every field has a one-line docstring under it; :func:`field_docs` reads them so the same text serves as
CLI help, YAML comments and the README's field table.

Errors follow "what, constraint, got, fix": an unknown key suggests the nearest valid one, a wrong
type names the expected type, an impossible combination names both fields.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ._fs import atomic_write

ATTENTION_TYPES = ("standard", "gqa", "mla", "kernel")
ATTENTION_MODES = ("bidirectional", "causal")
FINE_TUNE_MODES = ("clm", "mlm", "diffusion")
KERNEL_FEATURE_MAPS = ("softmax", "trig")
KERNEL_FAMILIES = ("gaussian", "orthogonal", "laplacian")
KERNEL_BACKENDS = ("auto", "triton", "torch")
MLP_PROJECTIONS = ("gate", "up", "down")
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("single", "deepspeed", "fsdp")


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names the field and the fix."""


def _one_of(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}{hint}")


def _in_range(name: str, value: float, lo: float | None = None, hi: float | None = None, *, lo_open=False) -> None:
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be <= {hi}, got {value}")


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

    def __post_init__(self) -> None:
        _one_of("model.attention.attention_type", self.attention_type, ATTENTION_TYPES)
        _one_of("model.attention.attention_mode", self.attention_mode, ATTENTION_MODES)
        _one_of("model.attention.backend", self.backend, KERNEL_BACKENDS)
        _one_of("model.attention.kernel_feature_map", self.kernel_feature_map, KERNEL_FEATURE_MAPS)
        _one_of("model.attention.kernel_family", self.kernel_family, KERNEL_FAMILIES)
        for name in ("mla_rkv", "qk_nope_head_dim", "v_head_dim", "kernel_n_features"):
            _in_range(f"model.attention.{name}", getattr(self, name), 1)
        _in_range("model.attention.mla_rq", self.mla_rq, 0)
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
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """K/V heads actually used: n_kv_heads for gqa, n_heads otherwise."""
        return self.n_kv_heads if self.attention.attention_type == "gqa" else self.n_heads

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1 if self.mask_token_id == -1 else self.mask_token_id


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Masking policy of layer-wise training and of fine-tuning."""

    mask_fraction_min: float = 0.15
    """Lowest per-sequence mask rate of the diffusion objective."""
    mask_fraction_max: float = 0.90
    """Highest per-sequence mask rate of the diffusion objective."""
    loss_weighting: str = "none"
    """Diffusion loss weighting: none, or inv_t (each sequence weighted by 1/mask rate, the ELBO weighting)."""
    mlm_rate: float = 0.15
    """Fraction of positions supervised by the MLM policy (of which 80% mask, 10% random, 10% kept)."""
    fine_tune_mode: str = "clm"
    """Fine-tuning objective after fusion: clm (causal next token), mlm (BERT-style) or diffusion."""
    mask_draws: int = 2
    """Masked views per training sequence, drawn once when the activation cache is built and reused by every stage."""
    recon_weight: float = 0.0
    """Diffusion loss also scores the unmasked input tokens, each at this weight of a masked token (0 = off)."""
    stage_mask_schedule: str = "none"
    """Per-stage mask-rate band of stages: none (off), depth_as_time (early stages high rates) or curriculum."""

    def __post_init__(self) -> None:
        _in_range("objective.mask_fraction_min", self.mask_fraction_min, 0.0, 1.0, lo_open=True)
        _in_range("objective.mask_fraction_max", self.mask_fraction_max, 0.0, 1.0, lo_open=True)
        if self.mask_fraction_min > self.mask_fraction_max:
            raise ConfigError(
                f"objective.mask_fraction_min ({self.mask_fraction_min}) must be <= objective.mask_fraction_max "
                f"({self.mask_fraction_max}); swap them or set them equal for a fixed rate"
            )
        _in_range("objective.mlm_rate", self.mlm_rate, 0.0, 1.0, lo_open=True)
        _one_of("objective.loss_weighting", self.loss_weighting, ("none", "inv_t"))
        _one_of("objective.fine_tune_mode", self.fine_tune_mode, FINE_TUNE_MODES)
        _in_range("objective.mask_draws", self.mask_draws, 1)
        _in_range("objective.recon_weight", self.recon_weight, 0.0)
        _one_of("objective.stage_mask_schedule", self.stage_mask_schedule, ("none", "depth_as_time", "curriculum"))


@dataclass(kw_only=True)
class DataConfig:
    """Where tokens come from and how they are cut into sequences."""

    dummy: bool = True
    """Use seeded random token ids (smoke tests) instead of a corpus."""
    dummy_sequences: int = 256
    """Number of random sequences in the dummy training set."""
    seq_len: int = 512
    """Tokens per training sequence."""
    text_files: list[str] = field(default_factory=list)
    """Plain-text files (or globs) to tokenize when dummy is false."""
    corpus: str = ""
    """Bundled corpus to use instead of text_files: '' (none), shakespeare, kjv, or shakespeare+kjv."""
    tokenizer: str = ""
    """Path of a tokenizers JSON to use; empty trains a byte-level BPE of vocab_size on the corpus."""
    data_dir: str = "data"
    """Directory for the tokenizer and token shards built from text."""
    val_fraction: float = 0.05
    """Fraction of the corpus held out for evaluation."""
    max_train_sequences: int = 0
    """Use at most this many training sequences for the masked views (0 = all); bounds cache size and build time."""
    seed: int = 0
    """Seed of the dummy data and of data order."""

    def __post_init__(self) -> None:
        _in_range("data.seq_len", self.seq_len, 2)
        _in_range("data.dummy_sequences", self.dummy_sequences, 1)
        _in_range("data.val_fraction", self.val_fraction, 0.0, 0.5)
        _one_of("data.corpus", self.corpus, ("", "shakespeare", "kjv", "shakespeare+kjv"))
        if not self.dummy:
            if self.corpus and self.text_files:
                raise ConfigError(
                    f"data.corpus ({self.corpus!r}) and data.text_files ({len(self.text_files)} entries) are both set; "
                    f"choose one (set data.corpus='' to use your files)"
                )
            if not self.corpus and not self.text_files:
                raise ConfigError(
                    "data.dummy is false but neither data.corpus nor data.text_files is set; e.g. "
                    "--data.corpus=shakespeare or --data.text_files=[my.txt], or --data.dummy=true"
                )
            if self.val_fraction == 0:
                raise ConfigError(
                    "data.val_fraction=0 leaves no held-out split, which per-stage evaluation needs; use e.g. 0.05"
                )
        _in_range("data.max_train_sequences", self.max_train_sequences, 0)


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation of one stage, of fusion fine-tuning, and of the run as a whole."""

    lr: float = 1e-4
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = 10
    """Linear warm-up steps at the start of each stage."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    batch_size: int = 4
    """Micro-batch size per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all processes; 0 means batch_size * grad_accum * world_size."""
    max_steps: int = 200
    """Optimizer steps per stage."""
    seed: int = 0
    """Seed of mask draws and dropout."""
    dtype: str = "float32"
    """Compute dtype: float32, bfloat16 or float16 (float16 needs a GPU)."""
    log_interval: int = 10
    """Steps between progress lines and metrics.jsonl records."""
    out_dir: str = "runs/default"
    """Run directory (config, layer checkpoints, activation cache, fused model, metrics)."""
    layers_per_stage: int = 1
    """Layers trained together per stage (1 = layer-wise; K > 1 = block-wise stages of K layers)."""
    stage_trains_head: bool = True
    """Stages after the first also train the head (final norm + output matrix, the tied embeddings)."""
    stage_zero_init: bool = False
    """Stages after the first start their layers' output projections (attention o_proj, MLP down) at zero (off)."""
    stage_lr_decay: float = 1.0
    """Peak lr of the i-th stage is lr * stage_lr_decay**i; 1.0 (off) gives every stage train.lr."""
    # issue 13 (depth recipes, stackwise/engine/recipes.py)
    stage_init_from: str = "none"
    """A new stage's layers start from trained ones: "none" (off, fresh draw), "previous" (the previous stage's
    layers, layer k-1 -> k), "middle" (the middle of the trained stack 0..k-1). Stored weights only: the seeded
    frozen MLP projections stay the new layer's own. Single backend; exclusive with stage_zero_init."""
    stage_steps: list[int] = field(default_factory=list)
    """Optimizer steps of each stage in order (one entry per stage), e.g. [700, 300, 300, 300] to give early
    stages more of the same total; empty (off) gives every stage train.max_steps. Each stage's lr schedule
    (warm-up + cosine) spans its own steps."""
    stage_overlap: bool = False
    """Stage k also trains layer k-1 (input: layer k-2's cache), whose file and cache it rewrites (off)."""
    overlap_lr_scale: float = 0.5
    """With stage_overlap, layer k-1's learning rate as a multiple of the stage's scheduled lr."""
    checkpoint_interval: int = 50
    """Steps between resumable stage checkpoints (weights + optimizer + RNG); 0 saves only at the end."""
    resume: bool = False
    """Resume an interrupted stage or fine-tune from its last resumable checkpoint."""
    eval_sequences: int = 64
    """Held-out sequences used for per-stage and fine-tuning evaluation."""
    finetune_steps: int = 100
    """Optimizer steps of fine_tune (CLM / MLM / diffusion) on the fused model."""
    finetune_lr: float = 0.0
    """Learning rate of fine-tuning; 0 means train.lr."""
    checkpoint: str = ""
    """Model checkpoint that fine_tune / generate start from; empty picks the run's newest (finetuned_*, then fused)."""

    compile: bool = False
    """Wrap each trained block in torch.compile (single and fsdp backends; refused on deepspeed)."""

    tensorboard: bool = False
    """Also write the logged scalars to <out_dir>/tensorboard (needs the tensorboard package)."""

    def __post_init__(self) -> None:
        _in_range("train.lr", self.lr, 0.0, lo_open=True)
        _in_range("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        for name in ("batch_size", "grad_accum", "max_steps", "log_interval", "layers_per_stage", "eval_sequences",
                     "finetune_steps"):
            _in_range(f"train.{name}", getattr(self, name), 1)
        _in_range("train.finetune_lr", self.finetune_lr, 0.0)
        for name in ("warmup_steps", "global_batch_size", "checkpoint_interval"):
            _in_range(f"train.{name}", getattr(self, name), 0)
        _in_range("train.weight_decay", self.weight_decay, 0.0)
        _in_range("train.beta1", self.beta1, 0.0, 1.0)
        _in_range("train.beta2", self.beta2, 0.0, 1.0)
        _in_range("train.grad_clip", self.grad_clip, 0.0)
        _in_range("train.stage_lr_decay", self.stage_lr_decay, 0.0, lo_open=True)
        _one_of("train.stage_init_from", self.stage_init_from, ("none", "previous", "middle"))
        for i, n in enumerate(self.stage_steps):
            _in_range(f"train.stage_steps[{i}]", n, 1)
        _in_range("train.overlap_lr_scale", self.overlap_lr_scale, 0.0, lo_open=True)
        if self.stage_init_from != "none" and self.stage_zero_init:
            raise ConfigError(f"train.stage_init_from={self.stage_init_from!r} and train.stage_zero_init=true both "
                              f"set a new layer's start; choose one")
        _one_of("train.dtype", self.dtype, DTYPES)
        if not self.out_dir:
            raise ConfigError("train.out_dir must be a directory path, got ''; e.g. runs/my_run")


@dataclass(kw_only=True)
class EngineConfig:
    """Where and how stages run: backend, device, distributed and offload settings."""

    backend: str = "single"
    """single (one process, CPU or one GPU), deepspeed (ZeRO-3) or fsdp (PyTorch FSDP2)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, or cuda."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage for the deepspeed backend."""
    offload_optimizer: bool = False
    """Keep optimizer state on CPU (DeepSpeed) to save device memory."""
    offload_params: bool = False
    """Keep partitioned parameters on CPU (DeepSpeed ZeRO-3)."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    cache_dtype: str = "float32"
    """Dtype of cached layer outputs on disk: float32, bfloat16 or float16."""
    cache_keep: str = "all"
    """Keep every layer's activation cache (all), or delete layer k-1's once layer k's is written (last)."""
    cache_shard_sequences: int = 64
    """Masked views per activation shard (shards are streamed and verified one at a time)."""
    cache: str = "disk"
    """Inputs of stage k: disk (read layer k-1's cached outputs) or recompute (rerun frozen layers 0..k-1 from the views)."""
    deepspeed_config: str = ""
    """DeepSpeed JSON file whose keys override the dict built from this config (deepspeed backend); empty for none."""
    offload_nvme_path: str = ""
    """Directory on a local NVMe for ZeRO-Infinity offload; empty offloads to CPU memory (when offload is on)."""
    optimizer: str = "auto"
    """Optimizer under deepspeed: torch (torch AdamW, no C++ build), deepspeed (DeepSpeed AdamW), auto (deepspeed on CUDA)."""
    dist_timeout_s: int = 600
    """Seconds a collective may wait for the other ranks before the job fails instead of hanging."""

    def __post_init__(self) -> None:
        _one_of("engine.backend", self.backend, BACKENDS)
        _one_of("engine.device", self.device, ("auto", "cpu", "cuda"))
        _one_of("engine.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _one_of("engine.cache_dtype", self.cache_dtype, DTYPES)
        _one_of("engine.cache_keep", self.cache_keep, ("all", "last"))
        _in_range("engine.cache_shard_sequences", self.cache_shard_sequences, 1)
        _one_of("engine.cache", self.cache, ("disk", "recompute"))
        _one_of("engine.optimizer", self.optimizer, ("auto", "torch", "deepspeed"))
        _in_range("engine.dist_timeout_s", self.dist_timeout_s, 1)
        if self.deepspeed_config and not self.deepspeed_config.endswith(".json"):
            raise ConfigError(f"engine.deepspeed_config must name a .json file, got {self.deepspeed_config!r}")
        if self.offload_nvme_path and not (self.offload_params or self.offload_optimizer):
            raise ConfigError(
                f"engine.offload_nvme_path ({self.offload_nvme_path!r}) has no effect without offload; set "
                f"engine.offload_params=true and/or engine.offload_optimizer=true, or clear the path"
            )


@dataclass(kw_only=True)
class StackWiseConfig:
    """The whole run: model, objective, data, training and engine."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Masking policy."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Execution engine."""

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) must be <= model.max_seq_len ({self.model.max_seq_len}); "
                f"raise model.max_seq_len or shorten data.seq_len"
            )
        if self.model.n_layers % self.train.layers_per_stage:
            raise ConfigError(
                f"train.layers_per_stage ({self.train.layers_per_stage}) must divide model.n_layers "
                f"({self.model.n_layers}); choose one of "
                f"{[k for k in range(1, self.model.n_layers + 1) if self.model.n_layers % k == 0]}"
            )
        n_stages = self.model.n_layers // self.train.layers_per_stage
        if self.train.stage_steps and len(self.train.stage_steps) != n_stages:  # issue 13
            raise ConfigError(f"train.stage_steps needs one entry per stage ({n_stages} = model.n_layers / "
                              f"train.layers_per_stage), got {len(self.train.stage_steps)}: {self.train.stage_steps}")
        if self.train.dtype == "float16" and self.engine.device == "cpu":
            raise ConfigError("train.dtype='float16' needs a GPU; on engine.device='cpu' use float32 or bfloat16")

    def check_world(self, world_size: int) -> None:
        """Check the settings that depend on the launch (number of processes)."""
        t = self.train
        per_step = t.batch_size * t.grad_accum * world_size
        if t.global_batch_size and t.global_batch_size != per_step:
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must equal train.batch_size ({t.batch_size}) * "
                f"train.grad_accum ({t.grad_accum}) * world size ({world_size}) = {per_step}; set "
                f"train.global_batch_size=0 to derive it, or change grad_accum"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(name, value, arm)
            except ConfigError:
                continue
        raise ConfigError(f"{name} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r} ({type(value).__name__}); e.g. [a, b]")
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name} must be null, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; users type it that way
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{name} must be {tp.__name__}, got boolean {value!r}")
    if tp in (int, float, str) and not isinstance(value, tp):
        raise ConfigError(f"{name} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with a suggestion."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys to values, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + near[0]!r}?" if near else ""
            raise ConfigError(f"unknown config key {full!r}{hint} (valid keys: {', '.join(names)})")
        tp = hints[key]
        kwargs[key] = _build(tp, value, full) if _is_dataclass_type(tp) else _coerce(full, value, tp)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """CLI values are YAML scalars: 3, 1e-4, true, null, [gate, up], or a bare string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply_override(tree: dict, item: str) -> None:
    body = item[2:] if item.startswith("--") else item
    if "=" not in body:
        raise ConfigError(f"override {item!r} must look like --section.key=value, e.g. --train.lr=3e-4")
    key, text = body.split("=", 1)
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key segment; use --section.key=value")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = _parse_value(text)


def config_from_dict(data: dict | None, overrides: list[str] | None = None) -> StackWiseConfig:
    """Build and validate a config from a nested dict plus dotted overrides."""
    tree = _deepcopy_dict(data or {})
    for item in overrides or []:
        _apply_override(tree, item)
    return _build(StackWiseConfig, tree, "")


def _deepcopy_dict(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy_dict(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy_dict(v) for v in d]
    return d


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> StackWiseConfig:
    """Read a YAML preset (or only defaults when ``path`` is None), apply overrides, validate.

    Args:
        path: YAML file; None for the dataclass defaults.
        overrides: ``["--train.lr=3e-4", "model.n_layers=4", ...]``.

    Raises:
        ConfigError: missing/empty/unparsable file, unknown key, wrong type or invalid value.
    """
    data: Any = {}
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            presets = sorted(p for p in os.listdir(_presets_dir()) if p.endswith(".yaml")) if _presets_dir() else []
            raise ConfigError(f"config file {path!r} does not exist; presets in configs/: {', '.join(presets)}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if data is None:
            raise ConfigError(f"config file {path!r} is empty, which is likely a mistake; put at least one section in it")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        where = f" (in {path})" if path else ""
        raise ConfigError(f"{e}{where}") from None


def _presets_dir() -> str | None:
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return here if os.path.isdir(here) else None


def save_config(cfg: StackWiseConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file + rename)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_to_yaml(cfg))

    atomic_write(path, write)


def config_to_yaml(cfg: StackWiseConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of dataclass ``cls`` (attribute docstrings, read from source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())  # one line: CLI help, README table
    return docs


def iter_fields(cls: type = StackWiseConfig, prefix: str = ""):
    """Yield ``(dotted_name, type_name, default, doc)`` for every leaf field, depth first."""
    docs = field_docs(cls)
    hints = _hints(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            yield from iter_fields(tp, name + ".")
        else:
            yield name, _type_name(tp), getattr(default_obj, f.name), docs.get(f.name, "")


def _main() -> None:
    """``python -m stackwise.config [FILE] [overrides]``: print the resolved config, or the field table."""
    import sys

    args = sys.argv[1:]
    if args and args[0] in ("-h", "--help", "--fields"):
        for name, tp, default, doc in iter_fields():
            print(f"| `{name}` | {tp} | `{default}` | {doc} |")
        return
    path = args[0] if args and not args[0].startswith("-") and "=" not in args[0] else None
    rest = args[1:] if path else args
    try:
        print(config_to_yaml(load_config(path, rest)), end="")
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    _main()
