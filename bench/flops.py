"""What a forward pass costs and what the machine can do: the two halves of MFU."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from samplemix.scoring.onednn import linear


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype | None = None) -> float:
    """Measured matmul FLOP/s on n × n GEMMs in ``dtype`` (default: bf16 on CUDA, fp32
    on CPU). On CPU the better of MKL's (``@``) and oneDNN's (samplemix.scoring.onednn) fp32
    kernels: MKL runs AMD's AVX-512 CPUs at about half the rate oneDNN reaches."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    kernels = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32:
        kernels.append(lambda: linear(a, b, None))
    return max(_rate(gemm, 2 * n**3, 20 if device.type == "cuda" else 3) for gemm in kernels)


def _rate(gemm: Callable[[], object], flops: int, reps: int) -> float:
    """FLOP/s of ``gemm`` (``flops`` each call), after a warm-up, timed over ``reps`` calls."""
    for _ in range(3):
        gemm()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        gemm()
    sync()
    return flops * reps / (time.perf_counter() - t0)


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    """Forward FLOPs per real token of a BERT-style encoder at sequence length ``seq``."""
    c = model.config
    linear = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "encoder" in name
    )
    return 2.0 * linear + 4.0 * c.num_hidden_layers * seq * c.hidden_size
