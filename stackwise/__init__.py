# SPDX-License-Identifier: MIT
"""StackWise: train decoder Transformers one layer at a time, then fuse and fine-tune (CLM, MLM, diffusion).

Top-level names are imported lazily so ``python -m stackwise.config`` and light tools do not import torch.
"""

__version__ = "0.1.0"

__all__ = ["StackWiseConfig", "StackWiseLM", "export_hf", "import_hf", "load_config", "__version__"]


def __getattr__(name: str):
    if name in ("StackWiseConfig", "load_config"):
        from . import config

        return getattr(config, name)
    if name == "StackWiseLM":
        from .model import StackWiseLM

        return StackWiseLM
    if name in ("import_hf", "export_hf"):
        # Hugging Face interop lives in stackwise.interop; the model module never imports it
        from .interop import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'stackwise' has no attribute {name!r}")
