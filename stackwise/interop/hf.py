# SPDX-License-Identifier: MIT
"""Hugging Face interop: export a StackWise model as a ``transformers`` checkpoint, import Llama / DeepSeek weights.

- :func:`export_hf` writes ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json`` and a minimal
  ``tokenizer_config.json``) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads as
  ``LlamaForCausalLM`` (attention_type standard / gqa) or ``DeepseekV2ForCausalLM`` (mla, every layer dense).
  Frozen seeded SwiGLU projections are written as tensors: HF has no seed mechanism.
- :func:`import_hf` reads such a folder (or a state dict plus a config) from ``LlamaForCausalLM``,
  ``DeepseekV2ForCausalLM`` or a dense ``DeepseekV3ForCausalLM`` and returns a :class:`StackWiseLM`.
  Imported MLP projections are tensors, not seeds (``mlp.frozen_from_seed = False``), and those named in
  ``model.frozen_mlp`` stay frozen.

Neither function imports ``transformers``: the files are plain JSON and safetensors.

Name mapping. Top level: ``tok_embeddings`` = ``model.embed_tokens``, ``norm`` = ``model.norm``, ``output`` =
``lm_head`` (absent when tied, ``tie_word_embeddings``). Per block, StackWise ``layers.{i}.X`` is HF
``model.layers.{i}.Y`` (every name ends in ``.weight``):

=============================  ==================================  ==========================
StackWise X                    HF Y                                note
=============================  ==================================  ==========================
``attn_norm``                  ``input_layernorm``
``attn.{q,k,v,o}_proj``        ``self_attn.{q,k,v,o}_proj``        Llama, no permutation
``attn.q_a_proj``              ``self_attn.q_a_proj``              MLA
``attn.q_a_layernorm``         ``self_attn.q_a_layernorm``         MLA
``attn.q_b_proj``              ``self_attn.q_b_proj``              MLA, rope rows permuted
``attn.q_proj``                ``self_attn.q_proj``                MLA with mla_rq=0, permuted
``attn.kv_a_proj_with_mqa``    ``self_attn.kv_a_proj_with_mqa``    MLA, rope rows permuted
``attn.kv_a_layernorm``        ``self_attn.kv_a_layernorm``        MLA
``attn.kv_b_proj``             ``self_attn.kv_b_proj``             MLA
``attn.o_proj``                ``self_attn.o_proj``
``mlp_norm``                   ``post_attention_layernorm``
``mlp.{gate,up,down}``         ``mlp.{gate,up,down}_proj``         frozen ones written as tensors
=============================  ==================================  ==========================

RoPE: StackWise and HF Llama both use the rotate-half layout, so Llama q/k rows need no permutation.
HF DeepSeek-V2 (and V3 with ``rope_interleave=True``) rotate interleaved pairs; the rope rows of the MLA
query and of ``kv_a_proj_with_mqa`` are permuted between the layouts (see ``_hf_mapping``).

Config fields: ``hidden_size`` = d_model, ``num_hidden_layers`` = n_layers, ``num_attention_heads`` = n_heads,
``num_key_value_heads`` = n_kv_heads (gqa) or n_heads, ``intermediate_size`` = d_ff, ``rms_norm_eps`` =
norm_eps, ``rope_parameters.rope_theta`` = rope_theta, ``max_position_embeddings`` = max_seq_len,
``tie_word_embeddings`` = tie_embeddings, ``q_lora_rank`` = mla_rq (None when 0), ``kv_lora_rank`` = mla_rkv,
``qk_nope_head_dim`` / ``qk_rope_head_dim`` / ``v_head_dim`` as named. The exported ``config.json`` also
carries the whole StackWise model section under ``"stackwise"`` so that a round trip keeps init seeds,
``frozen_mlp``, ``mask_token_id`` and the default attention mode.

Caveat: HF DeepSeek builds its latent norms (``q_a_layernorm``, ``kv_a_layernorm``) with eps 1e-6 whatever
``rms_norm_eps`` says, while StackWise uses ``norm_eps`` everywhere; the two agree exactly only when
norm_eps is 1e-6 (DeepSeek's own value). A warning is logged otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file

from ..blocks import TransformerBlock
from ..config import config_from_dict
from ..model import StackWiseLM
from . import _hf_mapping as M

logger = logging.getLogger("stackwise")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: torch.dtype | str | None, model: StackWiseLM) -> torch.dtype:
    if dtype is None:
        return model.tok_embeddings.weight.dtype
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {list(_DTYPES)} (or the torch dtype), got {dtype!r}")


def _check_exportable(model: StackWiseLM) -> None:
    cfg = model.cfg
    kind = cfg.attention.attention_type
    if kind == "kernel":
        raise NotImplementedError(
            "model.attention.attention_type='kernel' cannot be exported to Hugging Face: no transformers "
            "architecture computes random-feature (kernel) attention, so no HF model would reproduce its outputs; "
            "fine-tune a copy with attention_type gqa/standard (same projections) and export that"
        )
    if not cfg.use_rope or (kind == "mla" and cfg.attention.qk_rope_head_dim == 0):
        raise NotImplementedError(
            "models without RoPE (model.use_rope=false or qk_rope_head_dim=0) cannot be exported: Llama and "
            "DeepSeek-V2 always rotate queries and keys"
        )
    missing = [i for i, b in enumerate(model.layers) if not isinstance(b, TransformerBlock)]
    if missing:
        raise ValueError(f"export needs every layer built; layers {missing} are missing (build StackWiseLM(cfg) whole)")


def export_state_dict(model: StackWiseLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The HF-named tensors of ``model`` (CPU, contiguous, ``dtype``), frozen projections included.

    Raises:
        NotImplementedError: kernel attention or no RoPE (no HF architecture matches).
    """
    _check_exportable(model)
    cfg, dtype = model.cfg, _resolve_dtype(dtype, model)
    out = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        if cfg.attention.attention_type == "mla":
            t = M.rope_to_interleaved(name, t, cfg.n_heads, cfg.attention)
        out[M.sw_to_hf_name(name)] = t.detach().to(device="cpu", dtype=dtype).contiguous()
    return out


