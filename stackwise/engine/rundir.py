# SPDX-License-Identifier: MIT
"""The run directory: its paths (:class:`RunDir`), its creation with the resolved config, and its masked views.

    runs/NAME/config.yaml              resolved config (a rerun with another model shape is refused)
    runs/NAME/layer_K.safetensors      trained layer K        runs/NAME/stage_K.state.safetensors  resume state
    runs/NAME/acts/views_{train,val}/  masked views           runs/NAME/acts/layer_K/{train,val}/  layer outputs
    runs/NAME/ds_stage_K/              DeepSpeed resume state runs/NAME/fsdp_stage_K/  FSDP2 resume state (DCP)
    (the end-to-end baseline and fine-tuning keep theirs as end_to_end.* / finetune_<mode>.* the same way)
    runs/NAME/fused.safetensors        fused model            runs/NAME/finetuned_<mode>.safetensors
    runs/NAME/metrics.jsonl            one JSON line per log  runs/NAME/tokenizer.json  (text data only)
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import torch
import yaml

from ..config import ConfigError, StackWiseConfig, config_from_dict, save_config
from ..data.activations import ActivationCacheError, build_views, read_manifest
from .distributed import barrier, pick_device  # noqa: F401  (re-exported: the single-process entry points use it)
from ..objective import Objective
from .evaluate import heldout_rows
from .log import logger, progress_bar, warn_once


# resumable-state directory prefix of each sharded backend (a new backend without an entry uses its own name)
BACKEND_DIRS = {"deepspeed": "ds", "fsdp": "fsdp"}


class RunDir:
    """Paths of one run directory (``train.out_dir``); no planning (that is :mod:`stackwise.engine.stages`)."""

    def __init__(self, cfg: StackWiseConfig):
        self.cfg = cfg
        self.root = cfg.train.out_dir

    def layer_ckpt(self, k: int) -> str:
        return os.path.join(self.root, f"layer_{k}.safetensors")

    def resume_state(self, name: str, backend: str) -> str:
        """Where ``backend`` keeps the resumable state of run part ``name`` (``stage_3``, ``end_to_end``,
        ``finetune_clm``): ``<name>.state.safetensors`` for single, ``ds_<name>/`` or ``fsdp_<name>/`` otherwise."""
        if backend == "single":
            return os.path.join(self.root, f"{name}.state.safetensors")
        return os.path.join(self.root, f"{BACKEND_DIRS.get(backend, backend)}_{name}")

    def stage_state(self, first: int) -> str:
        """The single backend's resumable state of the stage starting at layer ``first``."""
        return self.resume_state(f"stage_{first}", "single")

    def has_resume_state(self, name: str) -> bool:
        """Whether run part ``name`` was interrupted (some backend left resumable state behind)."""
        single = self.resume_state(name, "single")
        return os.path.exists(single) or any(os.path.isdir(os.path.join(self.root, f"{d}_{name}"))
                                             for d in BACKEND_DIRS.values())

    def remove_resume_state(self, name: str) -> None:
        """Delete every backend's resumable state of run part ``name`` (after it finished)."""
        for b in ("single", *BACKEND_DIRS):
            path = self.resume_state(name, b)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.isfile(path):
                os.remove(path)

    def views(self, split: str) -> str:
        return os.path.join(self.root, "acts", f"views_{split}")

    def acts(self, k: int, split: str) -> str:
        return os.path.join(self.root, "acts", f"layer_{k}", split)

    @property
    def fused(self) -> str:
        return os.path.join(self.root, "fused.safetensors")

    def finetuned(self, mode: str) -> str:
        return os.path.join(self.root, f"finetuned_{mode}.safetensors")

    @property
    def tokenizer(self) -> str:
        return os.path.join(self.root, "tokenizer.json")

    def cache_splits(self) -> tuple[str, ...]:
        """Splits a stage caches: both, or only val under engine.cache=recompute (train inputs are recomputed)."""
        return ("val",) if self.cfg.engine.cache == "recompute" else ("train", "val")

    def has_acts(self, k: int, splits: tuple[str, ...] | None = None) -> bool:
        splits = splits or self.cache_splits()
        return all(os.path.isfile(os.path.join(self.acts(k, s), "manifest.json")) for s in splits)


# sections that must agree between runs sharing a directory: they decide what the stored tensors mean
_LOCKED = ("model", "objective", "data")


def init_run_dir(cfg: StackWiseConfig, rank: int = 0) -> RunDir:
    """Create the run directory and write config.yaml, refusing a directory trained with another model/data."""
    run = RunDir(cfg)
    path = os.path.join(run.root, "config.yaml")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = yaml.safe_load(f)
            old_cfg = config_from_dict(old) if isinstance(old, dict) else None
        except (OSError, ValueError, yaml.YAMLError):  # ConfigError and UnicodeDecodeError are ValueErrors
            old_cfg = None
        if old_cfg is None:
            # config.yaml only guards the directory (every checkpoint embeds its own config): refuse to guess
            raise ConfigError(
                f"run config {path} is damaged or not a StackWise config, so this run directory cannot be checked "
                f"against your config; restore it, or delete it (it is rewritten from --config on the next run)"
            )
        new = cfg.to_dict()
        for section in _LOCKED:
            if old_cfg is not None and old_cfg.to_dict()[section] != new[section]:
                diff = [k for k in new[section] if old_cfg.to_dict()[section].get(k) != new[section][k]]
                raise ConfigError(
                    f"run directory {run.root} was created with a different {section} config (differs in "
                    f"{', '.join(f'{section}.{d}' for d in diff)}); use another train.out_dir, or the original "
                    f"settings (see {path})"
                )
    if rank == 0:
        os.makedirs(run.root, exist_ok=True)
        _remove_stale_temps(run.root)
        save_config(cfg, path)
    return run


