"""bench.gpu_model, the GPU dry run, on a small preset: every launch of the real launch path is
bound by the JIT's binder, compiled for sm_90 and modelled; the JSON has every field, the
numbers are consistent (a pass is the sum of its launches, no launch below the launch cost, the
access widths are PTX widths), and the forward and backward are the five launches each. The
network shapes' registers and spills are tests/test_aot_compile.py's (the same binding)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = {"kernel", "grid", "num_warps", "registers", "spills", "min_global_load_bits", "min_global_store_bits",
          "bytes", "model_us"}


def test_dry_run_small_preset(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "model.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_model", "--preset", "small", "--dtype", "fp16",
                           "--batch", "1", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["target"]["arch"] == 90 and result["target"]["hbm_tb_s"] == 3.35
    cases = result["cases"]
    assert [(c["shape"], c["pass"]) for c in cases] == [([1, 64, 14, 14], "forward"), ([1, 64, 14, 14], "backward")]
    assert [len(c["launches"]) for c in cases] == [5, 5]
    for case in cases:
        assert case["dtype"] == "fp16" and case["memory_format"] == "nchw"
        assert case["model_us"] == pytest.approx(sum(r["model_us"] for r in case["launches"]), abs=1e-2)
        # X read and written once: 1 x 64 x 14 x 14 fp16 at 3.35 TB/s.
        assert case["copy_floor_us"] == pytest.approx(2 * 64 * 14 * 14 * 2 / 3.35e6, abs=1e-3)
        for r in case["launches"]:
            assert set(r) == LAUNCH
            # Spills are reported, not judged here: the AOT test holds the network shapes to none.
            assert 0 < r["registers"] <= 255 and r["spills"] >= 0 and r["bytes"] > 0
            assert r["model_us"] >= result["target"]["launch_us"]
            assert {r["min_global_load_bits"], r["min_global_store_bits"]} <= {8, 16, 32, 64, 128}
    assert "| **total** |" in proc.stdout