def _tokenizer_config(tokenizer_json: dict, cfg) -> dict:
    """A minimal ``tokenizer_config.json`` for ``PreTrainedTokenizerFast``; names the mask token when found."""
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len}
    by_id = {t.get("id"): t.get("content") for t in tokenizer_json.get("added_tokens", [])}
    if by_id.get(cfg.mask_id) is not None:
        out["mask_token"] = by_id[cfg.mask_id]
    return out


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def export_hf(
    model: StackWiseLM,
    out_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
) -> str:
    """Write ``model`` as a Hugging Face checkpoint folder.

    The folder holds ``config.json``, ``model.safetensors`` and, with ``tokenizer_path``, ``tokenizer.json``
    plus ``tokenizer_config.json``. Files are written to temporary names in ``out_dir`` and renamed into
    place (``config.json`` last), so a reader never sees a partial file.

    Args:
        model: a whole StackWiseLM with attention_type standard, gqa or mla.
        out_dir: destination folder (created; existing files of the same names are replaced).
        tokenizer_path: a ``tokenizers`` JSON file to copy beside the weights, or None.
        dtype: dtype of the written tensors (torch dtype or "float32"/"bfloat16"/"float16"); default the model's.

    Returns:
        The output folder path.

    Raises:
        NotImplementedError: kernel attention, or a model without RoPE.
        ValueError: a layer is missing, bad dtype, or the tokenizer file is not a tokenizers JSON.
        FileNotFoundError: tokenizer_path does not exist.
    """
    out_dir = os.fspath(out_dir)
    cfg, dtype = model.cfg, _resolve_dtype(dtype, model)
    tensors = export_state_dict(model, dtype)
    if cfg.attention.attention_type == "mla" and cfg.norm_eps != M.HF_MLA_LATENT_EPS:
        logger.warning(
            "model.norm_eps=%g but HF DeepSeek-V2 latent norms use eps %g: exported logits differ slightly "
            "(use norm_eps=1e-6 for an exact match)",
            cfg.norm_eps,
            M.HF_MLA_LATENT_EPS,
        )
    tok = None
    if tokenizer_path is not None:
        tokenizer_path = os.fspath(tokenizer_path)
        if not os.path.isfile(tokenizer_path):
            raise FileNotFoundError(f"tokenizer_path {tokenizer_path!r} does not exist; pass a tokenizers JSON file")
        try:
            with open(tokenizer_path, encoding="utf-8") as f:
                tok = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"tokenizer_path {tokenizer_path!r} is not a tokenizers JSON file: {e}") from None
        if not isinstance(tok, dict) or "model" not in tok:
            raise ValueError(f"tokenizer_path {tokenizer_path!r} is JSON but not a tokenizers file (no 'model' key)")
    hf_config = M.hf_config_from_model(cfg, dtype)
    hf_config["stackwise"] = {"model": dataclasses.asdict(cfg)}
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        files = ["model.safetensors"]
        if tok is not None:
            shutil.copyfile(tokenizer_path, os.path.join(staging, "tokenizer.json"))
            _write_json(os.path.join(staging, "tokenizer_config.json"), _tokenizer_config(tok, cfg))
            files += ["tokenizer.json", "tokenizer_config.json"]
        _write_json(os.path.join(staging, "config.json"), hf_config)
        for name in files + ["config.json"]:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "exported %s (%s, %d tensors, %s) to %s",
        hf_config["architectures"][0],
        cfg.attention.attention_type,
        len(tensors),
        hf_config["dtype"],
        out_dir,
    )
    return out_dir


