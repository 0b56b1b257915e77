# SPDX-License-Identifier: MIT
"""Typed configuration tree for StackWise: dataclasses, YAML load/save, dotted CLI overrides, validation.

Precedence is dataclass defaults < YAML file < CLI overrides (``--section.key=value``). The dataclass
defaults are the SRD table (an 8-layer, d_model 4096 model), so a preset names only what differs.
Every field has a one-line docstring under it; :func:`field_docs` reads them so the same text serves as
CLI help, YAML comments and the README's field table.

Layout: ``config_base`` (enums, ConfigError, validators), ``config_model`` (model and attention sections), this
module (the other sections and :class:`StackWiseConfig`), ``_config_load`` (YAML, overrides, building, field docs);
every public name is importable from here.

Errors follow "what, constraint, got, fix": an unknown key suggests the nearest valid one, a wrong
type names the expected type, an impossible combination names both fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config_base import (ATTENTION_MODES, ATTENTION_TYPES, BACKENDS, DTYPES, FINE_TUNE_MODES,  # noqa: F401
                          KERNEL_BACKENDS, KERNEL_FAMILIES, KERNEL_FEATURE_MAPS, MLP_PROJECTIONS, ConfigError,
                          _in_range, _one_of)
from .config_model import AttentionConfig, ModelConfig  # noqa: F401

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
    suffix_mask_share: float = 0.0
    """Share of diffusion training views masked on the window's last positions (what the left-to-right sampler
    meets: all text before known, all after masked) instead of uniformly chosen ones, at the same rates; held-out
    views stay uniform. 0 = off. At the demo size 0.25 made every figure worse, its samples too (RESULTS.md)."""

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
        _in_range("objective.suffix_mask_share", self.suffix_mask_share, 0.0, 1.0)


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
    """Files (or globs) to tokenize when dummy is false: UTF-8 text, or .jsonl/.ndjson; .gz/.bz2/.xz/.zst read too."""
    jsonl_field: str = "text"
    """Name of the field holding the text in each record of a .jsonl/.ndjson file of data.text_files."""
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
        if not self.jsonl_field.strip():
            raise ConfigError(f"data.jsonl_field must name the JSONL field holding the text, got {self.jsonl_field!r};"
                              f" e.g. --data.jsonl_field=text")


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
    frozen MLP projections stay the new layer's own. Every backend (the copy is made before the backend wraps the
    stage model; FSDP2 tested); exclusive with stage_zero_init. With
    objective.recon_weight 0.1, "previous" raised the share of end-to-end depth the stages keep from 0.39 to 0.65
    (8 layers, 3 seeds); on the masked-only objective it was worse (benchmarks/RESULTS.md, session 8)."""
    stage_steps: list[int] = field(default_factory=list)
    """Optimizer steps of each stage in order (one entry per stage), e.g. [700, 300, 300, 300] to give early
    stages more of the same total; empty (off) gives every stage train.max_steps. Each stage's lr schedule
    (warm-up + cosine) spans its own steps."""
    stage_overlap: bool = True
    """Stage k also retrains the ``overlap_layers`` layers before it (input: the cache of the layer before those),
    whose files it rewrites. On by default (issue 13: with a window at 1x lr, 4 and 8 layers trained layer-wise
    match or beat end-to-end training at equal tokens; plain stages, off, kept almost none of depth's gain)."""
    overlap_lr_scale: float = 1.0
    """With stage_overlap, the retrained earlier layers' learning rate as a multiple of the stage's scheduled lr."""
    overlap_layers: int = 5
    """With stage_overlap, how many earlier layers a stage retrains (default 5: a stage holds at most 6 layers,
    whatever the depth; session 11 measured 5 better than session 6's 3 at 8 layers on every seed and budget run:
    it kept 0.98 (4x tokens) and 1.24 (2x) of what end-to-end depth buys, 3 kept 0.76 and 0.90; 3-seed means):
    1 = layer k-1 (input: layer k-2's cache);
    w = layers k-w..k-1 (input: layer k-w-1's cache); >= model.n_layers = all of them (progressive growth, the
    last stage then holds the whole model, at end-to-end memory: benchmarks/RESULTS.md, sessions 10-11)."""
    stage_residual_init: bool = True
    """Stages build their layers with the residual output projections (attention o_proj, MLP down) initialised for
    the depth of one stage (train.layers_per_stage) instead of model.n_layers, unless model.residual_init_depth
    is set. Off: the n_layers scaling, with which a 4-layer run's stage-0 layer sat on the unigram plateau for all
    of a 400-step stage (issue 13)."""
    global_head: int = 0
    """A trainable top carried through every stage (SegProp-style global head): this many extra blocks between
    each stage's layers and the output head, trained in every stage with the head (0 = off). Stored with the head
    in the last layer file of each stage; ``global_head_fusion`` decides what the fused model does with them."""
    global_head_fusion: str = "keep"
    """"keep": the fused model has model.n_layers + global_head blocks (the top blocks last); "drop": the fused
    model has model.n_layers blocks and the head reads the last stage layer directly (a joint fine-tune after
    fusion then has to re-adapt the head)."""
    stage_data: str = "repeat"
    """Which batches a stage reads: "repeat" (every stage reads the views from the start of the same order) or
    "continue" (stage i starts where stage i-1 stopped, so with enough views each stage sees new data and the
    stages together read the same batches, in the same order, as one end-to-end run of their total steps)."""
    checkpoint_interval: int = 50
    """Steps between resumable stage checkpoints (weights + optimizer + RNG); 0 saves only at the end."""
    resume: bool = False
    """Resume an interrupted stage or fine-tune from its last resumable checkpoint."""
    eval_sequences: int = 64
    """Held-out sequences used for per-stage and fine-tuning evaluation, spread evenly over the held-out split."""
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
        _one_of("train.stage_data", self.stage_data, ("repeat", "continue"))
        _in_range("train.overlap_layers", self.overlap_layers, 1)
        _in_range("train.global_head", self.global_head, 0)
        _one_of("train.global_head_fusion", self.global_head_fusion, ("keep", "drop"))
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
    """Keep every written activation cache (all), or delete a stage's input cache once the stage has written its
    own (last)."""
    cache_shard_sequences: int = 64
    """Masked views per activation shard (shards are streamed and verified one at a time)."""
    cache_rows: str = "read"
    """Train rows a stage caches: read (only the shards of the batches later stages read) or all (every view)."""
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
        _one_of("engine.cache_rows", self.cache_rows, ("read", "all"))
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


# loading lives in its own module; imported last because it needs StackWiseConfig from this one
from ._config_load import (_main, config_from_dict, config_to_yaml, field_docs, iter_fields,  # noqa: E402,F401
                           load_config, save_config)

if __name__ == "__main__":
    _main()
