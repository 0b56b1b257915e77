# SPDX-License-Identifier: MIT
"""What the README's "Reproducibility" section promises, each in fresh processes:

- token data (tokenizer.json, train.bin, val.bin) is byte-identical whatever RAYON_NUM_THREADS (the tokenizer's
  thread pool) and PYTHONHASHSEED are;
- a stage trained twice with the same seed and the same torch thread count gives bit-identical losses and weights.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = "".join(f"Verse {i}: and the {['sea', 'river', 'hill', 'town'][i % 4]} was {i * 7 % 13} days away.\n"
               for i in range(600))

BUILD = """
import hashlib, json, sys
from stackwise.config import DataConfig
from stackwise.data import prepare_text_data
td = prepare_text_data(DataConfig(dummy=False, text_files=[sys.argv[1]], data_dir=sys.argv[2]), 320)
print(json.dumps({k: hashlib.sha256(open(p, "rb").read()).hexdigest()
                  for k, p in (("tok", td.tokenizer_path), ("train", td.train_path), ("val", td.val_path))}))
"""

STAGE = """
import hashlib, json, sys, torch
from stackwise.config import load_config
from stackwise.engine import checkpoint as ckpt
from stackwise.engine.rundir import RunDir
from stackwise.engine.stages import train_stage
cfg = load_config(sys.argv[1], ["--train.out_dir=" + sys.argv[2], "--train.max_steps=8", "--train.log_interval=4",
                                "--data.dummy_sequences=64"])
r = train_stage(cfg, 0)
tensors = ckpt.load_tensors(RunDir(cfg).layer_ckpt(0))[0]
h = hashlib.sha256()
for k in sorted(tensors):
    h.update(k.encode()); h.update(tensors[k].float().numpy().tobytes())
print(json.dumps({"train": r.train_loss.hex(), "val": r.val_loss.hex(), "weights": h.hexdigest(),
                  "threads": torch.get_num_threads()}))
"""


def _run(code, args, **env):
    full = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_token_data_identical_across_thread_pools_and_hash_seeds(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    a = _run(BUILD, [str(corpus), str(tmp_path / "a")], RAYON_NUM_THREADS="1", PYTHONHASHSEED="1")
    b = _run(BUILD, [str(corpus), str(tmp_path / "b")], RAYON_NUM_THREADS="2", PYTHONHASHSEED="2")
    assert a == b and len(a) == 3


def test_stage_bit_identical_for_the_same_seed_and_thread_count(tmp_path):
    cfg = os.path.join(ROOT, "configs", "tiny.yaml")
    a = _run(STAGE, [cfg, str(tmp_path / "a")], OMP_NUM_THREADS="2", PYTHONHASHSEED="1")
    b = _run(STAGE, [cfg, str(tmp_path / "b")], OMP_NUM_THREADS="2", PYTHONHASHSEED="2")
    assert a["threads"] == 2 and a == b
