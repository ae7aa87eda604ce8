"""A fake CUDA device for the tests: seqtrain's CUDA paths run with device "cuda" on a machine without a GPU.

    with FakeCuda() as gpu:
        assert main([..., "--device", "cuda"]) == 0
    assert gpu.seen["op on the fake GPU"] > 0

Under PyTorch's FakeTensorMode a tensor on "cuda" is a shape, a dtype and a device, with no values: every op
on it runs torch's own shape, dtype and device checks, so a tensor left on the CPU where a CUDA one is
expected, or in float16 or int8 where float32 is, raises as it would on a GPU. Ops on real CPU tensors alone
(the dataset, the loader's shards) still run for real. To let a whole run get through, the harness patches
torch only, never seqtrain, so that it drives the public entry points and survives their refactoring:

- torch.cuda's queries: one GPU that is always available, constant memory figures, a blank RNG state;
- `Tensor.backward` on a fake tensor gives each leaf a zero gradient on its own device (the autograd engine
  needs a real CUDA context), and optimizers skip their CUDA-graph check (it queries the current stream);
- `Tensor.pin_memory` copies (pinning needs a CUDA driver);
- `Module._apply` swaps parameters instead of their payloads (FakeTensorMode keeps weak references);
- `.item()` of a fake tensor is a placeholder (True, 0.5 or 1), and `.numpy()` zeros of its shape and dtype:
  a cache holds zeros, hashes and accuracies are of placeholders;
- `torch.save` writes zeros in place of fake tensors (recording their device), `torch.load` loads real ones.

It checks placement and dtypes, not numbers. It cannot check: NCCL, DataLoader workers (`--workers` N > 0:
their processes and the pinning thread need a real driver), pinned-memory timing, workspace sizes,
out-of-memory, determinism. tests/test_fake_cuda.py runs the pipeline under it.
"""

from __future__ import annotations

import collections
import contextlib

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

try:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
except ImportError:  # a torch without FakeTensorMode: tests/test_fake_cuda.py skips
    FakeTensor = FakeTensorMode = unset_fake_temporarily = None

AVAILABLE = FakeTensorMode is not None
aten = torch.ops.aten
FAKE_BYTES = 2**20  # what every torch.cuda memory query answers
# Matrix products take operands of one dtype on a GPU (cuBLAS) as on a CPU ("expected m1 and m2 to have the
# same dtype"), but their meta kernels, which FakeTensorMode runs, do not check it (torch 2.14): checked here.
# Convolutions check it in their meta kernels already.
ONE_DTYPE_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.mv.default,
                 aten.addmv.default}


def is_fake(t) -> bool:
    return FakeTensor is not None and isinstance(t, FakeTensor)


def names_cuda(a) -> bool:
    """An argument that puts an op's result on the GPU: `device="cuda"` or a fake CUDA tensor."""
    if isinstance(a, torch.device):
        return a.type == "cuda"
    if isinstance(a, str):
        return a.startswith("cuda")
    return False


def placeholder(t):
    """What `.item()` of a fake tensor returns: it has no value."""
    if t.dtype == torch.bool:
        return True
    return 0.5 if t.dtype.is_floating_point else 1


