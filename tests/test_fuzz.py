"""Mistakes nobody thought of (issue 14): command lines, TOML files and damaged run directories drawn by
hypothesis from the parser's own definitions, each run in-process. Every case either works (exit 0) or
prints exactly one line `seqtrain: error: ...` and exits 2, writing nothing; never a traceback.

    pytest -q tests/test_fuzz.py                          # a few hundred cases, fixed (derandomized)
    HYPOTHESIS_PROFILE=ci pytest -q tests/test_fuzz.py    # thousands, freshly drawn each time
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from seqtrain.config import FIELD_TYPES, choices
from seqtrain.run import build_parser, main

CI = os.environ.get("HYPOTHESIS_PROFILE") == "ci"


def fuzz(default: int, ci: int):
    """Hypothesis settings: `default` cases, the same every run, or `ci` fresh ones under HYPOTHESIS_PROFILE=ci."""
    return settings(max_examples=ci if CI else default, deadline=None, derandomize=not CI, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """seqtrain.run.main in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def assert_one_line_or_success(status: int, err: str, argv) -> None:
    if status == 0:
        assert "Traceback" not in err, (argv, err)
    else:
        assert status == 2, (argv, status, err)
        assert err.startswith("seqtrain: error: ") and err.count("\n") == 1 and err.endswith("\n"), (argv, err)


# --------------------------------------------------------------------------------------------------------
# Values, drawn from the parser's definitions


def parser_options() -> dict[str, tuple[str, str]]:
    """Every option of the command line: flag -> (field, kind); kind is int, float, str, bool (--x/--no-x),
    or switch (store_true)."""
    out = {}
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            kind = "bool"
        elif action.nargs == 0:
            kind = "switch"
        else:
            kind = {int: "int", float: "float"}.get(action.type, "str")
        out[action.option_strings[0]] = (action.dest, kind)
    return out


OPTIONS = parser_options()
NAMED = choices()
# Boundaries of every range the configuration checks, and values past them.
INTS = [-1, 0, 1, 2, 3, 4, 7, 8, 9, 16, 31, 32, 33, 64, 65, 100, 128, 1024, 1025, 10_000, 10_001, 50_000, 50_001,
        2**31, 10**12, 10**30]
FLOATS = ["0", "-0.0", "1e-12", "0.001", "0.05", "0.1", "0.5", "0.9", "0.999", "1", "1.0", "1.5", "2", "2.0001",
          "-1", "1e308", "1e-320", "nan", "inf", "-inf"]
WRONG = ["", " ", "abc", "1.5", "1e3", "0x10", "+3", "3_000", "1,5", "--lr", "None", "true", "[1]", "٣", "x" * 300]
# Values that mean something to a free-text field.
TEXT = {
    "stages": ["1", "2", "3", "4", "10", "11", "0", "-1", "auto", "3,3,2,2", "5,5", "3,3", "1,1,1,1,1,1,1,1,1,1",
               "0,10", "a,b", "2,", ",", " 2 "],
    "downsample": ["standard", "accelerated", "0:2", "0:2,4:2", "0:4", "0:3", "99:2", "0:2:2", "x", "0:1", "-1:2",
                   "0:2,0:2", "9:2"],
    "memory_budget": ["", "512MB", "1MB", "1KB", "4GB", "1TB", "0MB", "-1MB", "1.5GB", "MB", "12", "1e3MB"],
    "stage_convs": ["", "1,2,2,2", "1,1", "0,1,1,1", "5,1,1,1", "a", "1,2,2,2,2", "4,4,4,4"],
    "stage_width": ["", "0.5,1,1,1", "1,1", "0.01,1,1,1", "8,8,8,8", "9,1,1,1", "nan,1,1,1", "inf,1,1,1", "a"],
    "split": ["", "layer2", "layer2,layer3,layer4", "layer3,layer2", "nosuch", "fc", "conv1", "layer1.0"],
    "arch": ["resnet8", "resnet14", "resnet7", "resnet0", "resnet-4", "resnet1000000000", "torchvision:resnet18",
             "torchvision:nosuch", "torchvision:", "custom:abc", ":", "vgg", "torchvision:vit_b_16"],
    "stage": ["all", "e2e", "0", "1", "-1", "99", "last", ""],
}


def values_for(field: str, kind: str) -> st.SearchStrategy[str]:
    wrong = st.sampled_from(WRONG) | st.text(max_size=6)
    if kind == "int":
        good = st.sampled_from([str(v) for v in INTS]) | st.integers(-3, 3000).map(str)
    elif kind == "float":
        good = st.sampled_from(FLOATS) | st.floats(-5, 5, allow_nan=False).map(repr)
    elif field in NAMED:
        good = st.sampled_from(NAMED[field])
        if field == "arch":
            good = good | st.sampled_from(TEXT["arch"])
    else:
        good = st.sampled_from(TEXT.get(field, ["x"]))
    return st.one_of(good, good, good, wrong)


