# SPDX-License-Identifier: MIT
"""Export the fused model of a run: ``python launchers/export.py --to hf RUN_DIR OUT_DIR [--dtype bfloat16]``.

``--to hf`` writes a Hugging Face folder (config.json, model.safetensors, tokenizer.json) that
``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads as LlamaForCausalLM (standard/gqa
attention) or DeepseekV2ForCausalLM (mla). The tokenizer is RUN_DIR/tokenizer.json when present, else
``--tokenizer``. Kernel-attention models are refused (no HF architecture computes random-feature attention).
All logic lives in ``stackwise.interop.hf.export_hf``.
"""

from __future__ import annotations

import argparse
import os

from stackwise.engine.checkpoint import load_fused
from stackwise.engine.cli import main_guard
from stackwise.engine.log import init_logging
from stackwise.interop import export_hf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, choices=["hf"], help="target format (hf: Hugging Face transformers)")
    p.add_argument("run_dir", help="run directory holding fused.safetensors (the train.out_dir of the run)")
    p.add_argument("out_dir", help="folder to write the exported checkpoint into")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the written tensors (default: the model's)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizers JSON to copy (default: RUN_DIR/tokenizer.json)")
    return p.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log = init_logging(0)
    model, _cfg = load_fused(args.run_dir)
    tokenizer = args.tokenizer
    if tokenizer is None and os.path.isfile(os.path.join(args.run_dir, "tokenizer.json")):
        tokenizer = os.path.join(args.run_dir, "tokenizer.json")
    if tokenizer is None:
        log.warning(
            "no tokenizer.json in %s and no --tokenizer: the export holds weights and config only", args.run_dir
        )
    export_hf(model, args.out_dir, tokenizer_path=tokenizer, dtype=args.dtype)
    print(args.out_dir)


if __name__ == "__main__":
    main()
