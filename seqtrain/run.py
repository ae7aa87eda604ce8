"""The command line: `python -m seqtrain.run --stage all|K|e2e [flags]`.

  python -m seqtrain.run --stage all                 # every stage, then the final network (default data)
  python -m seqtrain.run --stage 2 --run-dir DIR     # (re)train stage 2 from stage 1's cache in DIR
  python -m seqtrain.run --stage e2e --run-dir DIR   # the end-to-end back-propagation baseline

Only this module parses arguments. A user mistake prints one line `seqtrain: error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import threading

from seqtrain.config import (
    FIELD_TYPES,
    GROUPS,
    Config,
    choices,
    coerce,
    config_hash,
    field_help,
    read_toml,
    resolve,
)
from seqtrain.errors import Interrupted, Parser, UserError
from seqtrain.files import read_json
from seqtrain.log import log
from seqtrain.report import summary_table


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m seqtrain.run", description="Train a network one block at a time, caching each "
               "frozen block's features to HDF5 shards; or train it end to end for comparison.",
               argument_default=argparse.SUPPRESS)
    helps, defaults, named = field_help(), Config().to_dict(), choices()
    run = p.add_argument_group("what to run")
    run.add_argument("--stage", default="all", help="'all': every stage then the final network, skipping "
                     "complete stages and resuming interrupted ones; K: (re)train stage K (0-based) from stage "
                     "K-1's cache; 'e2e': the end-to-end baseline")
    run.add_argument("--plan", action="store_true", help="print per stage the parameters, feature shape, "
                     "predicted training memory and cache size, with the free disk; trains nothing")
    run.add_argument("--json", action="store_true", help="with --plan: the plan as one JSON object on stdout "
                     "(stages with blocks, train_bytes, cache_bytes; e2e; largest_stage_ratio), for scripts")
    run.add_argument("--verify", action="store_true", help="check the run directory (every manifest, shard "
                     "checksum and weight file) and report; trains nothing")
    run.add_argument("--rebuild", action="store_true", help="accept flags that change an existing run's "
                     "configuration; its stages are then stale and retrained")
    run.add_argument("--config", metavar="FILE.toml", help="defaults from a TOML file (keys: long flag names); "
                     "flags given here override it")
    for title, names in GROUPS.items():
        group = run if title == "what to run" else p.add_argument_group(title)
        for name in names:
            kind = FIELD_TYPES[name]
            text = f"{helps[name]} (default: {defaults[name]})"
            if kind == "bool":
                group.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=text)
            else:
                group.add_argument("--" + name.replace("_", "-"), type={"int": int, "float": float, "str": str}[kind],
                                   metavar="{" + ",".join(named[name]) + "}" if name in named else name.upper(),
                                   help=text)
    return p


def parse_stage(text: str, num_stages: int) -> int | str:
    if text in ("all", "e2e"):
        return text
    try:
        k = int(text)
    except ValueError:
        raise UserError(f"--stage {text!r} is not 'all', 'e2e' or a stage number") from None
    if not 0 <= k < num_stages:
        raise UserError(f"--stage {k} is out of range: this run has {num_stages} stages, 0 to {num_stages - 1}")
    return k


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {k: v for k, v in vars(args).items() if k in FIELD_TYPES}
    from_file = read_toml(args.config) if getattr(args, "config", None) else {}
    run_dir = flags.get("run_dir", from_file.get("run_dir", Config.run_dir))
    if "\x00" in run_dir:
        raise UserError(f"--run-dir {run_dir!r} holds a NUL character")
    try:
        saved = read_json(f"{run_dir}/config.json")
    except (FileNotFoundError, NotADirectoryError):
        saved = None  # a new run directory
    except (ValueError, OSError):
        raise UserError(f"{run_dir}/config.json is damaged; delete it to start this run afresh") from None
    else:
        if not isinstance(saved, dict):  # e.g. `null`: a file that is there is never a new run directory
            raise UserError(f"{run_dir}/config.json is not a seqtrain configuration; use another --run-dir")
    try:  # a damaged or hand-edited file: each value is checked as a TOML file's would be
        saved = saved if saved is None else {k: coerce(k, v, f"{run_dir}/config.json") if k in FIELD_TYPES else v
                                             for k, v in saved.items()}
    except UserError as e:
        raise UserError(f"{e}: the file is damaged; restore the value or use another --run-dir") from None
    return resolve(saved, from_file, {**flags, "run_dir": run_dir}, rebuild=getattr(args, "rebuild", False))


# --------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    with interrupt_on_sigterm():
        try:
            return run_command(argv)
        except UserError as e:
            print(f"seqtrain: error: {e}", file=sys.stderr)
            return e.exit_code
        except Interrupted as e:
            say(f"seqtrain: {e}")
            return e.exit_code
        except OSError as e:
            if e.errno == errno.EPIPE:
                return closed_stdout()
            if e.errno != errno.ENOSPC and "No space left" not in str(e):
                raise
            print(f"seqtrain: error: no space left on device{' writing ' + e.filename if e.filename else ''}; "
                  "free some space and rerun the same command (finished stages are kept)", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # outside a training loop (loading, caching): the last checkpoint stands
            say("seqtrain: interrupted; finished work is saved: rerun the same command to resume")
            return 130


def run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "json", False) and not getattr(args, "plan", False):
        raise UserError("--json prints the plan: give it with --plan")
    cfg = config_from_args(args)
    if cfg.arch.startswith("custom:") and not getattr(args, "verify", False):
        # found by tests/test_fuzz.py: the command line has no module to build such a network from
        raise UserError(f"--arch {cfg.arch} is a network given to seqtrain.train_stages() from Python; train or "
                        "resume it from Python (the command line can only --verify it), or use --arch "
                        "resnet20, torchvision:NAME, ...")
    if getattr(args, "plan", False):
        from seqtrain.plan import format_plan, plan

        planned = plan(cfg)
        print(json.dumps(planned, indent=1) if getattr(args, "json", False) else format_plan(planned))
        sys.stdout.flush()  # here, so that a closed pipe (`--plan | head`) is an EPIPE caught in main()
        return 0
    if getattr(args, "verify", False):
        return verify(cfg)
    stage = parse_stage(getattr(args, "stage", "all"), cfg.num_stages)
    return run(cfg, stage)


def say(line: str) -> None:
    """An interrupt's one line on stderr; under torchrun every rank stops, and rank 0 alone says so."""
    from seqtrain.log import is_main_process

    if is_main_process():
        print(line, file=sys.stderr)