@st.composite
def flag_items(draw, exclude=("--run-dir", "--data-dir", "--config", "--download")) -> list[str]:
    """One option as the user types it: `--flag value`, `--flag=value`, `--no-flag`; or an unknown word."""
    if draw(st.integers(0, 19)) == 0:
        return [draw(st.sampled_from(["--epochs", "--lr-max", "--STAGE", "-q", "--no-plan", "--bf16=yes", "stray",
                                      "--", "--stages=2=3", "--n", "--batch", "-h3"]))]
    flag = draw(st.sampled_from(sorted(set(OPTIONS) - set(exclude))))
    field, kind = OPTIONS[flag]
    if kind == "switch":
        return [flag]
    if kind == "bool":
        return [draw(st.sampled_from([flag, "--no-" + flag[2:]]))]
    value = draw(values_for(field, kind))
    if draw(st.booleans()) or value.startswith("-"):
        return [f"{flag}={value}"]
    return [flag, value]


def flat(items: list[list[str]]) -> list[str]:
    return [word for item in items for word in item]


# --------------------------------------------------------------------------------------------------------
# --plan: every drawn command line answers with a plan or one line, and writes nothing


@fuzz(default=80, ci=2000)
@given(st.lists(flag_items(), max_size=6))
def test_fuzzed_plan_command_line(items):
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--plan", *flat(items), "--run-dir", f"{tmp}/run", "--data-dir", f"{tmp}/data"]
        status, out, err = run_main(argv)
        assert_one_line_or_success(status, err, argv)
        if status == 0:
            assert out.strip() and err == "", (argv, err)
        assert os.listdir(tmp) == [], (argv, os.listdir(tmp))  # a plan writes nothing, not even the data


# --------------------------------------------------------------------------------------------------------
# --config FILE.toml: the same values as a file would hold them, and files that are not TOML at all


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value) if isinstance(value, str) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"


def typed(text: str, kind: str):
    """A command-line value as the TOML type its field takes, when it reads as one."""
    try:
        return {"int": int, "float": float}.get(kind, str)(text)
    except ValueError:
        return text


@st.composite
def toml_entries(draw) -> str:
    field = draw(st.sampled_from(sorted(FIELD_TYPES) + ["epochs", "lr_max", "stage", "plan"]))
    key = field.replace("_", "-") if draw(st.booleans()) else field
    kind = FIELD_TYPES.get(field, "str")
    how = draw(st.integers(0, 9))
    if how < 6:  # the right type, from the values the command line draws
        value = draw(st.booleans()) if kind == "bool" else typed(draw(values_for(field, kind)), kind)
    else:  # a wrong type
        value = draw(st.sampled_from([True, 1, 1.5, "x", [1, 2], {"a": 1}, [], float("nan")]))
    if field in ("run_dir", "data_dir"):
        value = draw(st.sampled_from(["", "\u0000", 3, "/dev/null/x"]))
    return f"{key} = {toml_value(value)}"


@fuzz(default=60, ci=1000)
@given(st.lists(toml_entries(), max_size=5), st.lists(flag_items(), max_size=2),
       st.one_of(st.none(), st.binary(max_size=40)))
def test_fuzzed_toml_config(entries, items, garbage):
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "c.toml"
        config.write_bytes(garbage if garbage is not None else "\n".join(entries).encode())
        argv = ["--plan", "--config", str(config), *flat(items), "--run-dir", f"{tmp}/run", "--data-dir",
                f"{tmp}/data"]
        status, out, err = run_main(argv)
        assert_one_line_or_success(status, err, argv)
        assert sorted(os.listdir(tmp)) == ["c.toml"], (argv, os.listdir(tmp))


# --------------------------------------------------------------------------------------------------------
# A tiny --stage all: what the plan accepts also trains, and what it refuses leaves no run directory

TINY = ["--stage", "all", "--n-train", "150", "--n-test", "40", "--width", "2", "--head-width", "4",
        "--max-epochs", "1", "--stages", "2", "--batch-size", "32", "--shard-mb", "1"]
TRAINABLE = {  # values that keep a run to seconds; a quarter of the draws are the generic wrong ones
    "--batch-size": ["1", "2", "16", "135", "136", "1000", "0"],
    "--stages": ["1", "2", "3", "auto", "1,9", "2,2"],
    "--arch": ["resnet8", "resnet14", "resnet20", "vgg11", "resnet7"],
    "--image-size": ["0", "8", "12", "16", "7"],
    "--head": list(NAMED["head"]), "--head-convs": ["0", "1", "2", "4"], "--head-blocks": ["1", "2", "5"],
    "--optimizer": list(NAMED["optimizer"]), "--augment": list(NAMED["augment"]),
    "--cache-views": ["1", "2", "3"], "--cache-dtype": list(NAMED["cache_dtype"]),
    "--compression": list(NAMED["compression"]), "--downsample": ["standard", "accelerated", "0:2", "1:4"],
    "--downsample-op": list(NAMED["downsample_op"]), "--val-fraction": ["0.05", "0.1", "0.5", "0.99"],
    "--n-train": ["100", "101", "150", "20"], "--lr": ["0.01", "0.1", "1e-6"], "--patience": ["0", "1"],
    "--stage-convs": ["", "1,2", "2,2"], "--stage-width": ["", "0.5,1", "1,2"], "--seed": ["0", "1"],
    "--balance": list(NAMED["balance"]), "--memory-budget": ["", "1MB", "64MB"], "--crop-padding": ["0", "4", "40"],
}


