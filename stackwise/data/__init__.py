# SPDX-License-Identifier: MIT
"""Data: dummy token data for smoke tests (and, with the pipeline, text corpora and the activation store)."""

from .dummy import DummyTokens

__all__ = ["DummyTokens"]
