"""The order of stages: what is complete, what to skip, what to resume, then the final network.

    run_all(...)       # every stage in order (skipping complete ones, resuming an interrupted one), then final
    check_inputs(...)  # what the first stage to train reads, checked before anything is written

rundir.py decides what is current, stage.py trains and caches one stage, final.py composes the network.
"""

from __future__ import annotations

import dataclasses

import torch

from seqtrain import distributed
from seqtrain.archs import feature_shape
from seqtrain.cache import CorruptCache, verify_shards
from seqtrain.config import Config
from seqtrain.contract import SPLITS, Manifest
from seqtrain.data import RawData
from seqtrain.files import write_json
from seqtrain.final import assemble_final
from seqtrain.layout import StageLayout
from seqtrain.log import log
from seqtrain.network import build_stage
from seqtrain.plan import free_disk, predicted_cache_bytes
from seqtrain.rundir import (
    RunDir,
    collect_results,
    corrupt,
    final_results,
    load_weights,
    require_input_cache,
    stage_manifest,
    versus,
)
from seqtrain.splitting import is_torchvision, torchvision_stage_shapes
from seqtrain.stage import check_disk, run_stage
from seqtrain.streams import cached_batches, image_batches, require_full_batch


def check_inputs(cfg: Config, layout: StageLayout, run: RunDir, stage: int | str, raw: RawData | None,
                 device) -> None:
    """What the first stage to train reads, checked before anything is written to the run directory (so that
    a refused run leaves nothing behind that would remember its flags): the batch size against the data,
    stage K's input cache, and the disk that stage 0's cache needs."""
    if raw is not None:
        require_full_batch(cfg, image_batches(cfg, raw, "train", device, train=True), len(raw.train))
    if isinstance(stage, int) and stage > 0:
        prev = require_input_cache(cfg, layout, run, stage, checksums=False)
        require_full_batch(cfg, cached_batches(cfg, run.cache(stage - 1), prev, "train", device, train=True),
                           prev.splits["train"].count)
    custom = cfg.arch.startswith("custom:")  # the caller's modules: their shapes are known once they run
    if stage in ("all", 0) and not custom and (stage == 0 or stage_manifest(cfg, layout, run, 0)[0] is None):
        with torch.device("meta"):  # the output shape only: nothing is allocated
            _, out_shape = build_stage(cfg, layout, 0, tuple(raw.in_shape))
        check_disk(run, 0, predicted_cache_bytes(tuple(out_shape), cfg, {s: len(getattr(raw, s)) for s in SPLITS}))


def announce_disk(cfg: Config, layout: StageLayout, run: RunDir, raw: RawData, todo: list[int]) -> None:
    """Say, before the first stage, what disk the caches still to write will take (plan.py's prediction), and
    when int8 caches would matter (a quarter of float32's bytes, half of float16's)."""
    if not layout.own_blocks and not is_torchvision(cfg.arch):
        return  # the caller's own modules: their output shapes are known once they run
    counts = {s: len(getattr(raw, s)) for s in SPLITS}
    shapes = (torchvision_stage_shapes(cfg.arch, cfg.split, layout.in_shape) if not layout.own_blocks else
              [feature_shape([s for g in layout.specs[:k + 1] for s in g], layout.in_shape)
               for k in range(layout.num_stages)])
    if not todo:
        return
    need = sum(predicted_cache_bytes(tuple(shapes[k]), cfg, counts) for k in todo)
    where, free = free_disk(run.root)
    line = (f"caches: about {need / 2**20:,.0f} MB on disk for {len(todo)} stage(s), {cfg.cache_dtype}; "
            f"{free / 2**20:,.0f} MB free at {where}")
    if cfg.cache_dtype != "int8" and (need > 2**30 or need > free / 5):
        int8 = dataclasses.replace(cfg, cache_dtype="int8")
        small = sum(predicted_cache_bytes(tuple(shapes[k]), int8, counts) for k in todo)
        line += f" (--cache-dtype int8 would take about {small / 2**20:,.0f} MB, within noise in accuracy)"
    log(line)


def run_all(cfg: Config, layout: StageLayout, run: RunDir, raw: RawData, device,
            blocks: list[torch.nn.Module] | None = None) -> dict:
    """Every stage in order (skipping complete ones, resuming interrupted ones), then the final network.

    `blocks`: the stages' modules when the caller holds them (seqtrain.train_stages); else each is built from
    the layout. Returns the summary's figures (rundir.collect_results).
    """
    current = [stage_manifest(cfg, layout, run, k) for k in range(layout.num_stages)]
    announce_disk(cfg, layout, run, raw, [k for k, (manifest, _) in enumerate(current) if manifest is None])
    manifests: list[Manifest] = []
    trained: set[int] = set()  # the stages this call has trained and cached
    last = layout.num_stages - 1
    for k, (manifest, why) in enumerate(current):
        if manifest is not None and k > 0 and manifests[k - 1].fingerprint != manifest.identity.input_fingerprint:
            manifest, why = None, f"stage {k}'s cache is stale: it was made from an earlier version of its input"
        if manifest is not None:
            try:
                verify_shards(run.cache(k), manifest, checksums=False)  # sizes now; checksums when read
            except CorruptCache as e:
                raise corrupt(e, run, k) from None
            log(f"stage {k}/{last}: complete, skipped")
            if blocks is not None:  # the caller's modules get the weights that made this cache
                blocks[k].load_state_dict(load_weights(run.stage(k) / "block.pt", k, run)["block"])
        else:
            log(f"stage {k}/{last}: {why}; training it")
            # Its input's checksums were taken a moment ago from the files as written. Under torchrun each rank
            # hashed only its own shards (on its own machine), so there every rank checks its share as usual.
            just_written = k - 1 in trained and distributed.world_size() == 1
            manifest = run_stage(cfg, layout, run, k, raw, device, None if blocks is None else blocks[k],
                                 input_just_written=just_written)
            trained.add(k)
        manifests.append(manifest)

    saved = final_results(run)
    if saved and saved["final"]["fingerprint"] == manifests[-1].fingerprint:
        log("final: complete, skipped")
        return collect_results(cfg, layout, run)
    final = assemble_final(cfg, layout, run, manifests, raw, device, blocks)
    results = {**collect_results(cfg, layout, run), "final": final}
    results["versus"] = versus(results)  # with the final network just assembled
    if distributed.is_main():
        write_json(run.final / "results.json", results)
    distributed.barrier()
    return results
