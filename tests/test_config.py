# SPDX-License-Identifier: MIT
import glob
import os

import pytest

from stackwise.config import ConfigError, StackWiseConfig, config_from_dict, field_docs, iter_fields, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_defaults_are_the_srd_table():
    c = StackWiseConfig()
    m, a = c.model, c.model.attention
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff) == (128000, 4096, 8, 32, 8, 14336)
    assert (a.mla_rq, a.mla_rkv, a.attention_type, a.attention_mode) == (1024, 512, "standard", "bidirectional")
    assert (c.objective.mask_fraction_min, c.objective.mask_fraction_max) == (0.15, 0.90)
    assert (m.dropout, m.tie_embeddings, m.use_rope, c.objective.fine_tune_mode) == (0.0, True, True, "clm")
    assert (c.train.lr, c.train.batch_size, c.data.seq_len) == (1e-4, 4, 512)


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p) for p in PRESETS])
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.model.n_layers >= 1


def test_presets_exist():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"tiny.yaml", "small.yaml", "srd_default.yaml", "llama3_8b.yaml", "llama3_70b.yaml"} <= names
    c = load_config(os.path.join(ROOT, "configs", "llama3_70b.yaml"))
    assert (c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads) == (8192, 80, 64, 8)
    assert (c.model.d_ff, c.model.vocab_size) == (28672, 128256)


def test_precedence_defaults_yaml_cli(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.5\n  batch_size: 3\n")
    cfg = load_config(p, ["--train.lr=2.5e-1", "model.n_layers=4", "--model.frozen_mlp=[gate]"])
    assert cfg.train.lr == 0.25 and cfg.train.batch_size == 3 and cfg.model.n_layers == 4
    assert cfg.model.frozen_mlp == ["gate"] and cfg.train.weight_decay == 0.1


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.n_layerz=3"], "did you mean 'model.n_layers'"),
        (["trian.lr=1"], "did you mean 'train'"),
        (["model.n_layers=three"], "model.n_layers must be int"),
        (["model.tie_embeddings=3"], "model.tie_embeddings must be true or false"),
        (["model.attention.attention_type=gqa", "model.n_kv_heads=5"], "divisible by model.n_kv_heads (5)"),
        (["model.d_model=60", "model.n_heads=4"], "must be even when model.use_rope"),
        (["objective.mask_fraction_min=0.9", "objective.mask_fraction_max=0.2"], "mask_fraction_min (0.9) must be <="),
        (["model.attention.attention_type=flash"], "attention_type must be one of"),
        (["model.attention.kernel_feature_map=softmax", "model.attention.kernel_family=laplacian"], "trig"),
        (["data.seq_len=10000"], "data.seq_len (10000) must be <= model.max_seq_len"),
        (["train.lr=0"], "train.lr must be > 0"),
        (["train.lr=fast"], "train.lr must be float, got 'fast'"),
        (["data.dummy=false"], "neither data.corpus nor data.text_files is set"),
        (["data.dummy=false", "data.corpus=shakespear"], "did you mean 'shakespeare'"),
        (["data.dummy=false", "data.corpus=kjv", "data.text_files=[a.txt]"], "choose one"),
        (["data.dummy=false", "data.corpus=kjv", "data.val_fraction=0"], "no held-out split"),
        (["train.layers_per_stage=3", "model.n_layers=8"], "must divide model.n_layers (8)"),
        (["model.frozen_mlp=[gate, upp]"], "did you mean 'up'"),
        (["train.lr"], "must look like --section.key=value"),
    ],
)
def test_bad_input_names_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, overrides)
    assert needle in str(e.value), str(e.value)


def test_file_errors(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  d_modle: 8\n")
    with pytest.raises(ConfigError, match=r"did you mean 'model.d_model'.*typo.yaml"):
        load_config(typo)


def test_check_world():
    cfg = config_from_dict({"train": {"batch_size": 2, "grad_accum": 2, "global_batch_size": 8}})
    cfg.check_world(2)
    with pytest.raises(ConfigError, match="global_batch_size"):
        cfg.check_world(3)


def test_every_field_is_documented():
    missing = [name for name, _, _, doc in iter_fields() if not doc]
    assert not missing, f"fields without a docstring: {missing}"
    assert "Residual stream" in field_docs(type(StackWiseConfig().model))["d_model"]


def test_readme_field_table_is_the_config_docstrings():
    """Every row `python -m stackwise.config --fields` prints is in the README's table as printed (a default or
    its documented reason changed in the code shows up here, not as a stale README)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = set(f.read().splitlines())
    rows = [f"| `{name}` | {tp} | `{default}` | {doc} |" for name, tp, default, doc in iter_fields()]
    stale = [r.split(" | ")[0] for r in rows if r not in readme]
    assert not stale, f"README rows out of date (regenerate with python -m stackwise.config --fields): {stale}"
