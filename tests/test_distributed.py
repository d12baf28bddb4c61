"""``efface bench`` over two CPU processes (``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m efface
bench``, accelerate's multi-CPU state over gloo): the same numbers as one process, cells dealt to
both processes, ``results.json`` saying who did what, and a rerun resuming from the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from efface.cli import main

ARGS = ["bench", "--model", "toy", "--methods", "uce", "--concepts", "circle", "--no-multi-concept", "--n", "2",
        "--n-other", "1", "--steps", "4", "--kid-subsets", "2", "--batch-size", "4"]


def _torchrun(out, *extra):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "efface", "--", "-q", *ARGS, *extra, "--out", str(out)]  # --: torchrun would read --n as its own
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_two_processes_give_one_process_numbers_and_resume(tmp_path):
    assert main(["-q", *ARGS, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = _torchrun(tmp_path / "two")
    assert one["processes"] == 1 and two["processes"] == 2
    assert [c["name"] for c in two["cells"]] == [c["name"] for c in one["cells"]] == ["base__circle", "uce__circle"]
    assert [c["process"] for c in two["cells"]] == [0, 1]  # the two cells dealt round-robin
    for a, b in zip(one["cells"], two["cells"]):
        assert a["effectiveness"] == b["effectiveness"]
        assert a["utility"]["per_concept"] == b["utility"]["per_concept"]
        assert a["utility"]["paired_distance"] == pytest.approx(b["utility"]["paired_distance"], abs=2e-3)
        assert a["cost"]["parameters_changed"] == b["cost"]["parameters_changed"]
    artifact = tmp_path / "two" / "artifacts" / "uce__circle" / "manifest.json"
    stamp = artifact.stat().st_mtime_ns
    cell = tmp_path / "two" / "cells" / "uce__circle.json"
    cell.unlink()  # a run killed after the fit: the erasure is reused, the cell evaluated again
    again = _torchrun(tmp_path / "two")
    assert artifact.stat().st_mtime_ns == stamp and cell.exists()
    assert again["cells"][1]["effectiveness"] == two["cells"][1]["effectiveness"]
