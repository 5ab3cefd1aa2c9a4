"""`make gpu-check`'s driver rehearsed on a CPU (the Triton interpreter, the tiny preset, fp32), so
that the command a GPU machine runs cannot break unseen between GPU runs: every step runs and writes
its JSON, and the modelled time sits beside each measured one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the rehearsal is the CPU form of the check")
def test_gpu_check_rehearsal(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path), "--rehearse"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["steps"]) == {"tests", "op_bench", "gpu_model", "model_vs_measured"}
    tests = summary["steps"]["tests"]["result"]
    assert tests["passed"] >= 10 and tests["failed"] == 0, tests
    rows = json.loads((tmp_path / "model_vs_measured.json").read_text())
    assert {(tuple(r["shape"][1:]), r["mode"]) for r in rows} == {((16, 14, 14), "fwd"), ((16, 14, 14), "fwd+bwd"),
                                                                 ((32, 7, 7), "fwd"), ((32, 7, 7), "fwd+bwd")}
    assert all(r["fused_ms"] > 0 and r["modelled_us"] > 0 for r in rows), rows
