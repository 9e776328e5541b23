"""SHA-256 fingerprints of tensors, per dtype, so a patch can recognise its base model in fp32, fp16 or bf16."""

from __future__ import annotations

import hashlib

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 over dtype, shape and raw bytes of a tensor."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    # bfloat16 has no numpy view; its 2-byte pattern is hashed through int16.
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    h.update(raw.numpy().tobytes())
    return h.hexdigest()


def fingerprints(t: torch.Tensor) -> dict[str, str]:
    """Fingerprints of ``t`` as loaded in each supported dtype: ``{"float32": sha, "float16": sha, ...}``."""
    return {name: tensor_sha256(t.to(dtype)) for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")