def _read_config(config) -> dict:
    if config is None:
        raise ValueError("import_hf needs the Hugging Face config when given a state dict; pass config=")
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Hugging Face config {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a dict, a config.json path or a transformers config, got {type(config).__name__}")


def _read_weights(folder: str) -> dict[str, torch.Tensor]:
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(load_file(os.path.join(folder, shard)))
        return out
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{folder!r} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
        f"is it a Hugging Face checkpoint folder?"
    )


def import_hf(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    config=None,
    frozen_mlp: list[str] | None = None,
    overrides: list[str] | None = None,
    dtype: torch.dtype | None = None,
    allow_rope_scaling: bool = False,
) -> StackWiseLM:
    """Build a StackWiseLM from Hugging Face Llama / DeepSeek-V2 / dense DeepSeek-V3 weights.

    Args:
        path_or_state_dict: a checkpoint folder (``config.json`` + safetensors), or an HF state dict
            (``model.``-prefixed names as in ``LlamaForCausalLM.state_dict()``).
        config: the HF config (dict, ``config.json`` path or transformers config); required with a
            state dict, optional with a folder (default its ``config.json``).
        frozen_mlp: SwiGLU projections to keep frozen (default: the config's, ``["gate", "up"]``; ``[]`` trains all).
        overrides: extra dotted config overrides, e.g. ``["model.attention.backend=torch"]``.
        dtype: cast the model to this dtype (default float32).
        allow_rope_scaling: import configs with RoPE scaling (yarn, llama3, ...) using plain RoPE.

    Returns:
        A StackWiseLM whose default attention_mode is causal (a StackWise export keeps its own; override with
        ``overrides``).

    Raises:
        ValueError: unknown architecture, a missing or unexpected tensor, or a shape mismatch (the message
            names the HF tensor, the expected and the found shape).
        NotImplementedError: a valid HF model StackWise cannot hold (MoE layers, biases, RoPE scaling, ...).
    """
    if isinstance(path_or_state_dict, Mapping):
        state, hf = dict(path_or_state_dict), _read_config(config)
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        folder = os.fspath(path_or_state_dict)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Hugging Face checkpoint folder {folder!r} does not exist")
        hf = _read_config(folder if config is None else config)
        state = _read_weights(folder)
    else:
        raise TypeError(
            f"path_or_state_dict must be a folder path or a state dict, got {type(path_or_state_dict).__name__}"
        )
    if state and not any(k.startswith("model.") for k in state):
        # a bare LlamaModel / DeepseekV2Model state dict
        state = {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in state.items()}
    model_dict = _model_section(hf, frozen_mlp, allow_rope_scaling)
    seq_len = min(512, model_dict["max_seq_len"])
    cfg = config_from_dict({"model": model_dict, "data": {"seq_len": max(2, seq_len)}}, overrides).model
    model = StackWiseLM(cfg)
    model.load_state_dict(_map_state(model, state, M.rope_is_interleaved(hf)))
    for block in model.layers:
        # imported projections are real tensors: checkpoints must store them, not a seed
        block.mlp.frozen_from_seed = False
    if cfg.attention.attention_type == "mla" and cfg.norm_eps != M.HF_MLA_LATENT_EPS:
        logger.warning(
            "rms_norm_eps=%g: HF DeepSeek latent norms use eps %g, StackWise uses norm_eps for them; outputs "
            "differ slightly from the HF model",
            cfg.norm_eps,
            M.HF_MLA_LATENT_EPS,
        )
    if dtype is not None:
        model.to(dtype)
    logger.info(
        "imported %s as a StackWise %s model (%d layers)",
        M.architecture_of(hf),
        cfg.attention.attention_type,
        cfg.n_layers,
    )
    return model


