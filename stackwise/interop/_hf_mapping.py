# SPDX-License-Identifier: MIT
"""Name tables, RoPE permutations and config translation between StackWise and Hugging Face checkpoints.

Pure functions on dicts and tensors; nothing here imports ``transformers``. :mod:`stackwise.interop.hf`
does the file handling and model building on top of them. The tables are documented in that module's
docstring and in the README's "Hugging Face interop" section.

RoPE layouts:

- StackWise rotates *half-split* pairs: channel ``i`` pairs with ``i + d/2`` (``RotaryEmbedding``).
- HF ``LlamaForCausalLM`` uses the same rotate-half layout, so Llama weights map one to one.
- HF ``DeepseekV2ForCausalLM`` (transformers 5: ``apply_rotary_emb`` views the rope channels as complex
  numbers, ``reshape(..., -1, 2)``) and ``DeepseekV3ForCausalLM`` with ``rope_interleave=True`` rotate
  *interleaved* pairs ``(2i, 2i+1)``, both with frequency ``theta ** (-2i/d)``. A StackWise rope channel
  ``i`` is HF channel ``2i`` and StackWise ``i + d/2`` is HF ``2i + 1``; so the rope rows of ``q_b_proj``
  (or ``q_proj``) and of ``kv_a_proj_with_mqa`` are permuted on import (:func:`rope_to_half`) and
  permuted back on export (:func:`rope_to_interleaved`). Queries and keys are permuted alike, so every
  attention score, and hence every output, is unchanged.
"""

from __future__ import annotations

import torch

LLAMA = "LlamaForCausalLM"
DEEPSEEK_V2 = "DeepseekV2ForCausalLM"
DEEPSEEK_V3 = "DeepseekV3ForCausalLM"
ARCHITECTURES = {"llama": LLAMA, "deepseek_v2": DEEPSEEK_V2, "deepseek_v3": DEEPSEEK_V3}
SUPPORTED = tuple(ARCHITECTURES.values())

