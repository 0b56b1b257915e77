# SPDX-License-Identifier: MIT
"""Safetensors checkpoints, written atomically and verified on load.

Every file is written to ``<name>.tmp-<pid>``, fsynced, then renamed over the target, so a crash leaves
either the old file or the new one, never half of one. A SHA-256 of the tensor bytes (names, dtypes,
shapes and data, in sorted order) is stored in the safetensors metadata and checked on load, so a flipped
byte or a truncated file is refused with a message naming the file. No pickle anywhere: tensors are
safetensors, metadata is JSON/YAML text.

File kinds in a run directory (see ARCHITECTURE.md):
- ``layer_K.safetensors``: trained parameters of layer K (frozen seeded projections are not stored;
  their seed is ``model.init_seed`` in the embedded config); the file of a stage's last layer also holds
  the head (``norm.weight``, ``output.weight``), and ``layer_0`` holds ``tok_embeddings.weight``.
- ``stage_K.state.safetensors``: resumable training state (weights, AdamW moments, RNG, step).
- ``fused.safetensors`` / ``finetuned_<mode>.safetensors``: whole models.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._fs import atomic_write
from ..config import StackWiseConfig, config_from_dict, config_to_yaml
from ..model import StackWiseLM

FORMAT = "stackwise-1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run; the message names the file and the fix."""


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` (+ string metadata and a digest) to ``path``.

    Raises:
        CheckpointError: the disk is full or not writable (the previous file at ``path`` is untouched).
    """
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    clean, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().contiguous().cpu()
        # safetensors refuses aliased storage (tied weights): store a copy of any repeat
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        clean[k] = t.clone() if key in seen else t
        seen.add(key)
    meta["format"] = FORMAT
    meta["sha256"] = tensor_digest(clean)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=meta))
    except Exception as e:  # OSError (disk full), or safetensors refusing the data
        raise CheckpointError(
            f"could not write checkpoint {path}: {e}; free disk space or fix permissions (the previous file, if "
            f"any, is intact)"
        ) from None


def load_tensors(path: str, *, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load and verify a checkpoint written by :func:`save_tensors`.

    Raises:
        CheckpointError: missing, unreadable, truncated or corrupted file (digest mismatch).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged header or body
        raise CheckpointError(
            f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e}); delete it and retrain that "
            f"stage, or restore it from a backup"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a StackWise checkpoint (format {meta.get('format')!r}, want {FORMAT!r})")
    if tensor_digest(tensors) != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} failed its checksum (the file was modified or damaged); delete it and retrain "
            f"that stage, or restore it from a backup"
        )
    return tensors, meta


TOKENIZER_KEY = "tokenizer_sha256"


def run_tokenizer_path(cfg: StackWiseConfig) -> str:
    """The run's copy of its tokenizer (``RunDir(cfg).tokenizer``; text data only)."""
    return os.path.join(cfg.train.out_dir, "tokenizer.json")


def config_metadata(cfg: StackWiseConfig) -> dict[str, str]:
    """The config as YAML, plus ``tokenizer_sha256`` (see ``tokenizer_sha256``) when the run uses text data and
    its tokenizer is in the run directory; dummy-data runs have no tokenizer and no such field."""
    meta = {"config": config_to_yaml(cfg)}
    tok = run_tokenizer_path(cfg)
    if not cfg.data.dummy and os.path.isfile(tok):
        from ..data.text import tokenizer_sha256

        meta[TOKENIZER_KEY] = tokenizer_sha256(tok)
    return meta


def read_metadata(path: str) -> dict[str, str]:
    """A checkpoint's metadata alone (no tensors read, no checksum: use ``load_tensors`` for that)."""
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({e})") from None


def check_tokenizer(path: str, tokenizer_path: str | None, meta: dict[str, str] | None = None) -> None:
    """Refuse ``tokenizer_path`` when checkpoint ``path`` records a different tokenizer hash.

    Checkpoints without the field (dummy-data runs, or written before it existed) and a missing
    ``tokenizer_path`` pass: there is nothing to compare.
    """
    meta = read_metadata(path) if meta is None else meta
    want = meta.get(TOKENIZER_KEY)
    if not want or not tokenizer_path or not os.path.isfile(tokenizer_path):
        return
    from ..data.text import tokenizer_sha256

    got = tokenizer_sha256(tokenizer_path)
    if got != want:
        raise CheckpointError(
            f"tokenizer {tokenizer_path} (sha256 {got[:12]}) is not the one checkpoint {path} was trained with "
            f"(sha256 {want[:12]}): its vocab, merges or special tokens differ, so token ids would mean other "
            f"text. Use the tokenizer the checkpoint was trained with (restore the run's tokenizer.json from "
            f"the run's data directory, data.data_dir, or point data.tokenizer at it), or retrain with this one"
        )


def config_from_metadata(meta: dict[str, str], path: str) -> StackWiseConfig:
    import yaml

    try:
        return config_from_dict(yaml.safe_load(meta["config"]))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} holds no valid config ({e})") from None


def model_state(model: StackWiseLM, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The model's parameters (+ persistent buffers) without seeded frozen projections; tied weights once."""
    seeded = set(model.seeded_parameter_names())
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("output.weight", None)
    keep = {k: v for k, v in state.items() if k not in seeded}
    return {k: v for k, v in keep.items() if names is None or k in names}


def save_model(path: str, model: StackWiseLM, cfg: StackWiseConfig, extra: dict[str, str] | None = None) -> None:
    meta = config_metadata(cfg)
    meta["kind"] = "model"
    meta["seeded"] = json.dumps(model.seeded_parameter_names())
    meta.update(extra or {})
    save_tensors(path, model_state(model), meta)


def load_model(path: str, *, device: str | torch.device = "cpu",
               tokenizer: str | None = None) -> tuple[StackWiseLM, StackWiseConfig]:
    """Build the model a whole-model checkpoint (fused / fine-tuned) describes and load its weights.

    The tokenizer that will feed it (``tokenizer``, else a ``tokenizer.json`` beside the checkpoint, as in a
    run directory) must match the hash the checkpoint records, if it records one (``check_tokenizer``).
    """
    tensors, meta = load_tensors(path)
    check_tokenizer(path, tokenizer or os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.json"), meta)
    cfg = config_from_metadata(meta, path)
    model = StackWiseLM(cfg.model)
    load_into(model, tensors, path)
    return model.to(device), cfg


def load_into(model: StackWiseLM, tensors: dict[str, torch.Tensor], path: str, *, strict: bool = True) -> None:
    """Copy ``tensors`` into ``model``; seeded projections are regenerated, everything else must match."""
    own = model.state_dict()
    seeded = set(model.seeded_parameter_names())
    for name, t in tensors.items():
        if name not in own:
            raise CheckpointError(f"{path} holds tensor {name!r}, which this model does not have")
        if own[name].shape != t.shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)}, the model expects {tuple(own[name].shape)}; "
                f"the checkpoint was written for a different model config"
            )
    if strict:
        missing = [n for n in own if n not in tensors and n not in seeded and not _is_tied_alias(model, n)]
        if missing:
            raise CheckpointError(f"{path} lacks tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)
    model.regenerate_frozen()


def _is_tied_alias(model: StackWiseLM, name: str) -> bool:
    return model.cfg.tie_embeddings and name == "output.weight"


def load_fused(run_dir: str) -> tuple[StackWiseLM, StackWiseConfig]:
    """The fused model of a run directory (``run_dir/fused.safetensors``)."""
    path = os.path.join(run_dir, "fused.safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path} does not exist; fuse the trained layers first: python launchers/fuse.py --config "
            f"{os.path.join(run_dir, 'config.yaml')}"
        )
    return load_model(path)
