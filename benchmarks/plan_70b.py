# SPDX-License-Identifier: MIT
"""Plan a 70B-configuration stage on one 80 GB GPU against end-to-end training of the same 70B model.

``python benchmarks/plan_70b.py`` (no arguments): configs/llama3_70b.yaml (one 70B-shaped layer + tied 128k
embeddings/head, bf16, AdamW), world size 1, ZeRO-3, no offload. Prints per-part tables, the ratio of
end-to-end training state to the stage's, whether the stage fits 80 GB, the largest micro-batch that fits
at seq_len 4096 with and without activation checkpointing, and a JSON line. Planned, not measured.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stackwise.config import load_config  # noqa: E402
from stackwise.plan import GB, plan_end_to_end, plan_stage  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plots import memory_by_part  # noqa: E402

GPU_BYTES = 80 * GB


def _max_batch(cfg, **kw) -> int:
    b = 0
    while b < 512 and plan_stage(cfg, micro_batch=b + 1, **kw).total <= GPU_BYTES:
        b += 1
    return b


def param_counts(m) -> dict[str, int]:
    """Parameters of one standard/GQA layer and of the embeddings, from the shape alone (checkable by hand).

    layer = q (C*H*D) + k, v (C*Hkv*D each) + o (H*D*C) + gate, up, down (3*C*d_ff) + two RMSNorm weights (2*C);
    embeddings = vocab*C, once more when the head is not tied.
    """
    C, D = m.d_model, m.d_model // m.n_heads
    attn = 2 * C * m.n_heads * D + 2 * C * m.n_kv_heads * D
    layer = attn + 3 * C * m.d_ff + 2 * C
    emb = m.vocab_size * C * (1 if m.tie_embeddings else 2)
    return {"layer": layer, "layer_attention": attn, "layer_mlp": 3 * C * m.d_ff, "embeddings": emb,
            "model": m.n_layers * layer + emb + C}


def main() -> None:
    cfg = load_config(os.path.join(ROOT, "configs", "llama3_70b.yaml"))
    kw = dict(world_size=1, zero_stage=3, offload_optimizer=False, offload_params=False, dtype="bfloat16")
    stage = plan_stage(cfg, micro_batch=1, seq_len=4096, **kw)
    e2e = plan_end_to_end(cfg, micro_batch=1, seq_len=4096, **kw)
    e2e_frozen = plan_end_to_end(cfg, micro_batch=1, seq_len=4096, keep_frozen_mlp=True, **kw)
    counts = param_counts(cfg.model)
    print(f"params: one layer {counts['layer']:,} (attention {counts['layer_attention']:,}, "
          f"MLP {counts['layer_mlp']:,}, norms {2 * cfg.model.d_model:,}); embeddings {counts['embeddings']:,}; "
          f"model {counts['model']:,}")
    print(stage.table(unit=GB, unit_name="GB"), "\n")
    print(e2e.table(unit=GB, unit_name="GB"), "\n")
    ratio = e2e.training_state / stage.training_state
    ratio_frozen = e2e_frozen.training_state / stage.training_state
    fits = stage.total <= GPU_BYTES
    b_plain = _max_batch(cfg, seq_len=4096, **kw)
    b_ckpt = _max_batch(cfg, seq_len=4096, activation_checkpointing=True, **kw)
    print(f"stage peak {stage.total / GB:.1f} GB -> fits one 80 GB GPU: {fits} "
          f"(B=1, T=4096, no activation checkpointing, no offload)")
    print(f"largest micro-batch at T=4096 within 80 GB: {b_plain} (no checkpointing), {b_ckpt} (checkpointing)")
    print(f"end-to-end training state {e2e.training_state / 1e12:.2f} TB (all weights trained) vs stage "
          f"{stage.training_state / GB:.1f} GB: ratio {ratio:.1f}x; peak ratio {e2e.total / stage.total:.1f}x")
    print(f"with StackWise's frozen gate/up kept frozen end to end: {e2e_frozen.training_state / 1e12:.2f} TB, "
          f"ratio {ratio_frozen:.1f}x")
    png = memory_by_part({"70B stage": stage, "70B end-to-end": e2e},
                         os.path.join(ROOT, "benchmarks", "results", "plan_70b_memory.png"))
    if png:
        print(f"plot: {png}")
    print("JSON " + json.dumps({
        "param_counts": counts, "stage": json.loads(stage.to_json()), "end_to_end": json.loads(e2e.to_json()),
        "end_to_end_frozen_mlp": json.loads(e2e_frozen.to_json()), "stage_fits_80GB": fits,
        "training_state_ratio": ratio, "training_state_ratio_frozen_mlp": ratio_frozen,
        "max_micro_batch_T4096": b_plain, "max_micro_batch_T4096_ckpt": b_ckpt}))


if __name__ == "__main__":
    main()
