# SPDX-License-Identifier: MIT
"""Hugging Face interop: StackWise -> HF folder -> transformers / StackWise, and HF Llama / DeepSeek -> StackWise.

Tolerance: fp32 logits of the two implementations agree to ``ATOL`` = 2e-5 (measured max abs diff 2.2e-6 on logits
up to 3.6; the residue is mostly the RoPE tables, computed in float64 by StackWise and in float32 by HF).
Round trips StackWise -> HF -> StackWise are bit-exact (atol 0). Every model is tiny and random; nothing
is downloaded. ``attention.backend=torch`` everywhere (see tests/conftest.py).
"""

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

from stackwise.interop import export_hf, import_hf
from stackwise.model import StackWiseLM


def _tf():
    """transformers, or skip the calling test (the [hf] extra is optional; export/import themselves never need it)."""
    return pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")


ATOL = 2e-5
TORCH = ["model.attention.backend=torch"]
NEG = torch.finfo(torch.float32).min


def _sw(make_cfg, attention_type, *extra):
    cfg = make_cfg(
        f"model.attention.attention_type={attention_type}", "model.norm_eps=1.0e-6", "model.init_std=0.1", *extra
    )
    model = StackWiseLM(cfg.model).eval()
    with torch.no_grad():
        # non-trivial norm weights, so a norm mapped to the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.add_(0.2 * torch.randn_like(p))
    return model


def _hf_load(path):
    model, info = _tf().AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"transformers reported loading problems: {bad}"
    return model.eval()


def _hf_mask(keep: torch.Tensor, causal: bool) -> torch.Tensor:
    """keep [B, T] bool (False = padding) -> additive 4D mask [B, 1, T, T] (0 visible, finfo.min hidden)."""
    B, T = keep.shape
    visible = keep[:, None, None, :].expand(B, 1, T, T)
    if causal:
        visible = visible & torch.ones(T, T, dtype=torch.bool).tril()
    return torch.zeros(B, 1, T, T).masked_fill(~visible, NEG)


def _assert_close(name, ref, out, atol=ATOL):
    diff = (ref - out).abs().max().item()
    assert diff <= atol, f"{name}: max abs diff {diff:.3e} > {atol:.1e} (|ref| max {ref.abs().max().item():.3f})"


