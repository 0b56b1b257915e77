# SPDX-License-Identifier: MIT
"""Softmax attention: the reference (spec) and the Triton FlashAttention-2 style kernels."""
