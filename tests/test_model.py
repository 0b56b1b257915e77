# SPDX-License-Identifier: MIT
import pytest
import torch

from stackwise.data import DummyTokens
from stackwise.model import StackWiseLM
from stackwise.objective import mask_tokens, masked_loss


def test_tied_embeddings(make_cfg):
    m = StackWiseLM(make_cfg().model)
    assert m.output.weight is m.tok_embeddings.weight
    u = StackWiseLM(make_cfg("model.tie_embeddings=false").model)
    assert u.output.weight is not u.tok_embeddings.weight
    assert u.num_params() == m.num_params() + 97 * 64


def test_layerwise_pieces_equal_forward(make_cfg):
    m = StackWiseLM(make_cfg().model).eval()
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        h = m.run_layers(m.embed(ids), 0, 1, "causal")
        out = m.head(m.run_layers(h, 1, 2, "causal"))
        torch.testing.assert_close(out, m(ids, attention_mode="causal"), atol=0, rtol=0)


def test_bad_token_ids(make_cfg):
    m = StackWiseLM(make_cfg().model)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, model.vocab_size=97\).*max 97"):
        m(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        m(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="int64/int32"):
        m(torch.rand(1, 3))
    with pytest.raises(ValueError, match="attention_mode must be one of"):
        m(torch.tensor([[1, 2]]), attention_mode="sideways")


@pytest.mark.parametrize("attention_type", ["gqa", "mla", "kernel"])
def test_a_few_steps_lower_the_loss(make_cfg, attention_type):
    cfg = make_cfg(f"model.attention.attention_type={attention_type}")
    m = StackWiseLM(cfg.model)
    data = DummyTokens(cfg.model.vocab_size, cfg.data.seq_len, 64, seed=0, mask_id=cfg.model.mask_id)
    batch = torch.stack([data[i] for i in range(16)])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        masked, tgt, lm = mask_tokens(batch, "diffusion", g, mask_id=cfg.model.mask_id, vocab_size=97)
        loss = masked_loss(m(masked), tgt, lm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    # batch-to-batch noise of these means is ~0.05 nats; ln(96) = 4.56 is the uniform loss
    assert last < first - 0.25, f"loss did not fall: first {first:.3f}, last {last:.3f}"


def test_dummy_data_is_seeded_and_structured():
    d1, d2 = DummyTokens(50, 20, 8, seed=1), DummyTokens(50, 20, 8, seed=1)
    assert torch.equal(d1[3], d2[3]) and not torch.equal(d1[3], d1[4])
    x = d1[0]
    assert (x != 49).all() and x.max() < 50
    # every transition is one of the 4 successors of the previous token
    for a, b in zip(x[:-1].tolist(), x[1:].tolist()):
        assert b in d1.succ[a].tolist()


def test_residual_init_depth_scales_output_projections(make_cfg):
    """model.residual_init_depth=L initialises o_proj / MLP down with std init_std / sqrt(2 L) (0: n_layers)."""
    from stackwise.model import StackWiseLM

    def stds(*over):
        m = StackWiseLM(make_cfg("model.n_layers=4", "model.d_model=128", "model.d_ff=512", *over).model)
        b = m.layers[1]
        return float(b.attn.o_proj.weight.std()), float(b.mlp.down.weight.std()), float(b.attn.q_proj.weight.std())

    o4, d4, q4 = stds()
    o1, d1, q1 = stds("model.residual_init_depth=1")
    assert abs(o4 / (0.02 / 8 ** 0.5) - 1) < 0.05 and abs(d4 / (0.02 / 8 ** 0.5) - 1) < 0.05
    assert abs(o1 / (0.02 / 2 ** 0.5) - 1) < 0.05 and abs(d1 / (0.02 / 2 ** 0.5) - 1) < 0.05
    assert q1 == q4  # only the residual outputs change
