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

The backward kernels are not differentiable themselves, so a second derivative through these ops
(``torch.autograd.grad(..., create_graph=True)`` and then another grad) is refused rather than silently
missing the kernel's second-order term: under create_graph the gradients come out hung on an error node
(``_first_order_only``) that raises when a later backward reaches it, as the Triton kernels' backward custom
ops (no autograd formula registered) raise. Compiled graphs have no double backward at all (AOTAutograd).
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
            if not torch.is_grad_enabled():  # the usual backward: no graph of the gradients is recorded
                return backward(ctx, bwd, *grads)
            with torch.no_grad():  # create_graph: nothing to record, the kernels are not differentiable
                out = backward(ctx, bwd, *grads)
            return _first_order_only(name, ctx, grads, out)

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


def _first_order_only(name: str, ctx, grad_outputs: tuple, grads):
    """``grads`` (a backward's result, computed without a graph) hung on a node that raises when differentiated.

    The node is linked to everything the gradients were computed from that requires grad: the incoming
    gradients and the saved tensors, so any later grad that depends on them runs into it.
    (torch.autograd.function.once_differentiable marks gradients only when an incoming one requires grad, on
    fresh leaves: d/dx of a LayerNorm's dL/dx, through its saved x, is still dropped in silence.) With
    nothing to link (linear_cross_entropy saves only gradients computed in its forward, whose dependence on
    the inputs does not show) it raises at once; a false alarm only where the second derivative is 0 anyway
    (rope under a constant upstream gradient)."""
    message = (f"{name}: the backward of this kernel is not differentiable (no double backward: create_graph=True "
               f"then another grad); use backend=\"torch\" for higher-order gradients")
    links = [t for t in (*grad_outputs, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not links:
        raise RuntimeError(message)
    single = not isinstance(grads, tuple)
    grads = (grads,) if single else grads
    marked = torch._C._functions.DelayedError(message, len(grads) + len(links))(*grads, *links)[:len(grads)]
    return marked[0] if single else marked