def _randomize(hf_model):
    """HF initialises norms to ones; spread them so that a mis-mapped norm changes the output."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return hf_model.eval()


def _tiny_llama(tie=False):
    transformers = _tf()
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return _randomize(transformers.LlamaForCausalLM(cfg))


def _tiny_deepseek(version=2, q_lora_rank=32, **extra):
    transformers = _tf()
    Config = transformers.DeepseekV2Config if version == 2 else transformers.DeepseekV3Config
    Model = transformers.DeepseekV2ForCausalLM if version == 2 else transformers.DeepseekV3ForCausalLM
    cfg = Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        num_key_value_heads=4,
        first_k_dense_replace=2,
        max_position_embeddings=128,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **extra,
    )
    return _randomize(Model(cfg))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("attention_type", ["gqa", "standard", "mla"])
def test_export_loads_in_transformers_with_equal_logits(make_cfg, tmp_path, attention_type, tie):
    model = _sw(make_cfg, attention_type, f"model.tie_embeddings={str(tie).lower()}")
    export_hf(model, tmp_path)
    hf = _hf_load(tmp_path)
    expected = "DeepseekV2ForCausalLM" if attention_type == "mla" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected and hf.config.tie_word_embeddings == tie
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"], "staging files left behind"
    ids = torch.randint(0, 96, (2, 19))
    with torch.no_grad():
        _assert_close("causal logits", model(ids, attention_mode="causal"), hf(ids).logits)
        full = torch.ones_like(ids, dtype=torch.bool)
        bidir = hf(ids, attention_mask=_hf_mask(full, causal=False)).logits
        _assert_close("bidirectional logits", model(ids, attention_mode="bidirectional"), bidir)


def test_mla_rope_permutation_matters(make_cfg, tmp_path):
    # without the interleave permutation the DeepSeek model must disagree, or the test above proves nothing
    model = _sw(make_cfg, "mla")
    export_hf(model, tmp_path)
    hf = _hf_load(tmp_path)
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            attn = hf.model.layers[i].self_attn
            attn.q_b_proj.weight.copy_(block.attn.q_b_proj.weight)
            attn.kv_a_proj_with_mqa.weight.copy_(block.attn.kv_a_proj_with_mqa.weight)
        ids = torch.randint(0, 96, (1, 19))
        diff = (model(ids, attention_mode="causal") - hf(ids).logits).abs().max().item()
    assert diff > 100 * ATOL, f"unpermuted rope rows still match (diff {diff:.2e}): the check is blind"


@pytest.mark.parametrize("attention_type", ["gqa", "mla"])
def test_round_trip_is_exact(make_cfg, tmp_path, attention_type):
    model = _sw(make_cfg, attention_type, "model.frozen_mlp=[up]", "model.init_seed=7", "model.mask_token_id=5")
    export_hf(model, tmp_path)
    back = import_hf(tmp_path, overrides=TORCH)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} changed in the round trip"
    c = back.cfg
    assert (c.init_seed, c.frozen_mlp, c.mask_id, c.attention.attention_mode) == (7, ["up"], 5, "bidirectional")
    ids = torch.randint(0, 96, (2, 13))
    with torch.no_grad():
        for mode in ("causal", "bidirectional"):
            torch.testing.assert_close(back(ids, attention_mode=mode), model(ids, attention_mode=mode), atol=0, rtol=0)


def test_export_dtype_and_overwrite(make_cfg, tmp_path):
    model = _sw(make_cfg, "gqa")
    export_hf(model, tmp_path, dtype="bfloat16")
    export_hf(model, tmp_path, dtype=torch.bfloat16)  # a second export replaces the files in place
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_hf(model, tmp_path, dtype="int8")


def _left_padded(lengths, T):
    ids = torch.randint(0, 96, (len(lengths), T))
    keep = torch.arange(T)[None, :] >= (T - torch.tensor(lengths))[:, None]
    return ids.masked_fill(~keep, 0), keep


def _check_against_hf(hf, sw):
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        _assert_close("causal logits", hf(ids).logits, sw(ids, attention_mode="causal"))
        full = torch.ones_like(ids, dtype=torch.bool)
        bidir = hf(ids, attention_mask=_hf_mask(full, causal=False)).logits
        _assert_close("bidirectional logits", bidir, sw(ids, attention_mode="bidirectional"))
        # left padding: HF sees a padding mask (and the positions a generator would use); StackWise the bare rows
        ids, keep = _left_padded([17, 9], 17)
        pos = (keep.long().cumsum(-1) - 1).clamp_min(0)
        hf_causal = hf(ids, attention_mask=keep.long(), position_ids=pos).logits
        hf_bidir = hf(ids, attention_mask=_hf_mask(keep, causal=False), position_ids=pos).logits
        for row in range(2):
            real = ids[row, keep[row]][None]
            _assert_close(f"padded row {row} causal", hf_causal[row, keep[row]], sw(real, attention_mode="causal")[0])
            got = sw(real, attention_mode="bidirectional")[0]
            _assert_close(f"padded row {row} bidirectional", hf_bidir[row, keep[row]], got)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_import_llama_matches_hf(tmp_path, tie):
    hf = _tiny_llama(tie)
    hf.save_pretrained(tmp_path)
    sw = import_hf(tmp_path, overrides=TORCH).eval()
    assert sw.cfg.attention.attention_type == "gqa" and sw.cfg.n_kv_heads == 2 and sw.cfg.tie_embeddings == tie
    assert sw.cfg.norm_eps == 1e-5 and sw.cfg.rope_theta == 10000.0
    _check_against_hf(hf, sw)


@pytest.mark.parametrize(
    "version,q_lora_rank,extra",
    [
        pytest.param(2, 32, {}, id="v2-qlora"),
        pytest.param(2, None, {}, id="v2-fullq"),
        pytest.param(3, 32, {"rope_interleave": True}, id="v3-interleave"),
        pytest.param(3, 32, {"rope_interleave": False}, id="v3-half"),
    ],
)
def test_import_deepseek_matches_hf(version, q_lora_rank, extra):
    hf = _tiny_deepseek(version, q_lora_rank, **extra)
    # state dict + config object, the in-memory path
    sw = import_hf(hf.state_dict(), config=hf.config, overrides=TORCH).eval()
    a = sw.cfg.attention
    assert (a.attention_type, a.mla_rq, a.mla_rkv, a.qk_rope_head_dim) == ("mla", q_lora_rank or 0, 16, 8)
    _check_against_hf(hf, sw)


@pytest.mark.parametrize("frozen", [None, [], ["gate", "up", "down"]])
def test_imported_projections_are_tensors_and_stay_frozen(frozen):
    hf = _tiny_llama()
    sw = import_hf(hf.state_dict(), config=hf.config, frozen_mlp=frozen, overrides=TORCH)
    want = ["gate", "up"] if frozen is None else frozen
    assert sw.seeded_parameter_names() == [], "imported projections must be stored as tensors, not seeds"
    for i, block in enumerate(sw.layers):
        assert block.mlp.frozen_from_seed is False
        for name in ("gate", "up", "down"):
            w = getattr(block.mlp, name).weight
            assert w.requires_grad == (name not in want), f"layers.{i}.mlp.{name} requires_grad={w.requires_grad}"
            hf_w = hf.model.layers[i].mlp.get_submodule(f"{name}_proj").weight
            assert torch.equal(w, hf_w), f"layers.{i}.mlp.{name} is not the imported tensor"


def test_bad_inputs_name_the_tensor():
    hf = _tiny_llama()
    state, cfg = dict(hf.state_dict()), hf.config.to_dict()
    with pytest.raises(ValueError, match="unknown Hugging Face architecture 'GPT2LMHeadModel'"):
        import_hf(state, config={**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight'.*missing"):
        import_hf(missing, config=cfg)
    wrong = {**state, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(64, 64\), expected \(32, 64\)"
    ):
        import_hf(wrong, config=cfg)
    extra = {**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        import_hf(extra, config=cfg)
    with pytest.raises(ValueError, match="needs the Hugging Face config"):
        import_hf(state)
    with pytest.raises(NotImplementedError, match="RoPE scaling 'llama3'"):
        rope = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}
        import_hf(state, config={**cfg, "rope_parameters": rope})
    ds = _tiny_deepseek()
    with pytest.raises(NotImplementedError, match="mixture-of-experts"):
        import_hf(ds.state_dict(), config={**ds.config.to_dict(), "first_k_dense_replace": 1})


def test_kernel_attention_refuses_export(make_cfg, tmp_path):
    model = StackWiseLM(make_cfg("model.attention.attention_type=kernel").model)
    with pytest.raises(NotImplementedError, match="random-feature"):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_is_written_beside_the_weights(make_cfg, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(96)} | {"[MASK]": 96}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[MASK]"])
    tok.save(str(tmp_path / "tok.json"))
    model = _sw(make_cfg, "gqa")
    out = tmp_path / "hf"
    export_hf(model, out, tokenizer_path=tmp_path / "tok.json")
    hf_tok = _tf().AutoTokenizer.from_pretrained(out)
    assert hf_tok("w3 w5 [MASK]")["input_ids"] == [3, 5, 96]
    assert hf_tok.mask_token == "[MASK]"
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        export_hf(model, out, tokenizer_path=tmp_path / "nope.json")


def test_launcher_exports_a_run(make_cfg, tmp_path, monkeypatch):
    from stackwise.engine import checkpoint

    model = _sw(make_cfg, "gqa")
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(checkpoint, "load_fused", lambda run_dir: (model, None) if run_dir == str(run) else 1 / 0)
    monkeypatch.setattr(sys, "argv", ["export.py", "--to", "hf", str(run), str(tmp_path / "out")])
    launcher = os.path.join(os.path.dirname(__file__), "..", "..", "launchers", "export.py")
    runpy.run_path(launcher, run_name="__main__")
    back = import_hf(tmp_path / "out", overrides=TORCH)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    # a kernel-attention run is refused with one line and exit status 2
    model = StackWiseLM(make_cfg("model.attention.attention_type=kernel").model)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(launcher, run_name="__main__")
    assert done.value.code == 2


def test_stackwise_never_imports_transformers():
    code = "import sys, stackwise.interop, stackwise.model; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_top_level_import_hf_and_model_module_without_interop(make_cfg, tmp_path):
    import stackwise

    code = "import sys, stackwise.model; assert 'stackwise.interop' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    model = _sw(make_cfg, "mla")
    stackwise.export_hf(model, tmp_path)
    back = stackwise.import_hf(tmp_path, overrides=TORCH)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
