# SPDX-License-Identifier: MIT
"""Packaging for StackWise: layer-wise training of Transformers.

torch is deliberately a lower bound only; install a pinned build first (see Makefile), otherwise pip
resolves an unpinned torch to a multi-GB CUDA wheel.
"""

from setuptools import find_packages, setup

setup(
    name="stackwise",
    version="0.1.0",
    description="Train Transformers layer by layer: cached activations, fusion, CLM/MLM/diffusion fine-tuning",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["stackwise", "stackwise.*"]),
    install_requires=[
        "torch>=2.1",
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
        # verifies every activation-shard read at disk speed (stackwise/data/activations.py); pinned
        "blake3==1.0.11",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "deepspeed": ["deepspeed>=0.14"],
        # flash-attn ships no wheel and needs CUDA to build; it is imported lazily by the benchmarks only.
        "flash": ["flash-attn"],
        # zstandard reads .zst corpora (data.text_files); .gz, .bz2 and .xz need only the standard library
        "data": ["tokenizers>=0.15", "zstandard==0.25.0"],
        "plot": ["matplotlib"],
        "hf": ["transformers>=4.56"],
        "dev": ["pytest>=7", "hypothesis", "tokenizers>=0.15", "zstandard==0.25.0", "matplotlib", "tensorboard>=2.15"],
    },
)
