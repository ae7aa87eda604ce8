"""The baselines every figure is compared with: the same network trained end to end by back-propagation, on
the same data and with the same convergence rule, written to `RUN/e2e/`; with --checkpoint, every block
activation-checkpointed (the alternative to seqtrain users would otherwise pick: the same weights for less
memory and a recomputed forward), written to `RUN/e2e_checkpoint/`."""

from __future__ import annotations

import torch

from seqtrain import distributed
from seqtrain.config import Config
from seqtrain.contract import Identity, StageResult
from seqtrain.data import RawData
from seqtrain.files import write_json
from seqtrain.final import save_model
from seqtrain.layout import StageLayout
from seqtrain.log import log
from seqtrain.memory import PeakMemory, out_of_memory_as
from seqtrain.models import SequentialNet, build_head
from seqtrain.network import build_network
from seqtrain.recompute import checkpointed
from seqtrain.rundir import RunDir, dataset_fingerprint, e2e_record
from seqtrain.splitting import stage_shapes
from seqtrain.streams import image_batches
from seqtrain.train import autocast_for, evaluate, fit


def run_e2e(cfg: Config, layout: StageLayout, run: RunDir, raw: RawData, device, checkpoint: bool = False,
            blocks: list[torch.nn.Module] | None = None) -> StageResult:
    """Train the whole network to convergence, score it on the test split, save model.pt and results.json in
    e2e/ (or e2e_checkpoint/ with --checkpoint)."""
    main, home = distributed.is_main(), run.e2e_home(checkpoint)
    if main:
        (home / "results.json").unlink(missing_ok=True)
        home.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    torch.manual_seed(cfg.seed)
    if blocks is None:
        net = build_network(cfg, layout, raw.in_shape[0], raw.num_classes)
    else:  # the caller's own modules (seqtrain.train_stages(..., e2e=True)), with the last stage's kind of head
        out_channels = stage_shapes(blocks, tuple(raw.in_shape))[-1][0]
        net = SequentialNet(blocks, build_head(cfg, out_channels, raw.num_classes))
    net.to(device)
    # e2e does not depend on where the stages are cut: identified by the network, not by the cut
    identity = Identity(layout.network_hash, dataset_fingerprint(cfg, run), "e2e")
    train, val = image_batches(cfg, raw, "train", device, True), image_batches(cfg, raw, "val", device, False)
    # end to end not fitting a GPU is what seqtrain's stages are for; the baseline can only be made smaller
    fixes = ["a smaller --batch-size"] if checkpoint else ["--checkpoint", "a smaller --batch-size"]
    with out_of_memory_as("e2e with --checkpoint" if checkpoint else "e2e", fixes):
        with PeakMemory(device) as mem, checkpointed(net.stages, checkpoint):
            trained = fit(net, train, val, cfg, workdir=home, identity=identity, device=device,
                          desc="e2e+ckpt" if checkpoint else "e2e", memory=mem)
        _, test_acc = evaluate(net, image_batches(cfg, raw, "test", device, False), autocast_for(device, cfg.bf16))
    figures = mem.as_dict()
    result = StageResult(val_acc=trained.best_val_acc, test_acc=test_acc, epochs=trained.epochs,
                         best_epoch=trained.best_epoch, train_seconds=round(trained.train_seconds, 2),
                         parameters=sum(p.numel() for p in net.parameters()), peak_tensor_mb=figures["peak_tensor_mb"],
                         peak_rss_mb=mem.rss_mb, train_memory=figures, checkpoint=checkpoint)
    if main:
        save_model(home / "model.pt", net, cfg, raw)
        write_json(home / "results.json", e2e_record(result, layout))
        (home / "checkpoint.pt").unlink(missing_ok=True)
    distributed.barrier()
    log(f"{'e2e+ckpt' if checkpoint else 'e2e'}: done | val acc {trained.best_val_acc:.4f} | "
        f"test acc {test_acc:.4f} | tensor peak {result.peak_tensor_mb:.1f} MB")
    return result
