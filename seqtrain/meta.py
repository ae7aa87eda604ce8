"""Training steps on the "meta" device in a fraction of the time: `--plan`, `--stages auto` and
`--balance memory` run whole networks there to count bytes, and most of that time went to BatchNorm.

On the meta device torch computes an op's output shapes with its Python decomposition into elementwise
primitives, each checked for shapes, strides and dtypes in Python: about 9 ms per BatchNorm forward and 6 ms
per backward, two thirds of `--plan --arch resnet110`. Here those ops answer with empty tensors of the shapes,
dtypes and memory formats the decomposition returns, which is all a meta tensor has. What autograd saves for
backward is decided above this level (by the op's derivative formula), so every byte counted stays the same
(tests/test_meta.py compares the two on every figure of `--plan`).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def computation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype BatchNorm computes its statistics in: float32 for half precision, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """aten.native_batch_norm's outputs: the normalized input, and the saved mean and inverse deviation, one
    per channel (off the CPU, evaluation returns the running statistics' copies in their place)."""
    stat = computation_dtype(input.dtype)
    if not training:
        return torch.empty_like(input), running_mean.to(stat, copy=True), running_var.to(stat, copy=True)
    channels = input.shape[1]
    return (torch.empty_like(input), input.new_empty(channels, dtype=stat), input.new_empty(channels, dtype=stat))


def batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps,
                        output_mask):
    """aten.native_batch_norm_backward's outputs: the input's gradient (always), and the weight's and bias's
    where `output_mask` asks for them, in the weight's dtype."""
    dtype = weight.dtype if weight is not None else input.dtype
    channels = input.shape[1]
    return (torch.empty_like(grad_out, dtype=input.dtype),
            input.new_empty(channels, dtype=dtype) if output_mask[1] else None,
            input.new_empty(channels, dtype=dtype) if output_mask[2] else None)


def threshold_backward(grad_output, self, threshold):
    """aten.threshold_backward (ReLU's backward): a gradient like the output's."""
    return torch.empty_like(grad_output)


SHORTCUTS = {aten.native_batch_norm.default: batch_norm,
             aten.native_batch_norm_backward.default: batch_norm_backward,
             aten.threshold_backward.default: threshold_backward}


class QuickMeta(TorchDispatchMode):
    """Answers SHORTCUTS' ops on meta tensors directly; everything else, and every real tensor, as usual."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shortcut = SHORTCUTS.get(func)
        if shortcut is not None and args[0].device.type == "meta":
            return shortcut(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


ACTIVE = threading.local()  # whether this thread runs inside quick_meta already


@contextlib.contextmanager
def quick_meta():
    """QuickMeta inside, once however deeply nested (a plan asks for block costs, which run their own steps)."""
    if getattr(ACTIVE, "on", False):
        yield
        return
    ACTIVE.on = True
    try:
        with QuickMeta():
            yield
    finally:
        ACTIVE.on = False