def closed_stdout() -> int:
    """The reader of our output went away (`--plan | head -3`): stop quietly, as the Python documentation's
    "Note on SIGPIPE" advises; stdout goes to devnull so that the interpreter's final flush cannot fail too."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: a stdout with no file behind it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


@contextlib.contextmanager
def interrupt_on_sigterm():
    """SIGTERM (what torchrun forwards, or `kill`) interrupts as Ctrl-C does: the training loop finishes its
    step and checkpoints (train.stop_on_signal), anywhere else KeyboardInterrupt; either way exit status 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def verify(cfg: Config) -> int:
    from seqtrain.pipeline import RunDir, verify_run

    if not (RunDir(cfg.run_dir).config).exists():
        raise UserError(f"{cfg.run_dir} is not a seqtrain run directory (no config.json); check --run-dir")
    lines, incomplete = verify_run(cfg, RunDir(cfg.run_dir))
    for line in lines:
        log(line)
    if incomplete:
        raise UserError(f"{cfg.run_dir} is incomplete ({', '.join(incomplete)}); complete it with: "
                        f"python -m seqtrain.run --stage all --run-dir {cfg.run_dir}")
    return 0


def run(cfg: Config, stage: int | str) -> int:
    # Imported here so that --help and argument errors answer without loading torch.
    from seqtrain import distributed
    from seqtrain.allocator import release_freed_memory
    from seqtrain.augment import augment_for
    from seqtrain.data import load_raw
    from seqtrain.pipeline import (
        RunDir,
        RunLock,
        check_inputs,
        collect_results,
        prepare_run_dir,
        run_all,
        run_e2e,
        run_stage,
        write_run_config,
    )

    # Every input is checked before anything is written to the run directory.
    augment_for(cfg)
    device = distributed.init(cfg.device)
    if cfg.release_memory:
        release_freed_memory()
    try:
        world = distributed.world_size()
        if cfg.batch_size % world or cfg.batch_size < 2 * world:
            raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly among "
                            f"the {world} ranks, at least 2 samples each; use a multiple of {world} from {2 * world}")
        raw = None
        if stage in ("all", "e2e", 0):
            # Rank 0 first: it may generate (or --download) the dataset, which the others then read.
            raw = load_raw(cfg) if distributed.is_main() else None
            distributed.barrier()
            raw = raw or load_raw(cfg)
        check_inputs(cfg, RunDir(cfg.run_dir), stage, raw, device)
        run_dir = prepare_run_dir(cfg)
        # One run per directory; under torchrun rank 0 holds the lock for the group.
        with RunLock(run_dir) if distributed.is_main() else contextlib.nullcontext():
            if distributed.is_main():
                write_run_config(run_dir, cfg, raw)
            distributed.barrier()
            log(f"seqtrain: {cfg.arch} in {cfg.num_stages} stages {cfg.stage_sizes()} on {cfg.dataset}, device "
                f"{device}" + (f" x {world} ranks" if world > 1 else "")
                + f", run dir {run_dir.root} (config {config_hash(cfg)})")
            if stage == "all":
                results = run_all(cfg, run_dir, raw, device)
            elif stage == "e2e":
                run_e2e(cfg, run_dir, raw, device)
                results = collect_results(cfg, run_dir)
            else:
                run_stage(cfg, run_dir, stage, raw, device)
                results = collect_results(cfg, run_dir)
    finally:
        distributed.shutdown()
    log("\n" + summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