def realize(obj, seen: collections.Counter):
    """Fake tensors in `obj` as real CPU zeros of their shape and dtype, for torch.save."""
    if is_fake(obj):
        seen[f"saved a fake {obj.device.type} tensor"] += 1
        return torch.zeros(tuple(obj.shape), dtype=obj.dtype)
    if isinstance(obj, dict):
        return {k: realize(v, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(realize(v, seen) for v in obj)
    return obj


class FakeCuda:
    """Context manager: torch sees one CUDA GPU, and every tensor on it is fake. `seen` counts what happened."""

    def __init__(self):
        assert AVAILABLE, "this torch has no FakeTensorMode"
        self.seen: collections.Counter = collections.Counter()
        self.stack = contextlib.ExitStack()

    # ----------------------------------------------------------------------------------------------------
    # Patches of torch

    def patches(self) -> dict:
        seen = self.seen
        orig_save, orig_load, orig_backward = torch.save, torch.load, torch.Tensor.backward

        def count(name):
            return lambda *a, **k: seen.update([f"torch.cuda.{name}"])

        def backward(t, gradient=None, retain_graph=None, create_graph=False, inputs=None):
            if not is_fake(t):
                return orig_backward(t, gradient, retain_graph, create_graph, inputs)
            seen[f"backward on the fake {t.device.type}"] += 1
            done, todo = set(), [t.grad_fn]
            while todo:  # every leaf the graph reaches gets a zero gradient on its own device
                fn = todo.pop()
                if fn is None or id(fn) in done:
                    continue
                done.add(id(fn))
                if hasattr(fn, "variable"):  # an AccumulateGrad node: its leaf
                    leaf = fn.variable
                    leaf.grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad + torch.zeros_like(leaf)
                todo.extend(next_fn for next_fn, _ in fn.next_functions)

        def apply(module, fn, recurse=True):
            if recurse:
                for child in module.children():
                    child._apply(fn)
            for key, p in module._parameters.items():
                if p is not None:
                    with torch.no_grad():
                        q = fn(p)
                    if q is not p:
                        module._parameters[key] = nn.Parameter(q, p.requires_grad)
            for key, b in module._buffers.items():
                if b is not None:
                    module._buffers[key] = fn(b)
            return module

        def save(obj, f, *a, **k):
            return orig_save(realize(obj, seen), f, *a, **k)

        def load(*a, **k):
            with unset_fake_temporarily():
                return orig_load(*a, **k)

        def numpy(t, *a, **k):
            seen[f"numpy() of a fake {t.device.type} tensor"] += 1
            return torch.zeros(tuple(t.shape), dtype=t.dtype).numpy()  # a real CPU tensor: not in the fake mode

        cuda = torch.cuda
        out = {
            (cuda, "is_available"): lambda: True,
            (cuda, "device_count"): lambda: 1,
            (cuda, "current_device"): lambda: 0,
            (cuda, "set_device"): count("set_device"),
            (cuda, "_lazy_init"): lambda: None,
            (cuda, "is_bf16_supported"): lambda *a, **k: True,
            (cuda, "get_device_name"): lambda *a, **k: "fake CUDA GPU",
            (cuda, "synchronize"): count("synchronize"),
            (cuda, "reset_peak_memory_stats"): count("reset_peak_memory_stats"),
            (cuda, "memory_allocated"): lambda *a, **k: FAKE_BYTES,
            (cuda, "max_memory_allocated"): lambda *a, **k: FAKE_BYTES,
            (cuda, "memory_reserved"): lambda *a, **k: 2 * FAKE_BYTES,
            (cuda, "max_memory_reserved"): lambda *a, **k: 2 * FAKE_BYTES,
            (cuda, "get_rng_state"): lambda *a, **k: torch.zeros(16, dtype=torch.uint8),
            (cuda, "set_rng_state"): count("set_rng_state"),
            (cuda.amp.common, "amp_definitely_not_available"): lambda: False,
            (torch.Tensor, "backward"): backward,
            (torch.Tensor, "pin_memory"): lambda t, *a, **k: t.clone(),
            (nn.Module, "_apply"): apply,
            (torch, "save"): save,
            (torch, "load"): load,
            (FakeTensor, "numpy"): numpy,
        }
        for name in ("_accelerator_graph_capture_health_check", "_cuda_graph_capture_health_check"):
            if hasattr(torch.optim.Optimizer, name):  # torch < 2.6 has the second name only
                out[(torch.optim.Optimizer, name)] = lambda self: None
        return out

    def __enter__(self) -> FakeCuda:
        for (obj, name), value in self.patches().items():
            self.stack.callback(setattr, obj, name, getattr(obj, name))
            setattr(obj, name, value)
        self.stack.enter_context(LenientFake(self.seen, allow_non_fake_inputs=True))
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()


if AVAILABLE:

    class LenientFake(FakeTensorMode):
        """FakeTensorMode for ops that touch the GPU; ops on real CPU tensors alone run for real."""

        def __init__(self, seen: collections.Counter, **kw):
            super().__init__(**kw)
            self.seen, self.depth = seen, 0

        @property
        def avoid_device_init(self) -> bool:
            # FakeTensorMode asks torch.cuda.is_available(), which answers True here: never touch the driver.
            return True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is aten._local_scalar_dense.default and is_fake(args[0]):  # .item()
                self.seen[f"item() of a fake {args[0].device.type} tensor"] += 1
                return placeholder(args[0])
            flat = pytree.tree_leaves((args, kwargs))
            # Real, unless the op touches the GPU or is part of one that does: `.cpu()` of a fake tensor
            # decomposes into a CPU empty_strided and a copy, which must give a fake CPU tensor, not real garbage.
            if not self.depth and not any(is_fake(a) or names_cuda(a) for a in flat):
                return func(*args, **kwargs)
            self.seen["op on the fake GPU"] += 1
            if func in ONE_DTYPE_OPS:
                dtypes = sorted({str(a.dtype) for a in flat if isinstance(a, torch.Tensor)})
                if len(dtypes) > 1:
                    raise RuntimeError(f"{func}: expected operands of one dtype, got {', '.join(dtypes)}")
            self.depth += 1
            try:
                return super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                self.depth -= 1
