"""The one tolerance table, and the rule every kernel test and benchmark correctness check uses.

Rule (after FlashAttention's tests): compute the truth (the reference in fp32, or fp64), the reference
in the test dtype, and the kernel. The kernel passes when

    max|kernel - truth| <= FACTOR * max|reference_in_dtype - truth| + FLOOR[dtype] * (1 + max|truth|)

i.e. the kernel may be at most FACTOR times as wrong as plain PyTorch already is in that dtype, plus a
small floor that covers the case where the reference happens to be exact (e.g. fp32 vs fp32). The
floors are about a few units in the last place of each dtype: fp32 eps is 1.2e-7, fp16 9.8e-4, bf16
7.8e-3; a kernel summing in a different order than the reference differs by a few eps times the
reduction depth, which the floor absorbs for rows of up to a few thousand elements.
"""

from __future__ import annotations

import torch

FACTOR = 2.0
FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def error_bound(truth: torch.Tensor, ref_in_dtype: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest acceptable max-abs error of a kernel whose output dtype is ``dtype``."""
    truth = truth.double()
    ref_err = (ref_in_dtype.double() - truth).abs().max().item() if truth.numel() else 0.0
    scale = truth.abs().max().item() if truth.numel() else 0.0
    return FACTOR * ref_err + FLOOR[dtype] * (1.0 + scale)


def assert_close(kernel_out: torch.Tensor, truth: torch.Tensor, ref_in_dtype: torch.Tensor, name: str = "output"):
    """Assert the kernel output obeys the rule above; the message gives both errors."""
    if kernel_out.shape != truth.shape:
        raise AssertionError(f"{name}: shape {tuple(kernel_out.shape)} != reference {tuple(truth.shape)}")
    dtype = kernel_out.dtype if kernel_out.dtype in FLOOR else torch.float32
    bound = error_bound(truth, ref_in_dtype, dtype)
    err = (kernel_out.double() - truth.double()).abs().max().item() if truth.numel() else 0.0
    ref_err = (ref_in_dtype.double() - truth.double()).abs().max().item() if truth.numel() else 0.0
    if not err <= bound:  # also catches nan
        raise AssertionError(f"{name}: max error {err:.3e} exceeds bound {bound:.3e} "
                             f"(reference's own error in {dtype}: {ref_err:.3e})")
