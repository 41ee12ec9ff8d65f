"""One kernel op, two doors: a ``torch.library`` custom op for ``torch.compile`` and a plain
``torch.autograd.Function`` for eager mode, both running the same forward/backward implementations.

Why two: a custom op with a registered autograd formula costs ~35 us more per forward + backward in eager
mode than an autograd.Function (measured on a 2-core CPU, torch 2.13, for a (768, 128) LayerNorm whose
kernels take ~50 us), which is most of what a fused kernel saves on a small model. Under compilation
(``torch.compiler.is_compiling()``) the custom op is used, so graphs trace through its fake
implementation; in eager mode the Function calls the implementations directly, and without anything to
differentiate (no_grad, inference, no input requiring grad) the forward runs without the Function.

Used by the C++/CUDA backends (cpu_backend.py, cuda_backend.py):

    op = kernel_op("pyllm::norm_cpu", forward, forward_fake, setup, backward,
                   bwd_name="pyllm::norm_bwd_cpu", bwd=norm_bwd, bwd_fake=norm_bwd_fake)
    y, ... = op(x, ...)

``setup(ctx, inputs, output)`` saves what the backward needs; ``backward(ctx, bwd, *grads)`` returns one
gradient per input and calls ``bwd`` (the backward kernel: the raw function in eager mode, its custom op
under compilation). Without a ``bwd`` kernel, ``backward`` receives the forward in its place (an op whose
backward is itself with other arguments, like a rotation by -theta) or may ignore it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def kernel_op(name: str, forward: Callable, forward_fake: Callable, setup: Callable, backward: Callable, *,
              bwd_name: Optional[str] = None, bwd: Optional[Callable] = None,
              bwd_fake: Optional[Callable] = None) -> Callable:
    forward_op = torch.library.custom_op(name, forward, mutates_args=())
    forward_op.register_fake(forward_fake)
    if bwd is not None:
        bwd_op = torch.library.custom_op(bwd_name, bwd, mutates_args=())
        bwd_op.register_fake(bwd_fake)
    else:
        bwd, bwd_op = forward, forward_op
    torch.library.register_autograd(forward_op, lambda ctx, *grads: backward(ctx, bwd_op, *grads),
                                    setup_context=setup)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = forward(*args)
            setup(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, bwd, *grads)

    # Function.apply's Python wrapper (functorch bookkeeping) costs ~1.5 us per call; with no functorch
    # transform active the base class's apply does the same work.
    apply = super(torch.autograd.Function, Eager).apply

    def call(*args):
        if torch.compiler.is_compiling():
            return forward_op(*args)
        if torch._C._are_functorch_transforms_active():
            return Eager.apply(*args)
        if torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return apply(*args)
        # No graph to record (inference, no_grad, frozen inputs): the Function would only add ~4 us.
        return forward(*args)

    call.custom_op = forward_op  # for torch.library.opcheck in the tests
    return call