def _model_section(hf: dict, frozen_mlp: list[str] | None, allow_rope_scaling: bool) -> dict:
    """The StackWise model section: HF-derived fields over the exported ``stackwise`` block, if any."""
    derived = M.model_dict_from_hf(hf, allow_rope_scaling=allow_rope_scaling)
    base = dict((hf.get("stackwise") or {}).get("model") or {})
    base.setdefault("attention", {})
    base["attention"] = {"attention_mode": "causal", **base["attention"], **derived.pop("attention")}
    base.update(derived)
    if frozen_mlp is not None:
        base["frozen_mlp"] = list(frozen_mlp)
    # imported projections are real tensors: checkpoints must store them, not a seed
    base["frozen_mlp_seeded"] = False
    return base


def _map_state(model: StackWiseLM, state: dict[str, torch.Tensor], interleaved: bool) -> dict[str, torch.Tensor]:
    """HF tensors -> a StackWise state dict, with name, presence and shape checks (ValueError naming the tensor)."""
    cfg = model.cfg
    wanted = model.state_dict()
    used, out = set(), {}
    for name, ref in wanted.items():
        hf_name = M.sw_to_hf_name(name)
        if name == "output.weight" and cfg.tie_embeddings:
            hf_name = M.TOP["tok_embeddings.weight"]
        if hf_name not in state:
            raise ValueError(
                f"Hugging Face tensor {hf_name!r} (StackWise {name!r}, shape {tuple(ref.shape)}) is missing from the "
                f"checkpoint; the weights do not match the config (architecture, layers, tie_word_embeddings)"
            )
        t = state[hf_name]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"Hugging Face tensor {hf_name!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} for "
                f"StackWise {name!r}; the checkpoint does not match its config"
            )
        if interleaved:
            t = M.rope_to_half(name, t, cfg.n_heads, cfg.attention)
        used.add(hf_name)
        out[name] = t
    if cfg.tie_embeddings:
        used.add(M.TOP["output.weight"])
    extra = sorted(k for k in state if k not in used and not k.endswith(M.IGNORED_SUFFIXES))
    if extra:
        raise ValueError(
            f"{len(extra)} Hugging Face tensors have no StackWise counterpart, e.g. {extra[:3]}; the checkpoint "
            f"holds modules StackWise does not implement (MoE experts, biases, extra layers?)"
        )
    return out
