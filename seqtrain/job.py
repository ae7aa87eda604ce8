"""One seqtrain job, from a validated Config to its results: the one orchestrator of the command line
(run.py) and of the Python API (api.py).

    layout = resolve(cfg)                          # the stage cut and every check that needs the network
    outcome = run_job(cfg, layout, "all")          # or a stage number, or "e2e"

`resolve` is the single step that turns settings into derived values (the stage layout and the hash every
cache carries); everything after it takes the layout it returns. `run_job` checks every input before it
writes anything, then holds the run directory's lock while the stages run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from seqtrain import distributed
from seqtrain.allocator import release_freed_memory
from seqtrain.augment import augment_for
from seqtrain.cache import require_filter
from seqtrain.config import Config
from seqtrain.data import RawData, input_shape, load_raw
from seqtrain.e2e import run_e2e
from seqtrain.errors import UserError
from seqtrain.layout import StageLayout, resolve_layout
from seqtrain.log import log
from seqtrain.pipeline import check_inputs, run_all
from seqtrain.rundir import RunDir, RunLock, collect_results, prepare_run_dir, write_run_config
from seqtrain.stage import run_stage


def resolve(cfg: Config) -> StageLayout:
    """The stage layout of a validated Config, with the checks that need torch; UserError naming the flag."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return resolve_layout(cfg, input_shape(cfg))


@contextlib.contextmanager
def deterministic_kernels(enabled: bool):
    """--deterministic: every CUDA kernel seqtrain runs picks a deterministic algorithm (cuDNN's convolution
    backward is not by default), so training is a function of (seed, data) on a GPU as it is on a CPU. An op
    with no deterministic CUDA kernel warns instead of failing (a head's adaptive pooling of a side its size
    does not divide: models.AvgPool pools every other side deterministically). Torch's settings are put back
    afterwards: a Python caller's process is left as it was."""
    if not enabled:
        yield
        return
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition, read when it starts
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


@dataclass
class Outcome:
    results: dict  # the summary's figures (rundir.collect_results)
    raw: RawData | None  # the dataset this process loaded (its normalisation statistics go into model.pt)


def run_job(cfg: Config, layout: StageLayout, stage: int | str, blocks: list[torch.nn.Module] | None = None,
            e2e_checkpoint: bool = False, raw: RawData | None = None) -> Outcome:
    """Run `stage` ("all", "e2e" or a stage number) of the job; `blocks`: the caller's own modules (Python API:
    the stages to train, or with "e2e" the modules the baseline starts from);
    `e2e_checkpoint`: the e2e baseline with activation checkpointing (RUN/e2e_checkpoint);
    `raw`: the dataset an earlier run_job of the same `cfg` loaded (its Outcome's), not loaded again.

    Every input is checked before anything is written to the run directory."""
    augment_for(cfg)
    require_filter(cfg.compression)  # an hdf5plugin filter, before any cache is written with it
    with deterministic_kernels(cfg.deterministic):
        return run_checked(cfg, layout, stage, blocks, e2e_checkpoint, raw)


def run_checked(cfg: Config, layout: StageLayout, stage: int | str, blocks: list[torch.nn.Module] | None,
                e2e_checkpoint: bool, raw: RawData | None) -> Outcome:
    """run_job's work: the device and ranks, the data, every check, then the run directory under its lock."""
    device = distributed.init(cfg.device)
    if cfg.release_memory:
        release_freed_memory()
    try:
        world = distributed.world_size()
        if cfg.batch_size % world or cfg.batch_size < 2 * world:
            raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly among "
                            f"the {world} ranks, at least 2 samples each; use a multiple of {world} from {2 * world}")
        if stage in ("all", "e2e", 0) and raw is None:
            # Rank 0 first: it may generate (or --download) the dataset, which the others then read.
            raw = load_raw(cfg) if distributed.is_main() else None
            distributed.barrier()
            raw = raw or load_raw(cfg)
        check_inputs(cfg, layout, RunDir(cfg.run_dir), stage, raw, device)
        run = prepare_run_dir(cfg)
        # One run per directory; under torchrun rank 0 holds the lock for the group.
        with RunLock(run) if distributed.is_main() else contextlib.nullcontext():
            if distributed.is_main():
                write_run_config(run, cfg, raw)
            distributed.barrier()
            log(f"seqtrain: {cfg.arch} in {layout.num_stages} stages {list(layout.sizes)} on {cfg.dataset}, device "
                f"{device}" + (f" x {world} ranks" if world > 1 else "")
                + f", run dir {run.root} (config {layout.config_hash})")
            if stage == "all":
                results = run_all(cfg, layout, run, raw, device, blocks)
            elif stage == "e2e":
                run_e2e(cfg, layout, run, raw, device, checkpoint=e2e_checkpoint, blocks=blocks)
                results = collect_results(cfg, layout, run)
            else:
                run_stage(cfg, layout, run, stage, raw, device)
                results = collect_results(cfg, layout, run)
    finally:
        distributed.shutdown()
    return Outcome(results, raw)
