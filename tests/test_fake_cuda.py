"""seqtrain with `--device cuda` on a machine without a GPU, under the fake-CUDA harness (tests/fakecuda.py):
a tensor left on the CPU, or in the wrong dtype, where the GPU path needs a CUDA float32 one raises here as
it would on the first GPU machine. Covered, through the public entry points only (`seqtrain.run.main` and
`seqtrain.train_stages`): stage 0 from raw images, a stage trained from the previous cache, the caching
passes, the final assembly, e2e with AdamW and channels-last, an int8 cache of 2 augmented views under
bfloat16 autocast, an interrupted stage resumed, and the Python API.

What cannot run under the harness, and why: `--workers` N > 0 (DataLoader worker processes and the
pinning thread need a real CUDA driver), torchrun (NCCL), and anything about values: accuracies, losses and
cached features are placeholders and zeros, so bit-identical resume, float16 overflow and the memory figures
are checked elsewhere (on the CPU) or by scripts/gpu_check.sh on a GPU.
"""

from __future__ import annotations

import json
import os
import signal
import weakref

import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import seqtrain
import seqtrain.stage
from seqtrain.files import load_torch
from seqtrain.run import main

import fakecuda
from conftest import tiny_flags

pytestmark = [pytest.mark.skipif(not fakecuda.AVAILABLE, reason="this torch has no FakeTensorMode"),
              pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")]

# Smaller than the tiny flags: every op on the fake GPU costs ~1 ms, so a ResNet-8 (a block each for stage
# 0 and stage 1's two) on 160 images, one epoch, keeps each run to a few seconds.
ON_FAKE_GPU = ("--device", "cuda", "--arch", "resnet8", "--n-train", "160", "--n-test", "40", "--max-epochs", "1")


def run_on_fake_gpu(tmp_path, *flags: str) -> tuple[int, fakecuda.FakeCuda]:
    with fakecuda.FakeCuda() as gpu:
        code = main(tiny_flags(tmp_path, *ON_FAKE_GPU, *flags))
    return code, gpu


def manifest(run_dir, k: int) -> dict:
    return json.loads((run_dir / f"stage_{k:02d}" / "cache" / "manifest.json").read_text())


def test_the_harness_raises_on_a_tensor_in_the_wrong_place_or_dtype():
    before = torch.cuda.is_available, torch.save, torch.Tensor.backward
    with fakecuda.FakeCuda():
        conv, lin = nn.Conv2d(3, 4, 3).to("cuda"), nn.Linear(4, 2).to("cuda")
        x = torch.randn(2, 4, device="cuda")
        assert lin(x).device.type == "cuda" and lin(x).dtype == torch.float32
        with pytest.raises(RuntimeError, match="devices"):
            lin(torch.randn(2, 4))  # a batch left on the CPU
        with pytest.raises(RuntimeError, match="one dtype"):
            lin(x.half())  # float16 features not converted
        with pytest.raises(RuntimeError, match="should be the same"):
            conv(torch.zeros(2, 3, 8, 8, device="cuda", dtype=torch.int8))  # int8 features not dequantized
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert lin(x).dtype == torch.bfloat16
    assert (torch.cuda.is_available, torch.save, torch.Tensor.backward) == before  # torch is itself again
    assert not isinstance(torch.ones(1), fakecuda.FakeTensor)


def test_stage_all_on_the_gpu(tmp_path, capsys):
    code, gpu = run_on_fake_gpu(tmp_path)
    out = capsys.readouterr().out
    assert code == 0 and "device cuda" in out
    assert gpu.seen["backward on the fake cuda"] > 0  # every stage trained on the GPU
    assert gpu.seen["saved a fake cuda tensor"] > 0  # checkpoints and blocks of GPU weights
    assert gpu.seen["numpy() of a fake cpu tensor"] > 0  # features brought back from the GPU to be cached
    for k in (0, 1):
        result = manifest(tmp_path / "run", k)["result"]
        assert result["train_memory"]["tensor_source"] == "cuda allocator"
        assert result["cache_memory"]["peak_tensor_mb"] == fakecuda.FAKE_BYTES / 2**20
    saved = load_torch(tmp_path / "run" / "final" / "model.pt")
    assert all(t.device.type == "cpu" for t in saved["model"].values())
    assert "final network: test acc" in out


def test_an_int8_cache_of_two_views_under_bfloat16(tmp_path):
    code, gpu = run_on_fake_gpu(tmp_path, "--cache-dtype", "int8", "--cache-views", "2", "--augment", "crop",
                                "--bf16")
    assert code == 0
    for k in (0, 1):  # stage 1 trains from int8 views, dequantized on the GPU, and caches its own
        m = manifest(tmp_path / "run", k)
        assert m["dtype"] == "int8" and m["views"] == 2
    assert (tmp_path / "run" / "final" / "results.json").exists()


def test_e2e_with_adamw_and_channels_last(tmp_path):
    code, gpu = run_on_fake_gpu(tmp_path, "--stage", "e2e", "--optimizer", "adamw", "--channels-last")
    assert code == 0 and gpu.seen["backward on the fake cuda"] > 0
    result = json.loads((tmp_path / "run" / "e2e" / "results.json").read_text())
    assert result["train_memory"]["tensor_source"] == "cuda allocator"


def test_an_interrupted_stage_resumes_on_the_gpu(tmp_path, capsys):
    steps = []

    def ctrl_c_at_step_3(optimizer, args, kwargs):  # a global hook: torch's, not seqtrain's
        if fakecuda.is_fake(optimizer.param_groups[0]["params"][0]):  # a GPU training step, not --plan's
            steps.append(1)
            if len(steps) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # training stops after this step and checkpoints

    hook = register_optimizer_step_post_hook(ctrl_c_at_step_3)
    try:
        code, _ = run_on_fake_gpu(tmp_path, "--stage", "0", "--max-epochs", "2")
        err = capsys.readouterr().err
        assert code == 130 and "interrupted" in err and len(steps) == 3, err
        ckpt = load_torch(tmp_path / "run" / "stage_00" / "checkpoint.pt")
        assert ckpt["rng_cuda"] is not None  # the GPU's RNG state is part of what resumes

        code, _ = run_on_fake_gpu(tmp_path, "--stage", "0", "--max-epochs", "2")
    finally:
        hook.remove()
    out = capsys.readouterr().out
    assert code == 0 and "resuming in epoch 1 after step 3" in out, out
    assert len(steps) > 3 and (tmp_path / "run" / "stage_00" / "block.pt").exists()  # trained on from there


def test_train_stages_on_the_gpu(tmp_path, monkeypatch):
    stages = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())]
    # What is alive on the device while each stage caches: a GPU peak must be the stage's own work.
    heads, alive = [], []
    build_head, write_shards = seqtrain.stage.build_head, seqtrain.stage.write_shards

    def spy_head(*a, **k):
        heads.append(weakref.ref(head := build_head(*a, **k)))
        return head

    def spy_cache(block, *a, **k):
        alive.append({"heads": sum(h() is not None for h in heads),
                      "gradients": sum(p.grad is not None for p in block.parameters()),
                      "earlier blocks on cuda": sum(p.device.type == "cuda" for s in stages if s is not block
                                                    for p in s.parameters())})
        return write_shards(block, *a, **k)

    monkeypatch.setattr(seqtrain.stage, "build_head", spy_head)
    monkeypatch.setattr(seqtrain.stage, "write_shards", spy_cache)
    with fakecuda.FakeCuda() as gpu:
        net = seqtrain.train_stages(stages, run_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"),
                                    n_train=160, n_test=40, max_epochs=1, batch_size=32, shard_mb=1, device="cuda")
    assert gpu.seen["backward on the fake cuda"] > 0
    assert alive == [{"heads": 0, "gradients": 0, "earlier blocks on cuda": 0}] * 2
    assert net.stages[1] is stages[1] and next(net.parameters()).device.type == "cpu"  # back on the CPU
    assert [s["feature_shape"] for s in net.results["stages"]] == [[4, 32, 32], [8, 16, 16]]
