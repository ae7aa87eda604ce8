"""Reading a run directory's small files so that damage is named, never a traceback.

A manifest's fingerprint covers what shapes the features (cache.fingerprint), not the figures beside them;
results.json, block.pt and metrics.jsonl carry no checksum. Each reader here checks that a file parses and
holds values of the types seqtrain reads from it, and otherwise raises a UserError (exit 2) naming the file
and `advice`, the command that writes it again. An alteration that leaves a file valid (a digit of a
timing) stays undetected; docs/reliability.md says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from seqtrain.contract import StageResult
from seqtrain.errors import UserError
from seqtrain.files import load_torch, read_json


def are_figures(record, keys: tuple[str, ...]) -> bool:
    """`record` is a dict whose `keys` are all numbers (JSON's, not booleans)."""
    return isinstance(record, dict) and all(
        isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool) for k in keys)


def read_results(path: Path, valid, advice: str) -> dict | None:
    """A results.json, None when there is none; a UserError naming it when it does not parse or `valid(data)`
    is false."""
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except (ValueError, OSError):
        data = None
    if not valid(data):
        raise UserError(f"{path} is damaged: delete it and rerun {advice} to write it again")
    return data


def read_final_results(path: Path, advice: str) -> dict | None:
    """final/results.json: the summary, and under "final" the composed network's figures and fingerprint."""
    return read_results(path, lambda d: isinstance(d, dict) and are_figures(
        d.get("final"), ("test_acc", "cached_path_test_acc")) and isinstance(d["final"].get("fingerprint"), str),
        advice)


def read_e2e_results(path: Path, advice: str) -> dict | None:
    """e2e/results.json: the baseline's figures (a contract.StageResult) and the configuration hash it was made
    with (and, since e2e is identified by its network, that hash too)."""
    def valid(d) -> bool:
        try:
            StageResult.from_dict(d)
        except ValueError:
            return False
        return isinstance(d.get("config_hash"), str)

    return read_results(path, valid, advice)


def read_weights(path: Path, advice: str) -> dict:
    """A stage's block.pt ({"block", "head", ...} state dicts); a UserError naming it when missing or damaged."""
    try:
        saved = load_torch(path)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {advice}") from None
    except Exception:  # a torn or altered file: torch.load raises any of several types
        saved = None
    if not (isinstance(saved, dict) and isinstance(saved.get("block"), dict) and isinstance(saved.get("head"), dict)):
        raise UserError(f"{path} is damaged: {advice}")
    return saved


def check_metrics(path: Path, epochs: int, advice: str) -> None:
    """A complete stage's metrics.jsonl: one JSON object per epoch, epochs 1 to `epochs` in order."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        logged = [r["epoch"] for r in records if are_figures(r, ("epoch", "train_loss", "val_acc", "lr"))]
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {advice}") from None
    except (ValueError, TypeError, KeyError):
        logged = None
    if logged != list(range(1, epochs + 1)):
        raise UserError(f"{path} is damaged: it does not log epochs 1 to {epochs} as the stage's manifest says; "
                        f"{advice}")
