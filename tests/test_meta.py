"""The quick meta-device path (seqtrain.meta) must not move a single byte of what `--plan`, `--stages auto` and
`--balance memory` count: it only skips torch's Python shape checks of BatchNorm and ReLU's backward."""

from __future__ import annotations

import pytest
import torch

from seqtrain import balance, meta
from seqtrain.config import Config
from seqtrain.data import input_shape
from seqtrain.layout import resolve_layout
from seqtrain.plan import plan


def described(outputs) -> list:
    """What a meta tensor is: shape, stride, dtype (None stays None)."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [None if t is None else (tuple(t.shape), t.stride(), t.dtype) for t in outputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_each_shortcut_returns_what_torch_returns(dtype, channels_last, training):
    x = torch.empty(4, 6, 5, 5, device="meta", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weight, bias, mean, var = (torch.empty(6, device="meta") for _ in range(4))
    args = (x, weight, bias, mean, var, training, 0.1, 1e-5)
    back = (torch.empty_like(x), x, weight, mean, var, mean, var, training, 1e-5)
    relu_back = (torch.empty_like(x), x, 0)
    masks = ([True, True, True], [True, False, False])

    def outputs() -> list:
        return [described(torch.ops.aten.native_batch_norm(*args)),
                *(described(torch.ops.aten.native_batch_norm_backward(*back, mask)) for mask in masks),
                described(torch.ops.aten.threshold_backward(*relu_back))]

    slow = outputs()
    with meta.quick_meta():
        assert outputs() == slow


PLANS = [dict(arch="resnet20", width=4, batch_size=16, stages="3"),
         dict(arch="resnet20", width=4, batch_size=16, stages="auto", memory_budget="3MB", checkpoint=True),
         dict(arch="resnet14", width=4, batch_size=8, stages="2", balance="memory", optimizer="adamw",
              channels_last=True, cache_views=2, head="aug"),
         dict(arch="torchvision:resnet18", image_size=32, batch_size=2, checkpoint=True)]


@pytest.mark.parametrize("settings", PLANS, ids=lambda s: s["arch"] + (" ckpt" if s.get("checkpoint") else ""))
def test_a_plan_is_the_same_with_and_without_the_shortcuts(settings, monkeypatch):
    def figures() -> dict:
        balance.measured_costs.cache_clear()
        balance.balanced_sizes.cache_clear()
        cfg = Config(**settings).validate()
        out = plan(cfg, resolve_layout(cfg, input_shape(cfg)))
        out.pop("disk")  # free space where the run would go: it moves with anything else writing there
        return out

    answered = []  # which shortcuts answered: a plan that met none of them would compare torch with itself
    counted = {op: (lambda *args, op=op, shortcut=shortcut, **kwargs: answered.append(op) or shortcut(*args, **kwargs))
               for op, shortcut in meta.SHORTCUTS.items()}
    monkeypatch.setattr(meta, "SHORTCUTS", counted)
    quick = figures()
    assert set(answered) == set(counted)
    monkeypatch.setattr(meta, "SHORTCUTS", {})  # every op through torch's own meta kernels
    assert figures() == quick