# StackWise name -> HF name, per block (prefix layers.{i}. <-> model.layers.{i}.)
BLOCK_COMMON = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
}
BLOCK_LLAMA = {f"attn.{p}.weight": f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")}
BLOCK_MLA = {
    f"attn.{p}.weight": f"self_attn.{p}.weight"
    for p in ("q_a_proj", "q_a_layernorm", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")
}
TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# HF keys that carry no weights StackWise needs (old Llama checkpoints saved the RoPE table)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# the latent norms of HF DeepSeek MLA are built with this eps whatever config.rms_norm_eps says
HF_MLA_LATENT_EPS = 1e-6


def sw_to_hf_name(name: str) -> str:
    """StackWise name -> HF name: ``layers.3.attn.q_proj.weight`` -> ``model.layers.3.self_attn.q_proj.weight``.

    Raises:
        KeyError: a name with no HF counterpart.
    """
    if name in TOP:
        return TOP[name]
    head, idx, rest = name.split(".", 2)
    if head != "layers":
        raise KeyError(name)
    table = {**BLOCK_COMMON, **BLOCK_LLAMA, **BLOCK_MLA}
    return f"model.layers.{idx}.{table[rest]}"


def _half_perm(d: int) -> torch.Tensor:
    # StackWise rope channel j reads HF channel perm[j]: [0, 2, 4, ..., 1, 3, 5, ...]
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


def _permute_rope_rows(w: torch.Tensor, n_groups: int, d_nope: int, d_rope: int, perm: torch.Tensor) -> torch.Tensor:
    """Permute the rope rows of a weight whose rows are ``n_groups`` blocks of ``[d_nope | d_rope]``."""
    rows = w.view(n_groups, d_nope + d_rope, *w.shape[1:])
    out = rows.clone()
    out[:, d_nope:] = rows[:, d_nope:][:, perm]
    return out.view_as(w)


def rope_to_half(name: str, w: torch.Tensor, n_heads: int, a) -> torch.Tensor:
    """HF interleaved -> StackWise rotate-half rows of MLA ``q_b_proj``, ``q_proj``, ``kv_a_proj_with_mqa``.

    Other names return ``w`` unchanged. ``a`` is the model's ``AttentionConfig``.
    """
    return _rope_permute(name, w, n_heads, a, _half_perm(a.qk_rope_head_dim))


def rope_to_interleaved(name: str, w: torch.Tensor, n_heads: int, a) -> torch.Tensor:
    """StackWise rotate-half -> HF interleaved rows; the inverse of :func:`rope_to_half`."""
    return _rope_permute(name, w, n_heads, a, torch.argsort(_half_perm(a.qk_rope_head_dim)))


def _rope_permute(name: str, w: torch.Tensor, n_heads: int, a, perm: torch.Tensor) -> torch.Tensor:
    d_rope = a.qk_rope_head_dim
    if not d_rope:
        return w
    if name.endswith(("attn.q_b_proj.weight", "attn.q_proj.weight")):
        return _permute_rope_rows(w, n_heads, a.qk_nope_head_dim, d_rope, perm)
    if name.endswith("attn.kv_a_proj_with_mqa.weight"):
        return _permute_rope_rows(w, 1, a.mla_rkv, d_rope, perm)
    return w


def _rope_theta(hf: dict) -> float:
    rp = hf.get("rope_parameters") or {}
    theta = rp.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError("Hugging Face config has no rope_theta (neither rope_parameters.rope_theta nor rope_theta)")
    return float(theta)


def _check_rope_type(hf: dict, allow_rope_scaling: bool) -> None:
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ("default", None) and not allow_rope_scaling:
        raise NotImplementedError(
            f"Hugging Face config uses RoPE scaling {kind!r}; StackWise's RotaryEmbedding is plain RoPE, so the "
            f"imported model would compute different outputs. Pass allow_rope_scaling=True to import it anyway "
            f"(positions then use unscaled RoPE)"
        )


def _require(hf: dict, key: str, expected, why: str) -> None:
    got = hf.get(key, expected)
    if got != expected:
        raise NotImplementedError(
            f"Hugging Face config {key}={got!r} is not supported: StackWise needs {expected!r} ({why})"
        )


def architecture_of(hf: dict) -> str:
    """The HF architecture name of a config dict; ValueError for anything StackWise cannot hold."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else ARCHITECTURES.get(hf.get("model_type", ""), "")
    if arch not in SUPPORTED:
        got = arch or f"model_type={hf.get('model_type')!r}"
        raise ValueError(
            f"unknown Hugging Face architecture {got!r}: StackWise imports {', '.join(SUPPORTED)} "
            f"(model_type {', '.join(ARCHITECTURES)}); convert the checkpoint to one of them first"
        )
    return arch


def model_dict_from_hf(hf: dict, *, allow_rope_scaling: bool = False) -> dict:
    """HF config dict -> the ``model`` section of a StackWise config (a plain dict for ``config_from_dict``)."""
    arch = architecture_of(hf)
    _check_rope_type(hf, allow_rope_scaling)
    _require(hf, "hidden_act", "silu", "SwiGLU uses SiLU")
    _require(hf, "attention_bias", False, "projections have no bias")
    _require(hf, "mlp_bias", False, "projections have no bias")
    H, C = hf["num_attention_heads"], hf["hidden_size"]
    out = {
        "vocab_size": hf["vocab_size"],
        "d_model": C,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": H,
        "d_ff": hf["intermediate_size"],
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "use_rope": True,
        "rope_theta": _rope_theta(hf),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "attention": {},
    }
    if arch == LLAMA:
        kv = hf.get("num_key_value_heads") or H
        head_dim = hf.get("head_dim") or C // H
        if head_dim != C // H:
            raise NotImplementedError(
                f"Hugging Face config head_dim={head_dim} differs from hidden_size/num_attention_heads={C // H}; "
                f"StackWise derives the head dim as d_model // n_heads"
            )
        out["n_kv_heads"] = kv
        out["attention"]["attention_type"] = "standard" if kv == H else "gqa"
    else:
        dense = hf.get("first_k_dense_replace", 0)
        if dense is None or dense < hf["num_hidden_layers"]:
            raise NotImplementedError(
                f"Hugging Face config first_k_dense_replace={dense} < num_hidden_layers={hf['num_hidden_layers']}: "
                f"layers {dense}.. are mixture-of-experts, which StackWise does not implement; only dense "
                f"DeepSeek stacks (first_k_dense_replace >= num_hidden_layers) import"
            )
        kv = hf.get("num_key_value_heads") or H
        if kv != H:
            raise NotImplementedError(f"DeepSeek MLA needs num_key_value_heads == num_attention_heads ({H}), got {kv}")
        out["n_kv_heads"] = H
        out["attention"].update(
            attention_type="mla",
            mla_rq=hf.get("q_lora_rank") or 0,
            mla_rkv=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
        )
    return out


def rope_is_interleaved(hf: dict) -> bool:
    """Whether the checkpoint's MLA rope rows are in the interleaved layout (see the module docstring)."""
    arch = architecture_of(hf)
    if arch == DEEPSEEK_V2:
        return True
    if arch == DEEPSEEK_V3:
        return bool(hf.get("rope_interleave", True))
    return False


def hf_config_from_model(cfg, dtype: torch.dtype) -> dict:
    """StackWise ``ModelConfig`` -> an HF ``config.json`` dict (Llama for standard/gqa, DeepSeek-V2 for mla)."""
    a = cfg.attention
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if a.attention_type in ("standard", "gqa"):
        return {
            "architectures": [LLAMA],
            "model_type": "llama",
            **common,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
        }
    if a.attention_type == "mla":
        return {
            "architectures": [DEEPSEEK_V2],
            "model_type": "deepseek_v2",
            **common,
            "num_key_value_heads": cfg.n_heads,
            "q_lora_rank": a.mla_rq or None,
            "kv_lora_rank": a.mla_rkv,
            "qk_nope_head_dim": a.qk_nope_head_dim,
            "qk_rope_head_dim": a.qk_rope_head_dim,
            "v_head_dim": a.v_head_dim,
            # every layer dense: layer i is MoE only when i >= first_k_dense_replace
            "first_k_dense_replace": cfg.n_layers,
        }
    raise NotImplementedError(f"no Hugging Face architecture for model.attention.attention_type={a.attention_type!r}")
