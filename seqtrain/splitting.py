"""Networks that already exist as modules, cut into seqtrain stages: torchvision models and any sequential module.

Two ways in:

* The command line: `--arch torchvision:NAME` trains a torchvision architecture (random initialisation, no
  pretrained weights) one stage at a time, with a pooling + linear auxiliary head on every stage. Stages begin
  at the architecture's natural boundaries (table below), or at the child names given by `--split`:

      python -m seqtrain.run --arch torchvision:resnet18 --image-size 32                # 4 stages
      python -m seqtrain.run --arch torchvision:resnet50 --split layer2.0,layer3.0,layer3.3,layer4

  The names are the model's own module names (`print(torchvision.models.resnet50())` shows them): the
  "trunk" is the model with its own pooling and classifier removed, flattened one level where a group is
  listed (ResNet layers into blocks, VGG / MobileNet `features` into layers). A group name such as `layer3`
  stands for its first element `layer3.0`. Stage k of a torchvision model is built alone: the full model is
  constructed on the meta device (no memory), stage k's modules are materialised and initialised as
  torchvision's constructors do, so weights of other stages never exist in the process.

      NAME (torchvision:NAME)       trunk: the names --split accepts      natural stages
      resnet18, 34, 50, 101         conv1 bn1 relu maxpool layer1.0 ..    stem+layer1 | layer2 | layer3 | layer4
      vgg11_bn, vgg16_bn            features.0 .. features.28 (.43)       5, each ending with a 2x2 max-pool
      mobilenet_v2                  features.0 .. features.18             5, each (but the first) beginning at
      mobilenet_v3_small            features.0 .. features.12             a stride-2 block, so each halves H, W

* The Python API, for any module whose forward applies its top-level children in order:

      from collections import OrderedDict
      import torch, torchvision, seqtrain
      net = torchvision.models.resnet18(num_classes=10)
      trunk = torch.nn.Sequential(OrderedDict(list(net.named_children())[:-2]))  # drop avgpool + fc: heads are ours
      stages = seqtrain.split(trunk, at=["layer2", "layer3", "layer4"], example=torch.randn(2, 3, 32, 32))
      # stages[k] is an nn.Sequential; stage k's output is stage k+1's input

  Each stage is an `nn.Sequential` holding the model's own child modules under their own names, so a stage's
  state_dict keys read like the model's. The contract (forward == children in order) cannot be read from
  the code; give `example=` and split() checks it on that input (see check_split()).

Small inputs work: ResNets and MobileNets pad their strided layers, so 16x16 reaches 1x1 and stays there;
VGG's five 2x2 max-pools need at least 32x32, and a UserError says so.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from seqtrain.errors import UserError

PREFIX = "torchvision:"


# --------------------------------------------------------------------------------------------------------
# Any module that is a sequence of named children


def split(model: nn.Module, at: list[str], example: torch.Tensor | None = None) -> list[nn.Sequential]:
    """`model`'s top-level children in order, cut before each name in `at` (the first child of stages 1, 2, ...).

    The modules are the model's own, not copies. The model's forward must equal applying its children in
    order (no torch.flatten, residual or skip between them); with `example` this is checked on that input.
    """
    at = [at] if isinstance(at, str) else list(at)
    children = list(model.named_children())
    if not children:
        raise UserError(f"split(): {type(model).__name__} has no child modules to split")
    names = [name for name, _ in children]
    groups = cut(names, at, f"split(at={at})", ", ".join(names))
    modules = dict(children)
    stages = [sequential([(name, modules[name]) for name in group]) for group in groups]
    if example is not None:
        check_split(model, stages, example)
    return stages


def cut(names: list[str], at: list[str], what: str, valid: str) -> list[list[str]]:
    """`names` cut before each of `at`; a UserError (one line, listing the `valid` names) for a bad cut."""
    index = {name: i for i, name in enumerate(names)}
    for name in at:
        if name not in index:
            raise UserError(f"{what}: there is no child named {name!r}; the children are: {valid}")
        if at.count(name) > 1:
            raise UserError(f"{what}: {name!r} is given twice; give each stage's first child once")
    positions = [index[name] for name in at]
    if positions != sorted(positions):
        raise UserError(f"{what}: names must follow the model's order ({', '.join(sorted(at, key=index.get))}); "
                        f"the children are: {valid}")
    if positions and positions[0] == 0:
        raise UserError(f"{what}: cutting before the first child {names[0]!r} leaves stage 0 empty; "
                        "name only where stages 1, 2, ... begin")
    bounds = [0, *positions, len(names)]
    return [names[a:b] for a, b in zip(bounds, bounds[1:])]


def sequential(named: list[tuple[str, nn.Module]]) -> nn.Sequential:
    """The modules in order under their names; dotted names ("layer3.1") nest, so state_dict keys keep them."""
    root = nn.Sequential()
    for name, module in named:
        parent, *path, leaf = [root, *name.split(".")]
        for part in path:
            # Consecutive names of one group share a container; nn.Sequential runs containers in insertion order.
            if next(reversed(parent._modules), None) != part:
                assert part not in parent._modules, f"{name}: the group {part} is not contiguous"
                parent.add_module(part, nn.Sequential())
            parent = parent._modules[part]
        parent.add_module(leaf, module)
    return root


def check_split(model: nn.Module, stages: list[nn.Module], example: torch.Tensor,
                rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Raise UserError unless the stages applied in order reproduce `model(example)` (both in eval mode)."""
    modes = {m: m.training for m in [model, *stages, *model.modules()]}
    model.eval()  # BatchNorm must not update its statistics here, and dropout must not draw
    for stage in stages:
        stage.eval()
    try:
        with torch.no_grad():
            want, got, diff = model(example), example, ""
            for k, stage in enumerate(stages):
                try:
                    got = stage(got)
                except RuntimeError as e:  # the model ran, so the composed stages are not its forward
                    got, diff = None, f"stage {k} fails: {str(e).splitlines()[0]}"
                    break
    finally:
        for m, training in modes.items():
            m.training = training
    if got is not None and got.shape != want.shape:
        diff = f"output shape {tuple(got.shape)}, not {tuple(want.shape)}"
    elif got is not None and not torch.allclose(got, want, rtol=rtol, atol=atol):
        diff = f"max difference {(got - want).abs().max():.3g}"
    if diff:
        raise UserError(f"split(): the stages do not reproduce {type(model).__name__}'s forward ({diff}): its "
                        "forward must apply its children in order; make steps such as torch.flatten modules "
                        "(nn.Flatten) and keep residual connections inside one child")


