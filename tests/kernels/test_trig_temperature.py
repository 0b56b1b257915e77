# SPDX-License-Identifier: MIT
"""The "trig" feature map's temperature tau: weight exp(tau^2 s^2 (cos(q, k) - 1)), learnable per kv head.

Checks: the Fourier estimate stays unbiased at tau != 1; outputs and every gradient (q, k, v and tau) of the
Triton and torch paths match the float64 reference; a weight share beyond the untempered cap (e^2 / (1 + e^2)
= 0.881 for two keys) is reachable; the FeatureAttention block learns log tau per kv head and round-trips
through a checkpoint; bad temperatures are refused by name.
"""

from __future__ import annotations

import math

import pytest
import torch

from stackwise.kernels import draw_features, feature_attention
from stackwise.kernels.features.reference import feature_attention_ref, feature_map_ref
from tests.utils import assert_close


def test_trig_features_unbiased_with_temperature():
    """E[phi(q) . phi(k)] = exp(tau^2 s^2 (cos(q, k) - 1)) for Gaussian W, per head tau, checked with many features."""
    D, tau = 8, torch.tensor([0.5, 2.0])
    q, k = torch.randn(1, 2, 5, D, dtype=torch.float64), torch.randn(1, 2, 5, D, dtype=torch.float64)
    W = draw_features(D, 200_000, family="gaussian", seed=0).double()
    kw = dict(feature_map="trig", scale=D**-0.5, temperature=tau)
    est = (feature_map_ref(q, W, is_query=True, **kw) * feature_map_ref(k, W, is_query=False, **kw)).sum(-1)
    cos = torch.nn.functional.cosine_similarity(q, k, dim=-1)
    exact = torch.exp(tau.view(1, 2, 1) ** 2 * (cos - 1))  # s = 1 at the default scale
    assert_close("trig kernel estimate", exact, est, 1e-2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_temperature_gradients_match_float64_reference(backend, causal):
    B, H, Hkv, T, D, Dv, M = 2, 4, 2, 70, 32, 16, 24
    W = draw_features(D, M, family="orthogonal", seed=4)
    q, k = torch.randn(B, H, T, D, requires_grad=True), torch.randn(B, Hkv, T, D, requires_grad=True)
    v = torch.randn(B, Hkv, T, Dv, requires_grad=True)
    tau = torch.tensor([0.7, 2.5], requires_grad=True)
    do = torch.randn(B, H, T, Dv)
    o = feature_attention(q, k, v, W, causal=causal, feature_map="trig", temperature=tau, backend=backend)
    o.backward(do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, tau)]
    ref = feature_attention_ref(*leaves[:3], W.double(), causal=causal, feature_map="trig", temperature=leaves[3])
    ref.backward(do.double())
    for name, r, x in zip(("o", "dq", "dk", "dv", "dtau"), [ref] + [x.grad for x in leaves],
                          (o, q.grad, k.grad, v.grad, tau.grad)):
        assert_close(name, r, x, 2e-5, atol=1e-6)
    assert tau.grad.abs().min() > 0, "every kv head's temperature gets a gradient"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_temperature_sharpens_beyond_the_untempered_cap(backend):
    """Two keys, one along the query and one opposite: at tau = 1 the first gets at most e^2 / (1 + e^2)."""
    D, M = 16, 1024
    W = draw_features(D, M, family="orthogonal", seed=0)
    e = torch.zeros(D)
    e[0] = 1.0
    q = e.view(1, 1, 1, D).expand(1, 1, 2, D).contiguous()
    k = torch.stack([e, -e]).view(1, 1, 2, D)
    v = torch.tensor([[1.0], [0.0]]).view(1, 1, 2, 1).expand(1, 1, 2, 16).contiguous()  # share of key 0
    cap = math.exp(2) / (1 + math.exp(2))
    shares = {}
    for tau in (1.0, 3.0):
        o = feature_attention(q, k, v, W, causal=False, feature_map="trig", temperature=tau, backend=backend)
        shares[tau] = o[0, 0, 0, 0].item()
    assert abs(shares[1.0] - cap) < 0.02, f"tau=1 share {shares[1.0]:.4f}, exact {cap:.4f}"
    assert shares[3.0] > 0.97, f"tau=3 share {shares[3.0]:.4f}: not sharper than the untempered cap {cap:.3f}"


def test_temperature_is_refused_when_bad():
    W = draw_features(8, 8, seed=0)
    q = k = v = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="feature_map='trig' only"):
        feature_attention(q, k, v, W, causal=False, feature_map="softmax", temperature=2.0, backend="torch")
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        feature_attention(q, k, v, W, causal=False, feature_map="trig", temperature=torch.ones(3), backend="torch")
    with pytest.raises(ValueError, match="> 0"):
        feature_attention(q, k, v, W, causal=False, feature_map="trig", temperature=0.0, backend="torch")


def test_block_learns_log_temperature_and_checkpoints_it(make_cfg, tmp_path):
    from stackwise.config import ConfigError
    from stackwise.engine.checkpoint import load_model, save_model
    from stackwise.model import StackWiseLM

    cfg = make_cfg("model.attention.attention_type=kernel", "model.attention.kernel_feature_map=trig",
                   "model.attention.kernel_trig_temperature=2.0")
    model = StackWiseLM(cfg.model)
    attn = model.layers[0].attn if hasattr(model.layers[0], "attn") else model.layers[0].attention
    assert attn.log_temperature.shape == (cfg.model.kv_heads,)
    assert torch.allclose(attn.log_temperature, torch.full((cfg.model.kv_heads,), math.log(2.0)))
    ids = torch.randint(0, cfg.model.vocab_size - 1, (2, 16))
    model(ids).float().square().mean().backward()
    assert attn.log_temperature.grad is not None and attn.log_temperature.grad.abs().sum() > 0
    with torch.no_grad():
        attn.log_temperature.add_(0.25)
    save_model(str(tmp_path / "m.safetensors"), model, cfg)
    loaded, _ = load_model(str(tmp_path / "m.safetensors"))
    la = loaded.layers[0].attn if hasattr(loaded.layers[0], "attn") else loaded.layers[0].attention
    assert torch.equal(la.log_temperature, attn.log_temperature)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    soft = StackWiseLM(make_cfg("model.attention.attention_type=kernel").model)
    assert not any("log_temperature" in n for n, _ in soft.named_parameters()), "softmax features have no tau"
    with pytest.raises(ConfigError, match="kernel_trig_temperature"):
        make_cfg("model.attention.kernel_trig_temperature=0.0")
