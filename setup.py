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
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "deepspeed": ["deepspeed>=0.14"],
        # flash-attn ships no wheel and needs CUDA to build; it is imported lazily by the benchmarks only.
        "flash": ["flash-attn"],
        "data": ["tokenizers>=0.15"],
        "plot": ["matplotlib"],
        "hf": ["transformers>=4.56"],
        "dev": ["pytest>=7", "hypothesis", "tokenizers>=0.15", "matplotlib", "tensorboard>=2.15"],
    },
)
