# SPDX-License-Identifier: MIT
import pytest
import torch

from stackwise.blocks import Attention, SwiGLU
from stackwise.model import StackWiseLM

TYPES = ["standard", "gqa", "mla", "kernel"]


def _model(make_cfg, attention_type, *extra):
    cfg = make_cfg(f"model.attention.attention_type={attention_type}", *extra)
    return StackWiseLM(cfg.model).eval()


@pytest.mark.parametrize("attention_type", TYPES)
def test_causal_mode_never_sees_the_future(make_cfg, attention_type):
    m = _model(make_cfg, attention_type)
    ids = torch.randint(0, 96, (2, 21))
    t = 9
    changed = ids.clone()
    changed[:, t + 1 :] = torch.randint(0, 96, (2, 21 - t - 1))
    with torch.no_grad():
        a = m(ids, attention_mode="causal")
        b = m(changed, attention_mode="causal")
        c = m(ids, attention_mode="bidirectional")
        d = m(changed, attention_mode="bidirectional")
    # kernel attention's key stabiliser is a max over all keys: it cancels exactly in math, not in rounding
    atol = 1e-5 if attention_type == "kernel" else 0.0
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=atol, rtol=0)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-3
    assert (c[:, : t + 1] - d[:, : t + 1]).abs().max() > 1e-3, "bidirectional mode must see later tokens"


@pytest.mark.parametrize("attention_type", TYPES)
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_forward_backward_every_type(make_cfg, attention_type, mode):
    m = _model(make_cfg, attention_type).train()
    ids = torch.randint(0, 96, (2, 17))
    logits = m(ids, attention_mode=mode)
    assert logits.shape == (2, 17, 97) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_gqa_with_all_heads_equals_mha(make_cfg):
    cfg_gqa = make_cfg("model.attention.attention_type=gqa", "model.n_kv_heads=4").model
    cfg_mha = make_cfg("model.attention.attention_type=standard").model
    gqa, mha = Attention(cfg_gqa, 0), Attention(cfg_mha, 0)
    assert gqa.k_proj.weight.shape == mha.k_proj.weight.shape
    mha.load_state_dict(gqa.state_dict())
    x = torch.randn(2, 13, 64)
    for causal in (True, False):
        torch.testing.assert_close(gqa(x, causal=causal), mha(x, causal=causal), atol=0, rtol=0)


def test_gqa_shares_kv_heads(make_cfg):
    """Query heads of one group see the same keys: GQA equals MHA whose K/V heads are repeated."""
    g = Attention(make_cfg("model.attention.attention_type=gqa", "model.n_kv_heads=2").model, 0)
    m = Attention(make_cfg("model.attention.attention_type=standard").model, 0)
    D = g.head_dim
    with torch.no_grad():
        m.q_proj.weight.copy_(g.q_proj.weight)
        m.o_proj.weight.copy_(g.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(g, name).weight.view(2, D, 64).repeat_interleave(2, dim=0).reshape(4 * D, 64)
            getattr(m, name).weight.copy_(w)
    x = torch.randn(2, 11, 64)
    torch.testing.assert_close(g(x, causal=True), m(x, causal=True), atol=1e-6, rtol=1e-5)


def test_frozen_projections(make_cfg):
    cfg = make_cfg()
    m = StackWiseLM(cfg.model)
    mlp = m.layers[0].mlp
    assert not mlp.gate.weight.requires_grad and not mlp.up.weight.requires_grad and mlp.down.weight.requires_grad
    opt_params = [p for p in m.parameters() if p.requires_grad]
    assert all(p is not mlp.gate.weight and p is not mlp.up.weight for p in opt_params)
    m(torch.randint(0, 96, (2, 9))).sum().backward()
    assert mlp.gate.weight.grad is None and mlp.up.weight.grad is None
    # regenerated bit-identically, in a fresh model and after being overwritten
    fresh = StackWiseLM(cfg.model).layers[0].mlp
    assert torch.equal(fresh.gate.weight, mlp.gate.weight) and torch.equal(fresh.up.weight, mlp.up.weight)
    saved = mlp.up.weight.detach().clone()
    with torch.no_grad():
        mlp.up.weight.zero_()
    m.regenerate_frozen()
    assert torch.equal(mlp.up.weight, saved)
    # different layers and seeds give different matrices
    assert not torch.equal(m.layers[1].mlp.up.weight, saved)
    other = SwiGLU(make_cfg("model.init_seed=1").model, 0)
    assert not torch.equal(other.up.weight, saved)
    assert set(m.seeded_parameter_names()) == {f"layers.{i}.mlp.{n}.weight" for i in (0, 1) for n in ("gate", "up")}


def test_partial_model_builds_the_same_layer(make_cfg):
    cfg = make_cfg()
    whole, part = StackWiseLM(cfg.model), StackWiseLM(cfg.model, layers=[1])
    for (n, a), b in zip(whole.layers[1].state_dict().items(), part.layers[1].state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(RuntimeError, match="layer 0 was not built"):
        part.run_layers(part.embed(torch.zeros(1, 4, dtype=torch.long)), 0, 2)


def test_rope_is_relative(make_cfg):
    """Scores of rotated q, k depend only on the position offset."""
    m = StackWiseLM(make_cfg().model)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    s1 = (m.rope(q, 3) * m.rope(k, 1)).sum()
    s2 = (m.rope(q, 10) * m.rope(k, 8)).sum()
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)


def test_mla_shapes_follow_deepseek(make_cfg):
    m = StackWiseLM(make_cfg("model.attention.attention_type=mla").model)
    a = m.layers[0].attn
    assert a.q_a_proj.weight.shape == (32, 64) and a.q_b_proj.weight.shape == (4 * 24, 32)
    assert a.kv_a_proj_with_mqa.weight.shape == (16 + 8, 64)
    assert a.kv_b_proj.weight.shape == (4 * (16 + 16), 16) and a.o_proj.weight.shape == (64, 4 * 16)
    assert a.scale == pytest.approx(24**-0.5)
    full_rank = StackWiseLM(make_cfg("model.attention.attention_type=mla", "model.attention.mla_rq=0").model)
    assert full_rank.layers[0].attn.q_proj.weight.shape == (96, 64)


def test_imported_frozen_projections_survive_save_and_load(make_cfg, tmp_path):
    """With frozen_mlp_seeded=false the frozen matrices are data: stored in checkpoints, never redrawn."""
    from stackwise.engine import checkpoint as ckpt

    cfg = make_cfg("model.frozen_mlp_seeded=false")
    m = StackWiseLM(cfg.model)
    with torch.no_grad():
        m.layers[0].mlp.up.weight.copy_(torch.randn_like(m.layers[0].mlp.up.weight))
    assert not m.layers[0].mlp.up.weight.requires_grad and m.seeded_parameter_names() == []
    path = str(tmp_path / "m.safetensors")
    ckpt.save_model(path, m, cfg)
    back, _ = ckpt.load_model(path)
    assert torch.equal(back.layers[0].mlp.up.weight, m.layers[0].mlp.up.weight)
    assert not back.layers[0].mlp.up.weight.requires_grad