def open_run(cfg: StackWiseConfig, env, *, views: bool) -> RunDir:
    """The run directory on every rank: rank 0 creates it (config.yaml and, with ``views``, the masked views)
    first; the others open it after a barrier."""
    run = init_run_dir(cfg, env.rank) if env.is_main else None
    if env.is_main and views:
        ensure_views(cfg, run)
    barrier()
    return run or init_run_dir(cfg, env.rank)


def _remove_stale_temps(root: str) -> None:
    """Delete temp files (``NAME.tmp-PID`` / ``NAME.tmp.PID``) left in ``root`` by processes that died mid-write.

    Readers never open them (every file is renamed into place when complete); this only frees their space.
    A temp file of a live process on this host is left alone.
    """
    for name in os.listdir(root):
        m = re.fullmatch(r".+\.tmp[-.](\d+)", name)
        if not m or not os.path.isfile(os.path.join(root, name)):
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            os.remove(os.path.join(root, name))
            logger.info("removed %s, left by an interrupted write", os.path.join(root, name))
        except OSError:
            pass


def ensure_views(cfg: StackWiseConfig, run: RunDir, rank: int = 0) -> None:
    """Build the data and the masked views (train and val) once; later stages reuse them."""
    have = all(os.path.isfile(os.path.join(run.views(s), "manifest.json")) for s in ("train", "val"))
    if have:
        _warn_old_heldout_rows(run, rank)
        return
    from ..data.datasets import build_datasets

    ds = build_datasets(cfg)
    tok_path = getattr(getattr(ds, "tokenizer", None), "path", None)
    if tok_path and rank == 0:
        shutil.copyfile(tok_path, run.tokenizer + ".tmp")
        os.replace(run.tokenizer + ".tmp", run.tokenizer)
    o = cfg.objective
    # the stages' objective draws the views (diffusion; realised rates are stored)
    objective = Objective.from_config(o, cfg.model, "diffusion")
    train = _head(ds.train, cfg.data.max_train_sequences) if cfg.data.max_train_sequences else ds.train
    # held-out views are masked uniformly whatever the training views' suffix share: every run is measured alike
    heldout = dataclasses.replace(objective, suffix_share=0.0)
    train_meta = {"suffix_share": objective.suffix_share} if objective.suffix_share else None
    for split, data, draws, seed, obj, meta in (
            ("train", train, o.mask_draws, cfg.train.seed, objective, train_meta),
            ("val", _heldout(ds.val, cfg.train.eval_sequences), 1, cfg.train.seed + 1, heldout,
             {"heldout_rows": HELDOUT_ROWS})):
        if len(data) == 0:
            raise ActivationCacheError(f"the {split} split has no sequences of data.seq_len={cfg.data.seq_len} tokens")
        bar = progress_bar(len(data) * draws, f"views {split}", rank)
        logger.info("drawing %d masked views of %d %s sequences (%d per sequence)", len(data) * draws, len(data),
                    split, draws)
        build_views(run.views(split), data, objective=obj, draws=draws, seed=seed,
                    shard_rows=cfg.engine.cache_shard_sequences,
                    meta=meta,
                    progress=(lambda d, t: bar.update(d - bar.n)) if bar else None)
        if bar:
            bar.close()


# how the held-out views' rows are chosen (recorded in their manifest): windows spread over the split
HELDOUT_ROWS = "spread"


def _warn_old_heldout_rows(run: RunDir, rank: int) -> None:
    """A run whose held-out views predate the spread rows keeps them (its stages were measured on them), but
    the other held-out figures (unigram, CLM, ELBO) now read the spread rows: say so once per process."""
    try:
        rows = read_manifest(run.views("val"), what="held-out views").get("heldout_rows")
    except ActivationCacheError:
        return  # a damaged manifest is refused, with its fix, where a stage reads it
    if rows != HELDOUT_ROWS and rank == 0:
        warn_once(f"the held-out views of {run.root} are the split's first train.eval_sequences windows (made "
                  f"before StackWise spread them over the split); its stage losses and the unigram, CLM and ELBO "
                  f"figures now read different rows. Delete {run.root} to measure the run again on one sample")


def _heldout(data, n: int) -> torch.utils.data.Subset:
    """The ``n`` held-out windows every evaluation reads (:func:`~stackwise.engine.evaluate.heldout_rows`)."""
    return torch.utils.data.Subset(data, heldout_rows(len(data), n))


def _head(data, n: int) -> torch.utils.data.Subset:
    """The first ``n`` items of ``data`` (all of them when it has fewer)."""
    return torch.utils.data.Subset(data, range(min(n, len(data))))
