# SPDX-License-Identifier: MIT
"""Random-feature (kernel) attention: the reference (spec) and the Triton kernels."""
