"""fp32 linear layers on oneDNN's matmul for CPU inference.

``nn.Linear`` runs MKL's ``addmm`` on CPU. On AMD CPUs MKL does not take its AVX-512
kernels: on a 2-core AVX-512 EPYC a 4,096 × 384 → 1,536 linear ran in 44.5 ms there
against 19.3 ms through oneDNN (``torch.ops.mkldnn._linear_pointwise``, the kernel
Inductor emits), and MiniLM's whole forward 1.71x faster with every linear swapped
(BENCHMARKS.md). oneDNN computes the same sums in another order: hidden states differ
by ~1e-5, rows do not depend on the other rows of a batch, and repeated calls give
the same bits, so every worker of a run computes the same outputs.

Only fp32 inference is rerouted: under autocast, with gradients, or for other dtypes
and devices the layer is an ordinary ``nn.Linear``.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


class OneDNNLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose fp32 CPU inference runs on oneDNN; same parameters, same
    state dict, same results within fp32 rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype is not torch.float32
            or self.weight.dtype is not torch.float32
            or x.device.type != "cpu"
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")
        ):
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def onednn_agrees() -> bool:
    """Whether this torch has oneDNN's linear and it gives ``F.linear``'s results on a
    MiniLM-shaped layer (with and without bias), so that a torch upgrade that drops or
    breaks the kernel falls back to ``nn.Linear`` instead of computing something else."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        torch.is_autocast_enabled("cpu")  # OneDNNLinear's own query (torch >= 2.4)
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((3, 5, 384), (96, 384), (96,)))
        with torch.inference_mode():
            for bias in (b, None):
                got = torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
                want = torch.nn.functional.linear(x, w, bias)
                if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                    return False
        return True
    except (AttributeError, RuntimeError, TypeError):  # no such op, or an older torch API
        return False


_agrees_here = functools.cache(onednn_agrees)  # checked once per process


def with_onednn_linears(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (changed in place) with every plain ``nn.Linear`` made a OneDNNLinear,
    where this torch's oneDNN linear agrees with ``F.linear`` (onednn_agrees); else
    ``model`` unchanged, with a warning. Subclasses of ``nn.Linear`` are left alone."""
    if not _agrees_here():
        log.warning("oneDNN's linear is missing or disagrees with F.linear: using nn.Linear")
        return model
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = OneDNNLinear
    return model
