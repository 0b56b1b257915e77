# SPDX-License-Identifier: MIT
"""Export the fused model of a StackWise run to another ecosystem's checkpoint format.

    python launchers/export.py --to hf RUN_DIR OUT_DIR [--dtype bfloat16] [--tokenizer PATH]

``--to hf`` writes a Hugging Face folder (config.json, model.safetensors, tokenizer.json) that
``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads as LlamaForCausalLM (standard/gqa
attention) or DeepseekV2ForCausalLM (mla). The tokenizer is RUN_DIR/tokenizer.json when present, else
``--tokenizer``. All logic lives in ``stackwise.interop.hf.export_hf``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, choices=["hf"], help="target format (hf: Hugging Face transformers)")
    p.add_argument("run_dir", help="StackWise run directory holding the fused model")
    p.add_argument("out_dir", help="folder to write the exported checkpoint into")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors (default: the model's)")
    p.add_argument("--tokenizer", default=None, help="tokenizers JSON to copy (default: RUN_DIR/tokenizer.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[stackwise] %(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("stackwise")
    if not os.path.isdir(args.run_dir):
        log.error("run directory %r does not exist; pass the train.out_dir of a fused run", args.run_dir)
        return 2
    from stackwise.engine.checkpoint import load_fused
    from stackwise.interop import export_hf

    model, _cfg = load_fused(args.run_dir)
    tokenizer = args.tokenizer
    if tokenizer is None and os.path.isfile(os.path.join(args.run_dir, "tokenizer.json")):
        tokenizer = os.path.join(args.run_dir, "tokenizer.json")
    if tokenizer is None:
        log.warning("no tokenizer.json in %s and no --tokenizer: the export holds weights and config only", args.run_dir)
    try:
        export_hf(model, args.out_dir, tokenizer_path=tokenizer, dtype=args.dtype)
    except NotImplementedError as e:
        log.error("%s", e)
        return 1
    log.info("load it with transformers.AutoModelForCausalLM.from_pretrained(%r)", args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
