# SPDX-License-Identifier: MIT
"""Interop with other ecosystems. ``export_hf`` / ``import_hf``: Hugging Face Llama and DeepSeek-V2 checkpoints.

Neither needs ``transformers`` (checkpoints are plain JSON and safetensors); it is only needed to *run* the
exported folder, and is the optional extra ``pip install stackwise[hf]``.
"""

from .hf import export_hf, export_state_dict, import_hf

__all__ = ["export_hf", "export_state_dict", "import_hf"]
