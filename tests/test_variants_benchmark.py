"""benchmarks/variants.py: each variant's flags reach seqtrain (`--ranks N` as torchrun), and the summary
compares means over seeds against the first variant."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.variants import command, parse_args, summarize


def test_variants_and_common_flags_make_the_commands():
    args, common = parse_args(["--variant", 'int8=--cache-dtype int8', "--variant", "W2=--ranks 2 --workers 1",
                               "--seeds", "0,2", "--", "--n-train", "400"])
    assert args.variants == {"int8": ["--cache-dtype", "int8"], "W2": ["--ranks", "2", "--workers", "1"]}
    assert args.seeds == [0, 2] and common == ["--n-train", "400"]

    argv, env = command(args.variants["int8"], common, Path("out/int8-s0"))
    assert argv[1:] == ["-m", "seqtrain.run", "--stage", "all", "--n-train", "400", "--cache-dtype", "int8",
                        "--run-dir", "out/int8-s0"] and env is None
    argv, env = command(args.variants["W2"], common, Path("out/W2-s0"))
    assert argv[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert "--ranks" not in argv and argv[-4:] == ["--workers", "1", "--run-dir", "out/W2-s0"]
    assert env["OMP_NUM_THREADS"] == "1"
    # gloo on the CPU, as --ranks promises, even where torch sees a GPU (--device auto would make NCCL ranks)
    assert argv[argv.index("--device") + 1] == "cpu"


def test_a_device_given_with_ranks_overrides_the_cpu():
    argv, _ = command(["--ranks", "2", "--device", "cuda"], ["--n-train", "400"], Path("out/x"))
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "--device"]
    assert devices == ["cpu", "cuda"]  # argparse keeps the last


@pytest.mark.parametrize("spec", ["noequals", "=--lr 0.1"])
def test_a_variant_without_a_name_is_refused(spec):
    with pytest.raises(SystemExit):
        parse_args(["--variant", spec])


def test_summary_is_mean_and_std_over_seeds_against_the_first_variant():
    runs = {"float16": {0: {"test_acc": 0.90}, 1: {"test_acc": 0.92}},
            "int8": {0: {"test_acc": 0.89}, 1: {"test_acc": 0.90}}}
    s = summarize(runs)
    assert s["float16"]["mean"] == pytest.approx(91.0) and s["float16"]["std"] == pytest.approx(1.4142, abs=1e-3)
    assert s["int8"]["minus_first"] == pytest.approx(-1.5) and s["float16"]["minus_first"] == 0
