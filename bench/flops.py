"""What a forward pass costs and what the machine can do: the two halves of MFU."""

from __future__ import annotations

import time

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, n: int) -> float:
    """Measured bf16 (fp32 on CPU) matmul FLOP/s on n × n GEMMs."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    reps, t0 = 20 if device.type == "cuda" else 3, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    """Forward FLOPs per real token of a BERT-style encoder at sequence length ``seq``."""
    c = model.config
    linear = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "encoder" in name
    )
    return 2.0 * linear + 4.0 * c.num_hidden_layers * seq * c.hidden_size