@st.composite
def trainable_items(draw) -> list[str]:
    flag = draw(st.sampled_from(sorted(TRAINABLE)))
    value = draw(st.sampled_from(TRAINABLE[flag]) if draw(st.integers(0, 3)) else st.sampled_from(WRONG[:8]))
    return [f"{flag}={value}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")  # the synthetic sets, generated once for every run of the module


# Refusals that only training can reach: its loss, or its features, turned non-finite.
TRAINING_REFUSALS = ("the loss is", "features contain inf or nan", "beyond float16")


@fuzz(default=4, ci=40)
@given(st.lists(trainable_items(), max_size=4))
def test_fuzzed_tiny_training_run(data_dir, items):
    with tempfile.TemporaryDirectory() as tmp:
        argv = [*TINY, *flat(items), "--run-dir", f"{tmp}/run", "--data-dir", str(data_dir)]
        status, out, err = run_main(argv)
        assert_one_line_or_success(status, err, argv)
        if status == 0:
            assert (Path(tmp) / "run" / "final" / "model.pt").exists()
            verified = run_main(["--verify", "--run-dir", f"{tmp}/run"])
            assert verified[0] == 0, verified
        elif not any(why in err for why in TRAINING_REFUSALS):
            assert not (Path(tmp) / "run").exists(), (argv, err)


# --------------------------------------------------------------------------------------------------------
# Damaged run directories: one complete tiny run, copied and damaged once per case

DAMAGEABLE = ["config.json", "stage_00/cache/manifest.json", "stage_01/cache/manifest.json",
              "stage_00/metrics.jsonl", "stage_01/metrics.jsonl", "final/results.json"]


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("complete") / "run"
    argv = [*TINY, "--run-dir", str(run), "--data-dir", str(data_dir), "--max-epochs", "2"]
    assert run_main(argv)[0] == 0
    return run


def paths_in(value, prefix=()):
    """Every path to a value inside parsed JSON: ('splits', 'train', 'count'), ..."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_in(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_in(v, (*prefix, i))


def replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@st.composite
def damage(draw, original: bytes, is_lines: bool) -> bytes:
    """`original` truncated, with one byte flipped, or with one JSON value of another type."""
    how = draw(st.sampled_from(["truncate", "flip", "retype"]))
    if how == "truncate":
        return original[:draw(st.integers(0, len(original) - 1))]
    if how == "flip":
        at = draw(st.integers(0, len(original) - 1))
        return original[:at] + bytes([original[at] ^ draw(st.integers(1, 255))]) + original[at + 1:]
    docs = [json.loads(line) for line in original.decode().splitlines()] if is_lines else [json.loads(original)]
    i = draw(st.integers(0, len(docs) - 1))
    path = draw(st.sampled_from(list(paths_in(docs[i]))))
    docs[i] = replaced(docs[i], path, draw(st.sampled_from([None, "x", [], {}, 1.5, True, -1, 10**20])))
    return ("".join(json.dumps(d) + "\n" for d in docs) if is_lines else json.dumps(docs[0])).encode()


def parses(data: bytes, is_lines: bool) -> bool:
    try:
        text = data.decode()
        docs = [json.loads(line) for line in text.splitlines()] if is_lines else [json.loads(text)]
    except ValueError:
        return False
    return all(isinstance(d, dict) for d in docs) and (bool(docs) or not is_lines)


@fuzz(default=60, ci=600)
@given(st.sampled_from(DAMAGEABLE), st.data())
def test_damaged_run_directory_is_named_never_a_traceback(complete_run, data_dir, name, data):
    original = (complete_run / name).read_bytes()
    is_lines = name.endswith(".jsonl")
    damaged = data.draw(damage(original, is_lines))
    assume(damaged != original)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(complete_run, run)
        (run / name).write_bytes(damaged)
        status, _, err = run_main(["--verify", "--run-dir", str(run)])
        assert_one_line_or_success(status, err, name)
        if not parses(damaged, is_lines):  # torn or not JSON objects any more: the file is named
            assert status == 2 and str(run / name) in err, (name, damaged[:200], err)
        if status == 0 or data.draw(st.integers(0, 7)) == 0:  # a sample also runs: it redoes, or it refuses
            status, _, err = run_main(["--stage", "all", "--run-dir", str(run), "--data-dir", str(data_dir)])
            assert_one_line_or_success(status, err, name)


def test_the_fuzzer_draws_every_option():
    # A new flag is fuzzed as soon as it exists: the strategies come from the parser itself.
    fields = {field for field, _ in OPTIONS.values()}
    assert set(FIELD_TYPES) <= fields and {"plan", "json", "verify", "rebuild", "config", "stage"} <= fields
