# SPDX-License-Identifier: MIT
"""Memory and FLOP planner: per-device bytes of one layer-wise stage vs end-to-end ZeRO-3 / FSDP training.

Parameter counts come from building ``StackWiseLM(cfg.model, layers=[k])`` on the meta device, so the plan
follows the code (a 70B-shaped layer plans in milliseconds). Assumptions, stated the way DeepSpeed's
``estimate_zero3_model_states_mem_needs`` and the ZeRO paper (Rajbhandari et al. 2020, K = 12) state them:

- Mixed precision (bf16/fp16): params and grads in the compute dtype (2 B), AdamW keeps fp32 master weights
  plus two fp32 moments (12 B/param); fp32 compute: params, grads, two moments (4 + 4 + 8 B/param).
- ZeRO: stage >= 1 shards optimizer state over ``world_size``, >= 2 grads, 3 params (trainable and frozen);
  ZeRO-3 with world_size > 1 adds a gather buffer of the two largest modules in the compute dtype.
  ``offload_optimizer`` moves optimizer state (incl. master weights) to host; ``offload_params`` (ZeRO-3)
  moves partitioned params to host. Host bytes are reported in ``Plan.host``.
- Frozen weights (``model.frozen_mlp``, the seeded SwiGLU gate/up by default) get no grads and no optimizer
  state. A stage holds only layer k (+ final norm and the tied head); earlier layers are not resident
  because its input comes from the activation cache.
- Activations: bytes of the tensors autograd saves for backward, per token, with s = compute-dtype bytes,
  f = 4 (RMSNorm, RoPE-free norms and softmax statistics run in fp32), C = d_model, F = d_ff, H = heads::

      common     = f*4C (norm inputs/outputs x, y1, h, y2) + s*C (attn-norm output) + s*C_o (attn output
                   copy, C_o = H*Dv) + s*4F (SwiGLU g, silu(g), up, product) + s*C if gate/up train
      std / gqa  = s*(2C + 2C_kv) + f*H            flash (Triton on CUDA: K/V not repeated; q, k, v, o, lse)
                   s*4C + f*H                      torch SDPA (K/V repeated to H heads before the op)
      mla        = s*H*(2Dqk + 2Dv) + f*H          flash / CUDA SDPA
                   f*H*(2Dqk + Dv + T)             CPU SDPA falls back to the math path (Dqk != Dv): T x T
                   + f*2rq + s*rq (query LoRA) + f*2r_kv + s*r_kv (latent; +f*d_rope in fp32)
      kernel     = f*(4H*D + 6H*M' + 3H) per token + f*B*H*(M'*Dv + M' + 1) per sequence (M' = M, or 2M
                   for the trig map); bidirectional torch path, the one layer-wise training uses

  The first layer of a stage saves no copy of its input (the cached h needs no grad): minus f*C.
  With activation checkpointing each layer keeps only its input (s*C) and one layer is recomputed at a time.
  These formulas are checked against ``torch.autograd.graph.saved_tensors_hooks`` in tests/test_plan.py.
- Logits/loss: ``masked_loss`` upcasts logits; log-softmax output, its grad and the logits grad coexist in
  backward: 3 * B*T*V * 4 bytes (4 on CPU, whose log_softmax backward materialises exp(output)). Cache read buffer: ``prefetch_shards`` shards of B*T*C in the cache dtype.
- Peak (``Plan.total``): static parts (params, frozen, optimizer state, cache buffer) plus the largest of
  three phases that do not overlap: loss (all activations + logits buffers), backward (activations + head
  grad + one layer's backward transient, or all grads + one layer's activations), optimizer step (all grads
  + the step's temporaries: 2x the largest trainable tensor in fp32 for torch's single-tensor AdamW on CPU,
  0 for fused/DeepSpeed Adam on CUDA). ``Plan.parts_sum`` is the sum with no reuse.
- FLOPs per token: 6 * trainable matmul params + 4 * frozen matmul params (forward + input gradient, no
  weight gradient) + attention 12*T*H*D (MLA: 6*T*H*(Dqk+Dv); halved when causal). Caching a layer's
  outputs costs 2 * its matmul params + 4*T*H*D per token. Embedding lookups are free.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from .config import DTYPES, StackWiseConfig
from .plan_activations import (  # noqa: F401 (layer_activation_bytes is public here)
    DTYPE_BYTES, _attn_flops, _attn_impl, _count, _meta_layer, layer_activation_bytes)
from .plan_kv import KVCachePlan, kv_cache_table, plan_kv_cache, plan_kv_caches  # noqa: F401 (re-exported)

log = logging.getLogger("stackwise")

DEVICES = ("cuda", "cpu")
GB = 1e9
GIB = 2**30


@dataclasses.dataclass
class Plan:
    """Per-device bytes by part, the peak estimate, disk and FLOPs of one training setup."""

    kind: str
    """'stage' (one layer-wise stage) or 'end_to_end' (the whole model, ZeRO-3 / FSDP)."""
    parts: dict[str, int]
    """Device bytes by part name."""
    total: int
    """Estimated peak device bytes (static parts + the largest non-overlapping phase)."""
    host: dict[str, int]
    """Host (CPU) bytes of offloaded parts."""
    params: dict[str, int]
    """Parameter counts: trainable, frozen, total (not sharded)."""
    flops_per_token: float
    """Training FLOPs per token (forward + backward)."""
    disk_per_boundary_per_btok: int
    """Activation-cache bytes per layer boundary per 1e9 tokens."""
    settings: dict
    """The arguments the plan was made with."""
    extra: dict = dataclasses.field(default_factory=dict)
    """Other derived numbers (cache FLOPs per token, phases)."""

    @property
    def parts_sum(self) -> int:
        return sum(self.parts.values())

    @property
    def training_state(self) -> int:
        """Params + frozen params + grads + optimizer state, device and host (what must exist somewhere)."""
        keys = ("trainable_params", "frozen_params", "grads", "optimizer_state")
        return sum(self.parts.get(k, 0) for k in keys) + sum(self.host.get(k, 0) for k in keys)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.update(parts_sum=self.parts_sum, training_state=self.training_state)
        return json.dumps(d, sort_keys=False)

    def table(self, unit: float = GIB, unit_name: str = "GiB") -> str:
        """A plain-text table of the parts, the sum and the peak."""
        rows = [(k, v) for k, v in self.parts.items()] + [(f"host: {k}", v) for k, v in self.host.items() if v]
        w = max(len(k) for k, _ in rows + [("peak (overlap-aware) total", 0)])
        lines = [f"{self.kind}: {self.settings.get('summary', '')}", f"{'part':<{w}}  {unit_name:>10}"]
        lines += [f"{k:<{w}}  {v / unit:>10.3f}" for k, v in rows]
        lines += [f"{'sum of parts (no reuse)':<{w}}  {self.parts_sum / unit:>10.3f}"]
        lines += [f"{'reuse (-) / transients (+)':<{w}}  {(self.total - self.parts_sum) / unit:>10.3f}"]
        lines += [f"{'peak (overlap-aware) total':<{w}}  {self.total / unit:>10.3f}"]
        p = self.params
        lines += [f"params: trainable {p['trainable']:,}  frozen {p['frozen']:,}  | "
                  f"train FLOPs/token {self.flops_per_token:.3e}  | "
                  f"cache disk/boundary/1e9 tok {self.disk_per_boundary_per_btok / GB:.1f} GB"]
        return "\n".join(lines)


def _check(world_size, zero_stage, dtype, micro_batch, seq_len, device, cache_dtype, prefetch_shards):
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}; pass the number of processes")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be one of [0, 1, 2, 3], got {zero_stage!r}")
    for name, v in (("dtype", dtype), ("cache_dtype", cache_dtype)):
        if v not in DTYPES:
            raise ValueError(f"{name} must be one of {list(DTYPES)}, got {v!r}; e.g. {name}='bfloat16'")
    for name, v in (("micro_batch", micro_batch), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1 (or None for the config's value), got {v!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if not isinstance(prefetch_shards, int) or prefetch_shards < 0:
        raise ValueError(f"prefetch_shards must be an int >= 0, got {prefetch_shards!r}")


def _plan(cfg, kind, *, world_size=1, zero_stage=3, offload_optimizer=False, offload_params=False,
          dtype="bfloat16", micro_batch=None, seq_len=None, activation_checkpointing=False, train_head=True,
          layer=None, device="cuda", cache_dtype=None, prefetch_shards=2, keep_frozen_mlp=False) -> Plan:
    if not isinstance(cfg, StackWiseConfig):
        raise TypeError(f"cfg must be a StackWiseConfig (stackwise.config.load_config), got {type(cfg).__name__}")
    m = cfg.model
    B = cfg.train.batch_size if micro_batch is None else micro_batch
    T = cfg.data.seq_len if seq_len is None else seq_len
    cache_dtype = dtype if cache_dtype is None else cache_dtype
    _check(world_size, zero_stage, dtype, B, T, device, cache_dtype, prefetch_shards)
    # a stage runs its layer, the train.stage_overlap window before it and the train.global_head blocks (issue 13);
    # the default layer is the first whose stage holds a full window (the stage peak)
    w = cfg.train.overlap_layers if cfg.train.stage_overlap else 0
    k = min(max(1, w), m.n_layers - 1) if layer is None else layer
    if not 0 <= k < m.n_layers:
        raise ValueError(f"layer must be in [0, model.n_layers={m.n_layers}), got {layer!r}")
    s = DTYPE_BYTES[dtype]
    model = _meta_layer(cfg, k)
    block = model.layers[k]
    lt, lf, lt_mm, lf_mm = _count(block.parameters())
    head_n = model.output.weight.numel() + model.norm.weight.numel()
    emb_n = 0 if m.tie_embeddings else model.tok_embeddings.weight.numel()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta)
    largest_layer_tensor = max(p.numel() for p in block.parameters() if p.requires_grad)
    if kind == "stage":
        n_layers_res = 1 + min(w, k) + cfg.train.global_head
        emb = emb_n if k - min(w, k) == 0 else 0
        trainable = n_layers_res * lt + (head_n + emb if train_head else 0)
        frozen = n_layers_res * lf + (0 if train_head else head_n + emb)
        mm_train = n_layers_res * lt_mm + (m.vocab_size * m.d_model if train_head else 0)
        mm_frozen = n_layers_res * lf_mm + (0 if train_head else m.vocab_size * m.d_model)
        largest = max(largest_layer_tensor, head_n - m.d_model if train_head else 0)
    else:
        n_layers_res = m.n_layers
        unfreeze = 0 if keep_frozen_mlp else lf
        trainable = m.n_layers * (lt + unfreeze) + head_n + emb_n
        frozen = m.n_layers * (lf - unfreeze)
        mm_train = m.n_layers * (lt_mm + (lf_mm if not keep_frozen_mlp else 0)) + m.vocab_size * m.d_model
        mm_frozen = m.n_layers * (lf_mm if keep_frozen_mlp else 0)
        largest = max(largest_layer_tensor if keep_frozen_mlp else max(p.numel() for p in block.parameters()),
                      m.vocab_size * m.d_model)
    mixed = dtype != "float32"
    shard = lambda n, on: -(-n // world_size) if on else n  # noqa: E731
    p_dev = shard(trainable * s, zero_stage >= 3)
    fz_dev = shard(frozen * s, zero_stage >= 3)
    g_dev = shard(trainable * s, zero_stage >= 2)
    opt = shard(trainable * (12 if mixed else 8), zero_stage >= 1)
    host = {"trainable_params": 0, "frozen_params": 0, "optimizer_state": 0}
    if offload_optimizer:
        host["optimizer_state"], opt = opt, 0
    if offload_params:
        if zero_stage != 3:
            raise NotImplementedError(f"offload_params needs zero_stage=3 (DeepSpeed ZeRO-Offload), got {zero_stage}")
        host["trainable_params"], host["frozen_params"], p_dev, fz_dev = p_dev, fz_dev, 0, 0
    gather = 0
    if zero_stage == 3 and (world_size > 1 or offload_params):
        gather = 2 * max(lt + lf, head_n) * s
    first = kind == "stage" and not (k == 0 and train_head)
    one_layer = layer_activation_bytes(cfg, B, T, s, device, first=first)
    if activation_checkpointing:
        acts = n_layers_res * B * T * m.d_model * s + one_layer
    else:
        acts = one_layer + (n_layers_res - 1) * layer_activation_bytes(cfg, B, T, s, device, first=False)
    # log-softmax output, its grad and the logits grad coexist in backward; torch's CPU log_softmax backward also
    # materialises exp(output) (measured: the d768 stage and end-to-end peaks were one B*T*V fp32 buffer over)
    logits = (4 if device == "cpu" else 3) * B * T * m.vocab_size * 4
    cache_buf = prefetch_shards * B * T * m.d_model * DTYPE_BYTES[cache_dtype] if kind == "stage" else 0
    ids = B * T * 8 * (2 if kind == "end_to_end" else 1) + B * T
    parts = {"trainable_params": p_dev, "frozen_params": fz_dev + buffers, "grads": g_dev, "optimizer_state": opt,
             "activations": acts, "logits_loss": logits, "cache_read_buffer": cache_buf + ids, "zero3_gather": gather}
    # transients of the peak phases (see the module docstring)
    g_head = (head_n - m.d_model) * s if (train_head or kind == "end_to_end") else 0
    layer_bwd = 3 * B * T * m.d_ff * s + 2 * B * T * m.d_model * 4
    emb_bwd = m.vocab_size * m.d_model * s if kind == "end_to_end" else 0
    step_tmp = 2 * largest * 4 if device == "cpu" else 0
    g_layer = shard(lt * s, zero_stage >= 2)
    phases = {
        "loss": acts + logits,
        "backward": max(acts + g_head + g_layer + layer_bwd, one_layer + g_dev + layer_bwd, g_dev + emb_bwd),
        "optimizer_step": g_dev + step_tmp,
    }
    static = p_dev + fz_dev + buffers + opt + cache_buf + ids + gather
    total = static + max(phases.values())
    att_fwd, att_train = _attn_flops(cfg, T, cfg.model.attention.attention_mode == "causal")
    flops = 6 * mm_train + 4 * mm_frozen + n_layers_res * att_train
    cache_flops = 2 * (lt_mm + lf_mm) + att_fwd
    settings = dict(world_size=world_size, zero_stage=zero_stage, offload_optimizer=offload_optimizer,
                    offload_params=offload_params, dtype=dtype, micro_batch=B, seq_len=T,
                    activation_checkpointing=activation_checkpointing, train_head=train_head, layer=k,
                    device=device, cache_dtype=cache_dtype, prefetch_shards=prefetch_shards,
                    keep_frozen_mlp=keep_frozen_mlp, attention=_attn_impl(cfg, device))
    settings["summary"] = (f"{m.n_layers}x d{m.d_model} ff{m.d_ff} V{m.vocab_size} {m.attention.attention_type}, "
                           f"{dtype}, B={B} T={T}, world {world_size}, ZeRO-{zero_stage}"
                           f"{', offload opt' if offload_optimizer else ''}{', offload params' if offload_params else ''}"
                           f"{', act ckpt' if activation_checkpointing else ''}, {device}")
    return Plan(kind=kind, parts=parts, total=total, host=host,
                params={"trainable": trainable, "frozen": frozen, "total": trainable + frozen},
                flops_per_token=float(flops), disk_per_boundary_per_btok=int(1e9) * m.d_model * DTYPE_BYTES[cache_dtype],
                settings=settings, extra={"cache_flops_per_token": float(cache_flops), "phases": phases,
                                          "one_layer_activations": one_layer})


def plan_stage(cfg: StackWiseConfig, *, world_size: int = 1, zero_stage: int = 3, offload_optimizer: bool = False,
               offload_params: bool = False, dtype: str = "bfloat16", micro_batch: int | None = None,
               seq_len: int | None = None, activation_checkpointing: bool = False, train_head: bool = True,
               layer: int | None = None, device: str = "cuda", cache_dtype: str | None = None,
               prefetch_shards: int = 2) -> Plan:
    """Plan one layer-wise stage: layer ``layer`` (+ final norm and head) trained on cached activations, with the
    ``train.stage_overlap`` window of earlier layers and the ``train.global_head`` blocks it also trains.

    Args:
        cfg: the run's config (its model section sets the shapes; micro_batch/seq_len default to
            ``train.batch_size`` / ``data.seq_len``).
        world_size, zero_stage, offload_optimizer, offload_params: the engine settings (see module docstring).
        dtype: compute dtype: float32, bfloat16 or float16.
        activation_checkpointing: recompute the block in backward.
        train_head: the stage trains the final norm + head (tied with the embeddings when configured).
        layer: which layer (default 1, or the first layer whose overlap window is full; 0 for a one-layer model);
            stage 0 also embeds token ids.
        device: "cuda" (Triton/flash attention, fused Adam) or "cpu" (torch SDPA, torch AdamW).
        cache_dtype: dtype of the activation cache (default: dtype). prefetch_shards: shards held in memory.

    Returns:
        Plan: bytes by part, peak total, FLOPs per token and cache disk per boundary per billion tokens.

    Raises:
        ValueError: a bad argument, named. TypeError: cfg is not a StackWiseConfig.
    """
    return _plan(cfg, "stage", world_size=world_size, zero_stage=zero_stage, offload_optimizer=offload_optimizer,
                 offload_params=offload_params, dtype=dtype, micro_batch=micro_batch, seq_len=seq_len,
                 activation_checkpointing=activation_checkpointing, train_head=train_head, layer=layer,
                 device=device, cache_dtype=cache_dtype, prefetch_shards=prefetch_shards)


def plan_end_to_end(cfg: StackWiseConfig, *, world_size: int = 1, zero_stage: int = 3,
                    offload_optimizer: bool = False, offload_params: bool = False, dtype: str = "bfloat16",
                    micro_batch: int | None = None, seq_len: int | None = None,
                    activation_checkpointing: bool = False, device: str = "cuda",
                    keep_frozen_mlp: bool = False) -> Plan:
    """Plan full training of the whole model with ZeRO / FSDP (the alternative to layer-wise training).

    By default every weight trains, as a user of plain FSDP / ZeRO-3 would train the model;
    ``keep_frozen_mlp=True`` keeps StackWise's seeded gate/up frozen. Other arguments as :func:`plan_stage`.
    """
    return _plan(cfg, "end_to_end", world_size=world_size, zero_stage=zero_stage,
                 offload_optimizer=offload_optimizer, offload_params=offload_params, dtype=dtype,
                 micro_batch=micro_batch, seq_len=seq_len, activation_checkpointing=activation_checkpointing,
                 device=device, prefetch_shards=0, keep_frozen_mlp=keep_frozen_mlp)


def plan_cache(cfg: StackWiseConfig, *, dtype: str = "bfloat16", micro_batch: int | None = None,
               seq_len: int | None = None, layer: int | None = None, device: str = "cuda",
               cache_dtype: str | None = None) -> Plan:
    """Plan caching one layer's outputs (forward only, no grad): the layer's weights, an input and an output
    batch of B*T*C in the cache dtype, the embeddings/head that
    ``StackWiseLM(cfg, layers=[k])`` also builds, and the forward working set (SwiGLU 3*F*s and q, k, v, o 4*C*s per
    token, plus f*H*T per token when attention takes the T x T math path); on CPU the peak may instead be
    the model build (1 fp32 temporary of the largest weight), which happens before any forward."""
    m = cfg.model
    B = cfg.train.batch_size if micro_batch is None else micro_batch
    T = cfg.data.seq_len if seq_len is None else seq_len
    cache_dtype = dtype if cache_dtype is None else cache_dtype
    _check(1, 0, dtype, B, T, device, cache_dtype, 0)
    k = min(1, m.n_layers - 1) if layer is None else layer
    s = DTYPE_BYTES[dtype]
    model = _meta_layer(cfg, k)
    lt, lf, lt_mm, lf_mm = _count(model.layers[k].parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta)
    work = B * T * (3 * m.d_ff + 4 * m.d_model) * s
    if _attn_impl(cfg, device) == "math":
        work += B * T * m.n_heads * T * 4
    emb = model.tok_embeddings.weight.numel() * (1 if m.tie_embeddings else 2) + m.d_model
    io = 2 * B * T * m.d_model * DTYPE_BYTES[cache_dtype]
    # seeded init on the host draws each weight in fp32 and scales it in place: 1 temporary of the largest weight
    build = max(p.numel() for p in model.parameters()) * 4 if device == "cpu" else 0
    parts = {"layer_params": (lt + lf) * s + buffers, "embeddings_head": emb * s, "io_buffers": io,
             "forward_working_set": work, "host_build_transient": build}
    att_fwd, _ = _attn_flops(cfg, T, m.attention.attention_mode == "causal")
    total = parts["layer_params"] + parts["embeddings_head"] + max(build, io + work)
    return Plan(kind="cache", parts=parts, total=total, host={},
                params={"trainable": 0, "frozen": lt + lf, "total": lt + lf},
                flops_per_token=float(2 * (lt_mm + lf_mm) + att_fwd),
                disk_per_boundary_per_btok=int(1e9) * m.d_model * DTYPE_BYTES[cache_dtype],
                settings=dict(dtype=dtype, micro_batch=B, seq_len=T, layer=k, device=device, cache_dtype=cache_dtype,
                              summary=f"cache layer {k}, {dtype}, B={B} T={T}, {device}"))


def _main(argv: list[str] | None = None) -> None:
    """``python -m stackwise.plan --config FILE [--world_size N] ...``: print both plans and a JSON line."""
    import argparse
    import sys

    from .config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m stackwise.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML preset, e.g. configs/llama3_70b.yaml")
    ap.add_argument("--world_size", type=int, default=1)
    ap.add_argument("--zero_stage", type=int, default=None, help="default: engine.zero_stage")
    ap.add_argument("--offload_optimizer", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--offload_params", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--dtype", default=None, help="default: train.dtype")
    ap.add_argument("--micro_batch", type=int, default=None)
    ap.add_argument("--seq_len", type=int, default=None)
    ap.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--device", default="cuda", choices=DEVICES)
    ap.add_argument("--keep_frozen_mlp", action="store_true", help="end-to-end keeps gate/up frozen")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        e = cfg.engine
        common = dict(
            world_size=args.world_size, zero_stage=e.zero_stage if args.zero_stage is None else args.zero_stage,
            offload_optimizer=e.offload_optimizer if args.offload_optimizer is None else args.offload_optimizer,
            offload_params=e.offload_params if args.offload_params is None else args.offload_params,
            dtype=args.dtype or cfg.train.dtype, micro_batch=args.micro_batch, seq_len=args.seq_len,
            activation_checkpointing=(e.activation_checkpointing if args.activation_checkpointing is None
                                      else args.activation_checkpointing), device=args.device)
        stage = plan_stage(cfg, layer=args.layer, **common)
        e2e = plan_end_to_end(cfg, keep_frozen_mlp=args.keep_frozen_mlp, **common)
    except (ConfigError, ValueError, TypeError, NotImplementedError) as err:
        sys.exit(f"error: {err}")
    print(stage.table(), "\n")
    print(e2e.table(), "\n")
    ratio = e2e.training_state / stage.training_state
    print(f"end-to-end / stage training state: {ratio:.1f}x; peak: {e2e.total / stage.total:.1f}x\n")
    kv = plan_kv_caches(cfg, dtype=common["dtype"])
    print(f"KV cache for generation ({common['dtype']}, {cfg.model.n_layers} layers; "
          f"{cfg.model.attention.attention_type} uses {plan_kv_cache(cfg).cache}):\n{kv_cache_table(kv)}")
    print("JSON " + json.dumps({"stage": json.loads(stage.to_json()), "end_to_end": json.loads(e2e.to_json()),
                                "training_state_ratio": ratio, "kv_cache": [p.to_dict() for p in kv]}))


if __name__ == "__main__":
    _main()
