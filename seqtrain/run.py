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
    field_help,
    read_toml,
    resolve,
)
from seqtrain.errors import Interrupted, Parser, UserError
from seqtrain.files import read_json
from seqtrain.log import log
from seqtrain.report import summary_table

# What --help shows for a flag whose accepted values are a pattern, not a list.
METAVARS = {"arch": "{resnet20,resnet32,resnet44,resnet56,resnet110,resnet<6n+2>,resnet18,resnet34,vgg11,vgg16,"
                    "torchvision:NAME}"}


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
                     "predicted training memory and cache size, with the free disk, for the flags given (the "
                     "defaults for the rest; no run directory is read or written); trains nothing")
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
                                   metavar=METAVARS.get(name) or ("{" + ",".join(named[name]) + "}" if name in named
                                                                  else name.upper()), help=text)
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


def saved_config(run_dir: str) -> dict | None:
    """A run directory's config.json, None for a new run directory; UserError when it is damaged."""
    if "\x00" in run_dir:
        raise UserError(f"--run-dir {run_dir!r} holds a NUL character")
    try:
        saved = read_json(f"{run_dir}/config.json")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, OSError):
        raise UserError(f"{run_dir}/config.json is damaged; delete it to start this run afresh") from None
    if not isinstance(saved, dict):  # e.g. `null`: a file that is there is never a new run directory
        raise UserError(f"{run_dir}/config.json is not a seqtrain configuration; use another --run-dir")
    try:  # a damaged or hand-edited file: each value is checked as a TOML file's would be
        return {k: coerce(k, v, f"{run_dir}/config.json") if k in FIELD_TYPES else v for k, v in saved.items()}
    except UserError as e:
        raise UserError(f"{e}: the file is damaged; restore the value or use another --run-dir") from None


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {k: v for k, v in vars(args).items() if k in FIELD_TYPES}
    if getattr(args, "stage", "all") == "e2e" and "checkpoint" in flags:
        # With --stage e2e, --checkpoint chooses the baseline (RUN/e2e_checkpoint), not how this run's stages
        # train: the run keeps its own --checkpoint, and the cut made for it, so that its stages stay current.
        args.e2e_checkpoint = flags.pop("checkpoint")
    from_file = read_toml(args.config) if getattr(args, "config", None) else {}
    run_dir = flags.get("run_dir", from_file.get("run_dir", Config.run_dir))
    # --plan answers for the flags given (and the defaults): it writes nothing, so a run directory made with
    # other settings neither shapes nor refuses it.
    saved = None if getattr(args, "plan", False) else saved_config(run_dir)
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
        # the command line has no module to build such a network from
        raise UserError(f"--arch {cfg.arch} is a network given to seqtrain.train_stages() from Python, which only "
                        "your code can build: train, resume or compare it from Python (seqtrain.train_stages(stages, "
                        f"run_dir={cfg.run_dir!r}, e2e=True) adds its end-to-end baseline); here it can only "
                        "be checked with --verify")
    from seqtrain.job import resolve as resolve_layout_of  # here: --help and errors answer without torch

    layout = resolve_layout_of(cfg)
    if getattr(args, "plan", False):
        from seqtrain.plan import format_plan, plan

        planned = plan(cfg, layout)
        print(json.dumps(planned, indent=1) if getattr(args, "json", False) else format_plan(planned))
        sys.stdout.flush()  # here, so that a closed pipe (`--plan | head`) is an EPIPE caught in main()
        return 0
    if getattr(args, "verify", False):
        return verify(cfg, layout)
    stage = parse_stage(getattr(args, "stage", "all"), layout.num_stages)
    from seqtrain.job import run_job

    outcome = run_job(cfg, layout, stage, e2e_checkpoint=getattr(args, "e2e_checkpoint", False))
    log("\n" + summary_table(outcome.results))
    return 0


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


def verify(cfg: Config, layout) -> int:
    from seqtrain.rundir import RunDir, verify_run

    if not (RunDir(cfg.run_dir).config).exists():
        raise UserError(f"{cfg.run_dir} is not a seqtrain run directory (no config.json); check --run-dir")
    lines, incomplete = verify_run(cfg, layout, RunDir(cfg.run_dir))
    for line in lines:
        log(line)
    if incomplete:
        raise UserError(f"{cfg.run_dir} is incomplete ({', '.join(incomplete)}); complete it with: "
                        f"python -m seqtrain.run --stage all --run-dir {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
