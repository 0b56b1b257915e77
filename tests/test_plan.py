# SPDX-License-Identifier: MIT
"""Tests of stackwise.plan: parameter counts vs real models, activation formulas vs saved tensors, scaling, 70B."""

import os
import time

import pytest
import torch

from stackwise.config import load_config
from stackwise.model import StackWiseLM
from stackwise.plan import layer_activation_bytes, plan_end_to_end, plan_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = ["standard", "gqa", "mla", "kernel"]


@pytest.mark.parametrize("attention_type", TYPES)
def test_param_counts_match_real_model(make_cfg, attention_type):
    cfg = make_cfg(f"model.attention.attention_type={attention_type}")
    real = StackWiseLM(cfg.model)
    e2e = plan_end_to_end(cfg, keep_frozen_mlp=True, device="cpu")
    assert e2e.params["total"] == real.num_params(), attention_type
    assert e2e.params["trainable"] == real.num_params(trainable_only=True), attention_type
    stage = plan_stage(cfg, layer=1, device="cpu")
    one = StackWiseLM(cfg.model, layers=[1])
    assert stage.params["total"] == one.num_params()
    assert stage.params["trainable"] == one.num_params(trainable_only=True)


def _saved_bytes(model, k, h):
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    owned = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.run_layers(h, k, k + 1)
    return sum(v for key, v in seen.items() if key not in owned)


@pytest.mark.parametrize("attention_type", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_formula_matches_saved_tensors(make_cfg, attention_type, dtype):
    cfg = make_cfg(f"model.attention.attention_type={attention_type}")
    model = StackWiseLM(cfg.model, layers=[1]).to(dtype)
    B, T = 2, 32
    for first in (True, False):
        h = torch.randn(B, T, cfg.model.d_model, dtype=dtype, requires_grad=not first)
        got = _saved_bytes(model, 1, h)
        want = layer_activation_bytes(cfg, B, T, 4 if dtype == torch.float32 else 2, "cpu", first=first)
        # norm weights' fp32 copies and RoPE-free constants are left out of the formula: allow 3%
        assert abs(want - got) <= 0.03 * got, f"{attention_type} first={first}: planned {want}, saved {got}"


def test_bytes_scale_with_dtype_world_zero_offload(make_cfg):
    cfg = make_cfg()
    fp32 = plan_stage(cfg, dtype="float32")
    bf16 = plan_stage(cfg, dtype="bfloat16")
    assert fp32.parts["trainable_params"] == 2 * bf16.parts["trainable_params"]
    assert fp32.parts["optimizer_state"] * 12 == bf16.parts["optimizer_state"] * 8  # master weights in bf16
    w1, w4 = plan_end_to_end(cfg, world_size=1), plan_end_to_end(cfg, world_size=4)
    for part in ("trainable_params", "grads", "optimizer_state"):
        assert w4.parts[part] == -(-w1.parts[part] // 4), part
    z1 = plan_end_to_end(cfg, world_size=4, zero_stage=1)
    assert z1.parts["trainable_params"] == w1.parts["trainable_params"]
    assert z1.parts["grads"] == w1.parts["grads"]
    assert z1.parts["optimizer_state"] == w4.parts["optimizer_state"]
    off = plan_end_to_end(cfg, offload_optimizer=True, offload_params=True)
    assert off.parts["optimizer_state"] == 0 and off.parts["trainable_params"] == 0
    assert off.host["optimizer_state"] == w1.parts["optimizer_state"]
    small, big = plan_stage(cfg, micro_batch=1), plan_stage(cfg, micro_batch=4)
    assert big.parts["activations"] > 3 * small.parts["activations"]
    assert big.parts["logits_loss"] == 4 * small.parts["logits_loss"]


def test_70b_stage_fits_80gb_end_to_end_exceeds_1tb():
    cfg = load_config(os.path.join(ROOT, "configs", "llama3_70b.yaml"))
    plan_stage(cfg)  # first call pays lazy imports
    t0 = time.perf_counter()
    stage = plan_stage(cfg, dtype="bfloat16", micro_batch=1, seq_len=4096, offload_optimizer=False)
    elapsed = time.perf_counter() - t0
    e2e = plan_end_to_end(cfg, dtype="bfloat16", micro_batch=1, seq_len=4096, offload_optimizer=False)
    assert elapsed < 1.0, f"planning a 70B-shaped layer took {elapsed:.2f} s"
    assert stage.total < 80e9, stage.table()
    assert e2e.training_state > 1e12, e2e.table()
    assert e2e.params["total"] > 69e9
    assert '"kind": "stage"' in stage.to_json()


@pytest.mark.parametrize(
    "kwargs, name",
    [({"world_size": 0}, "world_size"), ({"dtype": "fp8"}, "dtype"), ({"zero_stage": 4}, "zero_stage"),
     ({"micro_batch": 0}, "micro_batch"), ({"device": "tpu"}, "device"), ({"layer": 9}, "layer")],
)
def test_bad_inputs_name_the_argument(make_cfg, kwargs, name):
    with pytest.raises(ValueError, match=name):
        plan_stage(make_cfg(), **kwargs)


def test_offload_params_needs_zero3(make_cfg):
    with pytest.raises(NotImplementedError, match="zero_stage"):
        plan_end_to_end(make_cfg(), zero_stage=2, offload_params=True)


def test_stage_plan_counts_overlap_window_and_global_head(make_cfg):
    """A stage with train.stage_overlap (window w) and train.global_head g trains 1 + min(w, k) + g blocks."""
    plain = plan_stage(make_cfg("model.n_layers=4"), layer=2, device="cpu", dtype="float32", zero_stage=0)
    cfg = make_cfg("model.n_layers=4", "train.stage_overlap=true", "train.overlap_layers=2", "train.global_head=1")
    wide = plan_stage(cfg, layer=2, device="cpu", dtype="float32", zero_stage=0)
    head = cfg.model.vocab_size * cfg.model.d_model + cfg.model.d_model
    per_layer = plain.params["trainable"] - head
    assert wide.params["trainable"] == 4 * per_layer + head
    assert wide.total > plain.total and wide.flops_per_token > 3 * plain.flops_per_token / 2
    assert plan_stage(cfg, device="cpu", dtype="float32", zero_stage=0).settings["layer"] == 2  # full window
    one = plan_stage(cfg, layer=1, device="cpu", dtype="float32", zero_stage=0)  # window holds layer 0 only
    assert one.params["trainable"] == 3 * per_layer + head
