# SPDX-License-Identifier: MIT
"""benchmarks/plan_70b.py parameter counts: one Llama-3-70B layer and the embeddings, from the config's shape."""

import importlib.util
import os

from stackwise.config import load_config
from stackwise.plan import plan_end_to_end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan_70b():
    spec = importlib.util.spec_from_file_location("plan_70b", os.path.join(ROOT, "benchmarks", "plan_70b.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_70b_param_counts():
    cfg = load_config(os.path.join(ROOT, "configs", "llama3_70b.yaml"))
    counts = _plan_70b().param_counts(cfg.model)
    # Llama-3-70B: d_model 8192, 64 heads / 8 kv heads of 128, d_ff 28672, two RMSNorms
    assert counts["layer"] == 855_654_400
    assert counts["layer"] == counts["layer_attention"] + counts["layer_mlp"] + 2 * 8192
    assert counts["embeddings"] == cfg.model.vocab_size * 8192 * (1 if cfg.model.tie_embeddings else 2)
    e2e = plan_end_to_end(cfg, micro_batch=1, seq_len=4096, world_size=1, zero_stage=3, offload_optimizer=False,
                          offload_params=False, dtype="bfloat16")
    assert counts["model"] == e2e.params["total"]
