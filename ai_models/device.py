"""Which torch device a model runs on: the config says "auto", "cpu", "cuda" or "cuda:N"."""

from __future__ import annotations

import re

import torch

from ai_models.types import ModelError

_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(spec: str = "auto") -> str:
    """A concrete device string; "auto" picks the first GPU when one is usable, else the CPU.

    An explicit CUDA request on a machine without that GPU is an error rather than a silent CPU fallback,
    so a misconfigured node says so at start instead of running 50x slower.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    match = _CUDA.fullmatch(spec)
    if match is None:
        raise ModelError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available():
        raise ModelError(f"device {spec!r} requested but CUDA is not available")
    if index >= torch.cuda.device_count():
        raise ModelError(f"device {spec!r} requested but only {torch.cuda.device_count()} GPU(s) present")
    return f"cuda:{index}"
