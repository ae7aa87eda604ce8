"""The benchmarks check their optional plotting dependency before they measure: without matplotlib they stop
at once with the install line, instead of failing in the plot after minutes of measuring (issue 14)."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize("name", ["memory", "accuracy"])
def test_benchmark_without_matplotlib_stops_before_measuring(name, tmp_path, monkeypatch):
    benchmark = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now finds nothing
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        benchmark.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert str(stop.value.code).endswith('install it with: pip install -e ".[bench]"'), stop.value.code
    assert not out.exists()  # nothing measured, nothing written
