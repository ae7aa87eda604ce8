"""User mistakes: a one-line message naming the problem and the fix, exit status 2, nothing written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from seqtrain import job
from seqtrain.config import Config, config_hash, resolve
from seqtrain.run import main

from conftest import ROOT, run_cli, tiny_flags

MISTAKES = {
    "unknown dataset": (["--dataset", "imagenet22k"], "--dataset 'imagenet22k' is not known"),
    "unknown network": (["--arch", "resnet7"], "--arch 'resnet7' is not known"),
    "unknown head": (["--head", "mlp"], "--head 'mlp' is not known"),
    "too many stages": (["--stages", "11"], "--stages 11 is out of range: resnet20 has 10 blocks"),
    "split not adding up": (["--stages", "3,3"], "must list positive block counts adding up to 10"),
    "stage out of range": (["--stage", "2"], "--stage 2 is out of range"),
    "stage not a number": (["--stage", "last"], "--stage 'last' is not"),
    "missing input cache": (["--stage", "1"], "stage 0 has no complete cache"),
    "bad number": (["--lr", "fast"], "argument --lr: invalid float value"),
    "negative size": (["--n-test", "0"], "--n-test must be at least 1"),
    "batch of one": (["--batch-size", "1"], "--batch-size must be at least 2"),
    "no shuffle window": (["--shuffle-mb", "0"], "--shuffle-mb must be a positive number of MB, got 0.0"),
    "unknown flag": (["--epochs", "3"], "unrecognized arguments: --epochs"),
    "json without plan": (["--json"], "--json prints the plan: give it with --plan"),
    "negative width": (["--width", "-4"], "--width must be 0 or more"),
    "validation share": (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
    "too many images": (["--n-train", "60000"], "--n-train is at most 50000"),
    "bad downsampling": (["--downsample", "fast"], "--downsample 'fast' is not"),
    "dataset not on disk": (["--dataset", "cifar10"], "cifar10 was not found in --data-dir"),
    # Refused before config.json is written, so that the advised smaller batch is not then refused (issue 14).
    "batch above the data": (["--batch-size", "100000"], "leaves no full batch of the 360 training samples"),
    "vgg on small images": (["--arch", "vgg11", "--image-size", "16"], "use --image-size 32 or more"),
    "non-finite number": (["--lr", "nan"], "--lr must be a finite number"),
    "no patience": (["--patience", "0"], "--patience must be at least 1"),  # found by tests/test_fuzz.py
}
if not torch.cuda.is_available():
    MISTAKES["cuda without a gpu"] = (["--device", "cuda"], "torch sees no CUDA GPU")


@pytest.mark.parametrize("case", MISTAKES, ids=list(MISTAKES))
def test_mistake_gets_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    args, message = MISTAKES[case]
    assert main(tiny_flags(tmp_path, *args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("seqtrain: error: ") and message in err, err
    assert "run --stage 0 first" in err or case != "missing input cache"
    assert not (tmp_path / "run").exists()


def test_unknown_dataset_is_named_before_a_torchvision_network_looks_it_up(tmp_path, capsys):
    # Its image size comes from the dataset: an unknown name was a KeyError traceback (issue 14).
    argv = ["--plan", "--arch", "torchvision:resnet18", "--dataset", "nosuchset", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("seqtrain: error: --dataset 'nosuchset' is not known")


def test_real_command_line_prints_no_traceback(tmp_path):
    result = run_cli(tiny_flags(tmp_path, "--arch", "resnet7"))
    assert result.returncode == 2
    assert result.stderr.startswith("seqtrain: error:") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_run_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "occupied"
    target.write_text("not a directory")
    flags = tiny_flags(tmp_path)
    flags[flags.index("--run-dir") + 1] = str(target / "run")
    assert main(flags) == 2
    assert "cannot create --run-dir" in capsys.readouterr().err
    assert target.read_text() == "not a directory"


def test_corrupt_manifest_names_the_file_and_the_rebuild_command(tiny, capsys):
    assert tiny("--stage", "0") == 0
    manifest = tiny.run_dir / "stage_00" / "cache" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    capsys.readouterr()
    assert tiny("--stage", "1") == 2
    err = capsys.readouterr().err
    assert str(manifest) in err and "--stage 0" in err and err.count("\n") == 1
    assert not (tiny.run_dir / "stage_01").exists()


def test_corrupt_shard_is_caught_by_its_checksum(tiny, capsys):
    assert tiny("--stage", "0") == 0
    shard = sorted((tiny.run_dir / "stage_00" / "cache").glob("train-*.h5"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size, one flipped byte in the features
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert tiny("--stage", "1") == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "checksum" in err and "--stage 0" in err


def test_stage_all_checksums_a_complete_stage_it_did_not_write(tiny, capsys, monkeypatch):
    from seqtrain import pipeline

    given = []
    real = pipeline.run_stage

    def spy(*args, **kw):
        given.append((args[3], kw.get("input_just_written")))
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "run_stage", spy)
    assert tiny("--stage", "all") == 0
    # stage 1 read the cache stage 0 had just written in this process: its checksums were not taken again
    assert given == [(0, False), (1, True)]
    shard = sorted((tiny.run_dir / "stage_00" / "cache").glob("train-*.h5"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size, one flipped byte in the features
    shard.write_bytes(bytes(data))
    (tiny.run_dir / "stage_01" / "cache" / "manifest.json").unlink()  # stage 1 must be trained again
    capsys.readouterr()
    given.clear()
    # a later --stage all skips stage 0 as complete, so it verifies stage 0's shards before stage 1 reads them
    assert tiny("--stage", "all") == 2
    err = capsys.readouterr().err
    assert given == [(1, False)] and str(shard) in err and "checksum" in err and "--stage 0" in err


def test_config_file_with_unknown_key(tiny, tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text("epochs = 3\n")
    assert tiny("--config", str(toml)) == 2
    assert "unknown key 'epochs'" in capsys.readouterr().err
    assert not tiny.run_dir.exists()


def test_config_file_with_a_wrong_type(tiny, tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('max-epochs = "ten"\n')
    assert tiny("--config", str(toml)) == 2
    assert "max_epochs must be int, got 'ten'" in capsys.readouterr().err
    assert not tiny.run_dir.exists()


def test_changing_a_finished_runs_configuration_is_refused(tiny, capsys):
    assert tiny("--stage", "0") == 0
    before = json.loads((tiny.run_dir / "config.json").read_text())
    capsys.readouterr()
    assert tiny("--stage", "1", "--lr", "0.2") == 2
    assert "was made with --lr 0.05, not 0.2" in capsys.readouterr().err
    assert json.loads((tiny.run_dir / "config.json").read_text()) == before
    # every change is named, so that dropping what it names is enough; a setting the run lacked reads "without"
    assert tiny("--stage", "1", "--lr", "0.2", "--stages", "auto", "--memory-budget", "64MB") == 2
    err = capsys.readouterr().err
    made, drop = re.search(r"was made (.*): use a new --run-dir, drop (.*) to continue", err).groups()
    assert set(made.split(" and ")) == {"with --lr 0.05, not 0.2", "with --stages 2, not auto",
                                        "without --memory-budget"}
    assert set(drop.split(" and ")) == {"--lr", "--stages", "--memory-budget"} and err.count("\n") == 1
    # a value wrong in itself is named as such, not as a change (--rebuild would only meet it next)
    assert tiny("--stage", "1", "--lr", "-1") == 2
    assert "--lr must be > 0" in capsys.readouterr().err
    assert json.loads((tiny.run_dir / "config.json").read_text()) == before



def test_help_answers_without_loading_torch():
    # --help and flag errors come first; importing torch alone takes seconds on a cold start.
    code = ("import sys\nfrom seqtrain.run import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    assert "--stage STAGE" in out and out.strip().endswith("torch not loaded"), out[-300:]


def test_closed_output_pipe_ends_quietly(tmp_path):
    # `--plan | head -3`: the reader is gone before the plan is printed (python docs, "Note on SIGPIPE").
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "seqtrain.run", "--plan", *tiny_flags(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 1 and err == "", err


@pytest.mark.parametrize("content", ["null", '{"lr": "fast"}', "[1, 2]", '{"max_epochs": 1.5}'])
def test_damaged_config_json_is_named(content, tmp_path, capsys):
    # Found by tests/test_fuzz.py: `null` read as "no configuration", wrong types as a TypeError traceback.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(content)
    # --verify: --plan no longer reads the run directory's config.json
    assert main(["--verify", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqtrain: error: ") and str(tmp_path / "run" / "config.json") in err, err


def test_a_python_only_network_on_the_command_line_is_refused_in_one_line(tmp_path, capsys):
    # Found by tests/test_fuzz.py: `--plan --arch custom:abc` ended in a ValueError traceback.
    for extra in (["--plan"], ["--stage", "all"]):
        assert main([*extra, "--arch", "custom:abc", "--run-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a network given to seqtrain.train_stages() from Python" in err, err
    assert not (tmp_path / "run").exists()


def test_a_run_saved_with_the_loaders_two_windows_keeps_its_hash(tmp_path, capsys):
    # --loader-mb N (two pools) became --shuffle-mb N/2 (one): a run made before resumes as the same run.
    # Such runs were made when --patience defaulted to 3, and before --head-pool; their config.json says so.
    old = {k: v for k, v in Config().to_dict().items() if k not in ("shuffle_mb", "head_pool")} | {
        "loader_mb": 1, "arch": "resnet20", "patience": 3}
    cfg = Config.from_dict(old)
    assert cfg.shuffle_mb == 0.5 and resolve(old, {}, {}).shuffle_mb == 0.5
    assert resolve(old, {}, {}).patience == 3  # a saved value outlives a changed default
    sizes = job.resolve(cfg.validate()).sizes
    assert config_hash(cfg, sizes) == "c8e50988cd63d4bf"  # the hash seqtrain gave it with --loader-mb 1
    then = Config(patience=3, head_pool=0).validate()  # and the then defaults' hash, --loader-mb 128
    assert config_hash(then, job.resolve(then).sizes) == "9aea3ce86242f954"
    toml = tmp_path / "c.toml"
    toml.write_text("loader-mb = 256\n")
    assert main(["--config", str(toml), "--run-dir", str(tmp_path / "run")]) == 2
    assert "loader-mb is now shuffle-mb" in capsys.readouterr().err and not (tmp_path / "run").exists()
