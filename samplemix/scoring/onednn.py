"""fp32 linear layers on oneDNN's matmul for CPU inference on AMD CPUs.

``nn.Linear`` runs MKL's ``addmm`` on CPU. On AMD CPUs MKL does not take its AVX-512
kernels: on a 2-core AVX-512 EPYC (Zen 5) a 4,096 × 384 → 1,536 linear ran in 44.5 ms
on one thread there against 19.3 ms through oneDNN (``_linear_pointwise``, the kernel
Inductor emits), and MiniLM's ``embed_texts`` 1.77x faster in fp32 with every linear
swapped (BENCHMARKS.md; 1.01–1.15x on an AVX2-only EPYC). oneDNN computes the same sums
in another order: hidden states differ by up to ~2e-5, embeddings by ~2e-7. Repeated
calls give the same bits, and so does a row whatever the other rows of its batch, for
batches of two or more rows; a single-row input (a classifier head on a one-document
batch) may differ from the same row in a larger batch by ~1e-6, as it does with MKL.

Only eager fp32 inference is rerouted: under autocast or torch.compile (Inductor picks
its own kernels), with gradients, or for other dtypes and devices the layer is an
ordinary ``nn.Linear``. Intel and Arm CPUs, where MKL (or the Arm build's BLAS) was
not measured against oneDNN, keep ``nn.Linear``.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by oneDNN; x (..., in), weight (out, in)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose eager fp32 CPU inference runs on oneDNN; same parameters,
    same state dict, same results within fp32 rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype is not torch.float32
            or self.weight.dtype is not torch.float32
            or x.device.type != "cpu"
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()  # Inductor cannot lower the unpacked op
        ):
            return super().forward(x)
        return linear(x, self.weight, self.bias)


def onednn_agrees() -> bool:
    """Whether this torch has oneDNN's linear and it gives ``F.linear``'s results on a
    MiniLM-shaped layer (with and without bias), so that a torch upgrade that drops or
    breaks the kernel falls back to ``nn.Linear`` instead of computing something else."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        torch.is_autocast_enabled("cpu")  # OneDNNLinear's own queries (torch >= 2.4)
        torch.compiler.is_compiling()
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((3, 5, 384), (96, 384), (96,)))
        with torch.inference_mode():
            for bias in (b, None):
                got, want = linear(x, w, bias), torch.nn.functional.linear(x, w, bias)
                if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                    return False
        return True
    except (AttributeError, RuntimeError, TypeError):  # no such op, or an older torch API
        return False


_agrees_here = functools.cache(onednn_agrees)  # checked once per process


@functools.cache
def _amd() -> bool:
    """Whether this is an AMD CPU (Linux's /proc/cpuinfo; False where it is absent)."""
    try:
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def with_onednn_linears(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (changed in place) with every plain ``nn.Linear`` made a OneDNNLinear
    on an AMD CPU where this torch's oneDNN linear agrees with ``F.linear``
    (onednn_agrees; else a warning); elsewhere ``model`` unchanged. Subclasses of
    ``nn.Linear`` are left alone."""
    if not _amd():
        return model
    if not _agrees_here():
        log.warning("oneDNN's linear is missing or disagrees with F.linear: using nn.Linear")
        return model
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = OneDNNLinear
    return model