def stage_shapes(stages: list[nn.Module], in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Each stage's output shape (without the batch axis) for inputs of `in_shape`, computed on the meta device.

    Works on stages whose weights live anywhere: they are swapped for meta tensors for the call, so
    nothing is computed or allocated, and no BatchNorm statistic is touched.
    """
    x = torch.empty(2, *in_shape, device="meta")  # B = 2: BatchNorm in train mode refuses one value per channel
    shapes = []
    for stage in stages:
        state = {name: torch.empty_like(t, device="meta")
                 for name, t in [*stage.named_parameters(), *stage.named_buffers()]}
        x = functional_call(stage, state, (x,))
        shapes.append(tuple(x.shape[1:]))
    return shapes


# --------------------------------------------------------------------------------------------------------
# Torchvision architectures


@dataclass(frozen=True)
class Trunk:
    children: tuple[str, ...]  # the model's children that produce features, in forward order
    groups: tuple[str, ...]  # those of `children` that are flattened into their own children (ResNet layers)
    natural: tuple[str, ...]  # where stages 1, 2, ... begin by default


RESNET = Trunk(("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
               ("layer1", "layer2", "layer3", "layer4"), ("layer2", "layer3", "layer4"))
TORCHVISION = {  # dropped everywhere: the model's own avgpool and classifier / fc (seqtrain adds its own heads)
    "resnet18": RESNET,
    "resnet34": RESNET,
    "resnet50": RESNET,
    "resnet101": RESNET,
    "resnet152": RESNET,
    "wide_resnet50_2": RESNET,
    "wide_resnet101_2": RESNET,
    # VGG: a stage ends with each 2x2 max-pool (features.3, 7, 14, 21 in vgg11_bn); the last ends with the last.
    "vgg11_bn": Trunk(("features",), ("features",), ("features.4", "features.8", "features.15", "features.22")),
    "vgg16_bn": Trunk(("features",), ("features",), ("features.7", "features.14", "features.24", "features.34")),
    # MobileNets: a stage begins at each stride-2 inverted-residual block; the stem conv joins stage 0.
    "mobilenet_v2": Trunk(("features",), ("features",), ("features.2", "features.4", "features.7", "features.14")),
    "mobilenet_v3_small": Trunk(("features",), ("features",),
                                ("features.1", "features.2", "features.4", "features.9")),
}


def is_torchvision(arch: str) -> bool:
    return arch.startswith(PREFIX)


def meta_model(arch: str) -> nn.Module:
    """The whole torchvision model with every tensor on the meta device: structure and shapes, no memory."""
    import torchvision

    name = arch.removeprefix(PREFIX)
    if not is_torchvision(arch) or name not in TORCHVISION:
        raise UserError(f"--arch {arch} is not supported; choose one of: "
                        + ", ".join(PREFIX + n for n in TORCHVISION))
    with torch.device("meta"):
        return torchvision.models.get_model(name, weights=None)


def trunk_children(model: nn.Module, trunk: Trunk) -> list[tuple[str, nn.Module]]:
    out = []
    for name in trunk.children:
        child = model.get_submodule(name)
        if name in trunk.groups:
            out += [(f"{name}.{sub}", module) for sub, module in child.named_children()]
        else:
            out.append((name, child))
    return out


@functools.cache
def trunk_names(arch: str) -> tuple[str, ...]:
    """The names --split accepts for `arch`, in forward order (cached: config validation asks often)."""
    return tuple(name for name, _ in trunk_children(meta_model(arch), TORCHVISION[arch.removeprefix(PREFIX)]))


def name_range(names: tuple[str, ...]) -> str:
    """"conv1, bn1, relu, maxpool, layer1.0..layer1.1, ...": runs of one group shortened, for messages."""
    parts, run = [], []
    for name in [*names, ""]:
        if run and name.split(".")[0] == run[0].split(".")[0] and "." in name:
            run.append(name)
            continue
        if run:
            parts.append(run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}")
        run = [name]
    return ", ".join(parts)


@functools.lru_cache(maxsize=256)
def stage_name_groups(arch: str, split: str) -> tuple[tuple[str, ...], ...]:
    names = trunk_names(arch)
    at = [s for s in split.replace(" ", "").split(",") if s] or list(TORCHVISION[arch.removeprefix(PREFIX)].natural)
    # A group name stands for its first element, so "--split layer3" means "layer3.0".
    at = [next((n for n in names if n.startswith(a + ".")), a) if a not in names else a for a in at]
    valid = name_range(names) + " (a group such as layer3 or features means its first element)"
    return tuple(tuple(g) for g in cut(list(names), at, f"--split {split} of --arch {arch}", valid))


def check_torchvision(arch: str, split: str) -> None:
    """Raise UserError for an unsupported torchvision model or a --split that does not cut its trunk."""
    stage_name_groups(arch, split)


def torchvision_stage_names(arch: str, split: str) -> list[list[str]]:
    """The trunk's child names in each stage, e.g. [["conv1", ..., "layer1.1"], ["layer2.0", "layer2.1"], ...]."""
    return [list(g) for g in stage_name_groups(arch, split)]


def torchvision_num_stages(arch: str, split: str) -> int:
    return len(stage_name_groups(arch, split))


def meta_stages(arch: str, split: str) -> list[nn.Sequential]:
    model = meta_model(arch)
    modules = dict(trunk_children(model, TORCHVISION[arch.removeprefix(PREFIX)]))
    return [sequential([(name, modules[name]) for name in group]) for group in stage_name_groups(arch, split)]


def build_torchvision_stage(arch: str, split: str, k: int) -> nn.Sequential:
    """Stage k of a torchvision model on the CPU, initialised as torchvision does; no other stage is materialised.

    Deterministic under torch.manual_seed. The values differ from stage k of a model built whole with the
    same seed (the random stream is not advanced through stages 0..k-1), but their distribution is the same.
    """
    stages = meta_stages(arch, split)
    if not 0 <= k < len(stages):
        raise UserError(f"--stage {k}: --arch {arch} with --split {split!r} has stages 0 to {len(stages) - 1}")
    stage = stages[k].to_empty(device="cpu")  # memory for this stage only, uninitialised
    init_like_torchvision(stage)
    return stage


def torchvision_stage_shapes(arch: str, split: str, in_shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """The output shape (C, H, W) of every stage for inputs of `in_shape`, from a meta-device forward pass."""
    return list(_shapes(arch, split, tuple(in_shape)))


def torchvision_stage_channels(arch: str, split: str) -> list[int]:
    """The output channels of every stage (what its auxiliary head takes); they do not depend on the image size."""
    return [c for c, _, _ in torchvision_stage_shapes(arch, split, (3, 224, 224))]  # torchvision's own input size


@functools.lru_cache(maxsize=256)
def _shapes(arch: str, split: str, in_shape: tuple[int, int, int]) -> tuple[tuple[int, int, int], ...]:
    stages = meta_stages(arch, split)
    first_conv = next(m for m in stages[0].modules() if isinstance(m, nn.Conv2d))
    if in_shape[0] != first_conv.in_channels:
        raise UserError(f"--arch {arch} takes {first_conv.in_channels}-channel images, but the data has "
                        f"{in_shape[0]}; use a {first_conv.in_channels}-channel dataset or one of seqtrain's archs")
    shapes = fits(stages, in_shape)
    if shapes is None:
        c, h, w = in_shape
        # The smallest square side that fits, by bisection (every reduction here is monotonic in the input size).
        low, high = max(h, w), 4096
        while low + 1 < high:
            mid = (low + high) // 2
            low, high = (low, mid) if fits(stages, (c, mid, mid)) else (mid, high)
        raise UserError(f"--arch {arch} reduces {h}x{w} images below 1x1; it needs at least {high}x{high} "
                        f"(--image-size {high})")
    return tuple(shapes)


def fits(stages: list[nn.Module], in_shape: tuple[int, int, int]) -> list[tuple[int, int, int]] | None:
    """The stages' output shapes, or None when some layer's output would be smaller than 1x1."""
    try:
        shapes = stage_shapes(stages, in_shape)
    except RuntimeError as e:  # e.g. MaxPool2d on 1x1: "Output size is too small"
        if "too small" not in str(e) and "greater than actual input size" not in str(e):
            raise
        return None
    return shapes if all(min(s[1:]) >= 1 for s in shapes) else None


# --------------------------------------------------------------------------------------------------------
# Initialisation as torchvision's constructors do


def init_like_torchvision(module: nn.Module) -> None:
    """Initialise every parameter and buffer of `module` (e.g. fresh from to_empty) as torchvision would.

    First each layer's own reset_parameters(), as construction does (this also resets BatchNorm's running
    statistics); then the loop the ResNet, VGG and MobileNet constructors run over their modules. On the
    modules of their trunks the three loops agree: Conv2d weights kaiming_normal_(mode="fan_out") with
    ReLU gain (MobileNet's default nonlinearity "leaky_relu" with a=0 has the same gain, sqrt(2)), conv
    biases 0 (VGG, MobileNet; ResNet convs have none), BatchNorm / GroupNorm weight 1 and bias 0, Linear
    normal(0, 0.01) and bias 0 (VGG, MobileNet; ResNet's fc is never in a trunk). ResNet's
    zero_init_residual is False by default, so no BatchNorm weight starts at 0.
    """
    for m in module.modules():
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if own:
            # A layer without reset_parameters would keep to_empty's garbage; refuse rather than train on it.
            assert hasattr(m, "reset_parameters"), f"{type(m).__name__} has tensors but no reset_parameters()"
            m.reset_parameters()
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


__all__ = ["split", "check_split", "stage_shapes", "is_torchvision", "check_torchvision", "torchvision_num_stages",
           "torchvision_stage_names", "torchvision_stage_shapes", "torchvision_stage_channels",
           "build_torchvision_stage", "TORCHVISION"]
