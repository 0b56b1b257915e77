# SPDX-License-Identifier: MIT
"""MLA's latent KV cache (absorbed decoding) and the KV-cache planner (CPU, fp32, tiny models)."""

import os

import pytest
import torch

from stackwise.blocks import KVCache, LatentKVCache
from stackwise.config import load_config
from stackwise.generate import cache_bytes, generate_clm, make_caches
from stackwise.kernels.features.reference import draw_features, feature_map_ref
from stackwise.model import StackWiseLM
from stackwise.plan import plan_kv_cache  # the planner re-exports plan_kv
from stackwise.plan_kv import CACHE_KINDS, kv_cache_table, plan_kv_caches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(make_cfg, attention_type="mla", *extra):
    torch.manual_seed(0)
    return StackWiseLM(make_cfg(f"model.attention.attention_type={attention_type}", *extra).model).eval()


def _ids(model, B=2, T=15, seed=1):
    return torch.randint(0, model.mask_id, (B, T), generator=torch.Generator().manual_seed(seed))


def _stepwise_logits(model, ids, caches, chunks):
    """Logits of ids [B, T] fed through the caches in pieces of the given lengths (the first is the prefill)."""
    n, out, pos = model.cfg.n_layers, [], 0
    with torch.no_grad():
        for L in chunks:
            h = model.run_layers(model.embed(ids[:, pos : pos + L]), 0, n, "causal", caches, pos)
            out.append(model.head(h))
            pos += L
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("extra", [(), ("model.attention.mla_rq=0",)], ids=["q_lora", "q_proj"])
def test_latent_cache_logits_equal_full_forward(make_cfg, extra):
    """Prefill 5, one chunk of 4 (causal inside the chunk), then 6 single steps: equal to the full causal forward."""
    model = _model(make_cfg, "mla", *extra)
    ids = _ids(model)
    with torch.no_grad():
        full = model(ids, attention_mode="causal")
    caches = make_caches(model)
    assert all(isinstance(c, LatentKVCache) for c in caches)
    cached = _stepwise_logits(model, ids, caches, [5, 4] + [1] * 6)
    err = (cached - full).abs().max().item()
    assert err < 1e-5, f"latent-cache vs full logits max abs diff {err:.2e}"


def test_latent_cache_bytes_per_token(make_cfg):
    model = _model(make_cfg)
    a, n = model.cfg.attention, model.cfg.n_layers
    ids = _ids(model, B=3, T=11)
    caches = make_caches(model)
    _stepwise_logits(model, ids, caches, [4] + [1] * 7)
    per_token = cache_bytes(caches) / (3 * 11)
    assert per_token == (a.mla_rkv + a.qk_rope_head_dim) * 4 * n == 192  # (16 + 8) x fp32 x 2 layers
    assert all(c.kv.shape == (3, 11, a.mla_rkv + a.qk_rope_head_dim) for c in caches)
    expanded = [KVCache() for _ in range(n)]
    _stepwise_logits(model, ids, expanded, [4] + [1] * 7)
    assert cache_bytes(expanded) / (3 * 11) == model.cfg.n_heads * (16 + 8 + 16) * 4 * n  # 4 heads x (24 + 16)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_latent_and_expanded_generate_the_same_tokens(make_cfg, temperature):
    model = _model(make_cfg)
    prompt = _ids(model, T=4)
    kw = dict(temperature=temperature, top_k=30)
    a = generate_clm(model, prompt, 20, mla_cache="latent", generator=torch.Generator().manual_seed(5), **kw)
    b = generate_clm(model, prompt, 20, mla_cache="expanded", generator=torch.Generator().manual_seed(5), **kw)
    c = generate_clm(model, prompt, 20, use_cache=False, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="mla_cache must be one of"):
        generate_clm(model, prompt, 2, mla_cache="compressed")


# --------------------------------------------------------------------------------------------- planner


@pytest.mark.parametrize("attention_type,cache", [("standard", "mha"), ("gqa", "gqa"), ("mla", "mla_latent"),
                                                  ("mla", "mla_expanded")])
def test_planner_matches_allocated_caches(make_cfg, attention_type, cache):
    """The planner's bytes per token equal what generation's caches hold (fp32, B=2, 9 tokens)."""
    model = _model(make_cfg, attention_type)
    caches = make_caches(model, "expanded" if cache == "mla_expanded" else "latent")
    _stepwise_logits(model, _ids(model, T=9), caches, [6, 1, 1, 1])
    plan = plan_kv_cache(model.cfg, dtype="float32", cache=cache)
    if cache != "mla_expanded":
        assert plan_kv_cache(model.cfg, dtype="float32").cache == cache  # the default kind for the type
    assert plan.bytes_per_token == cache_bytes(caches) / (2 * 9)
    assert plan.bytes_for(2, 9) == cache_bytes(caches) and plan.state_bytes_per_sequence == 0


def test_planner_srd_mla_dims():
    cfg = load_config(os.path.join(ROOT, "configs", "srd_default.yaml"), ["--model.attention.attention_type=mla"])
    plans = {p.cache: p for p in plan_kv_caches(cfg, dtype="bfloat16")}
    assert list(plans) == list(CACHE_KINDS)
    assert plans["mla_latent"].values_per_token_per_layer == 576  # 512 + 64
    assert plans["mla_expanded"].values_per_token_per_layer == 10_240  # 32 x (192 + 128)
    assert plans["mha"].values_per_token_per_layer == 8192 and plans["gqa"].values_per_token_per_layer == 2048
    assert plans["mla_latent"].bytes_per_token == 576 * 2 * 8 == plans["mla_latent"].to_dict()["bytes_per_token"]
    kern = plans["kernel_state"]
    assert kern.values_per_token_per_layer == 0 and kern.bytes_for(1, 10) == kern.bytes_for(1, 10_000)
    table = kv_cache_table(list(plans.values()))
    assert "576" in table and "10240" in table and "/seq" in table


@pytest.mark.parametrize("feature_map", ["softmax", "trig"])
def test_planner_kernel_state_uses_feature_count(make_cfg, feature_map):
    cfg = make_cfg("model.attention.attention_type=kernel", f"model.attention.kernel_feature_map={feature_map}")
    m = cfg.model
    W = draw_features(m.head_dim, m.attention.kernel_n_features, seed=0)
    mp = feature_map_ref(torch.randn(1, 1, 3, m.head_dim), W, feature_map=feature_map, scale=1.0,
                         is_query=False).shape[-1]  # M' as the feature map produces it
    plan = plan_kv_cache(cfg, dtype="float32")
    assert plan.cache == "kernel_state"
    stab = m.kv_heads if feature_map == "softmax" else 0
    assert plan.state_values_per_sequence_per_layer == m.kv_heads * mp * (m.head_dim + 1) + stab


def test_planner_errors(make_cfg):
    cfg = make_cfg()
    with pytest.raises(ValueError, match="dtype must be one of"):
        plan_kv_cache(cfg, dtype="fp8")
    with pytest.raises(ValueError, match="cache must be one of"):
        plan_kv_cache(cfg, cache="paged")
    with pytest.raises(TypeError, match="StackWiseConfig"):
        plan_kv_cache({"model": 1})
