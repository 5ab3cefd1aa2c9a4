"""bench.gpu_model, the GPU dry run, on the small preset and a 56-wide map: every launch of the real
launch path is bound by the JIT's binder, compiled for sm_90 and modelled; the JSON has every
field, the numbers are consistent (a pass is the sum of its launches, no launch below the launch
cost, the access widths are PTX widths), the forward's five launches (four with group_forward) and the
flag of non-finite parameters, the backward's five,
every launch stays within 128 registers without spilling, and the full-size NCHW accesses are as
wide as the row allows: 128 bits (8 fp16) at W = 56, 32 bits at W = 14. The network shapes'
registers and spills are tests/test_aot_compile.py's too (the same binding)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = {"kernel", "grid", "num_warps", "registers", "spills", "min_global_load_bits", "min_global_store_bits",
          "full_size_load_bits", "full_size_store_bits", "bytes", "model_us"}
# The launches that read or write a full-size tensor (X, g, out, dX): the forward's of a map that
# takes the separate passes and of one that takes group_forward's F1-F3 launch, and the backward's.
FULL_SIZE = {"forward": ["_pool_fwd_kernel", "_gated_pool_fwd_kernel", "_apply_gates_kernel"],
             "group forward": ["_group_fwd_kernel", "_apply_gates_kernel"],
             "backward": ["_gate_grads_bwd_kernel", "_apply_gates_kernel"]}


def test_dry_run_small_preset(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "model.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_model", "--preset", "small", "--shape", "1,16,28,56",
                           "--dtype", "fp16", "--batch", "1", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["target"]["arch"] == 90 and result["target"]["hbm_tb_s"] == 3.35
    cases = result["cases"]
    assert [(c["shape"], c["pass"]) for c in cases] == [([1, 64, 14, 14], "forward"), ([1, 64, 14, 14], "backward"),
                                                       ([1, 16, 28, 56], "forward"), ([1, 16, 28, 56], "backward")]
    # (1, 64, 14, 14) takes group_forward (F1-F3 in one launch), (1, 16, 28, 56) the separate passes.
    assert [len(c["launches"]) for c in cases] == [4, 5, 6, 5]
    for case in cases:
        assert case["dtype"] == "fp16" and case["memory_format"] == "nchw"
        assert case["model_us"] == pytest.approx(sum(r["model_us"] for r in case["launches"]), abs=1e-2)
        # X read and written once: B x C x H x W fp16 at 3.35 TB/s.
        numel = 1
        for n in case["shape"]:
            numel *= n
        assert case["copy_floor_us"] == pytest.approx(2 * numel * 2 / 3.35e6, abs=1e-3)
        # 16-bit elements, 8 to a 128-bit access where W and the strides allow (56), 2 at W = 14.
        width = 128 if case["shape"][3] == 56 else 32
        for r in case["launches"]:
            assert set(r) == LAUNCH
            assert 0 < r["registers"] <= 128 and r["spills"] == 0, r
            assert r["bytes"] > 0 and r["model_us"] >= result["target"]["launch_us"]
            assert {r["min_global_load_bits"], r["min_global_store_bits"]} <= {8, 16, 32, 64, 128}
        full = [r for r in case["launches"] if r["full_size_load_bits"] is not None]
        grouped = case["pass"] == "forward" and case["shape"][2] == 14
        assert [r["kernel"] for r in full] == FULL_SIZE["group forward" if grouped else case["pass"]]
        assert all(r["full_size_load_bits"] == width for r in full), full
        # Only the output / dX pass writes a full-size tensor.
        assert [r["full_size_store_bits"] for r in full] == [None] * (len(full) - 1) + [width]
    assert "| **total** |" in proc.stdout


def test_host_time_counts_the_real_launch_path(tmp_path):
    """--host times the module's calls with the launches stubbed: every launch of a forward (four
    for these small maps: group_forward) and of a forward + backward (nine) reaches the stub (so only
    the kernels' own launch path is left out), and the
    stub keeps no launch's tensors alive (each call's outputs are freed, as on a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_model", "--host", "--preset", "small", "--shape",
                           "2,16,8,12", "--batch", "1", "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["host"]
    assert [r["shape"] for r in rows] == [[1, 64, 14, 14], [2, 16, 8, 12]]
    for r in rows:
        assert (r["launches_forward"], r["launches_train"]) == (4, 9), r
        assert 0 < r["forward_us"] < r["train_us"], r
        assert 0 < r["autograd_floor_us"] < r["train_us"], r

    import gc
    import weakref

    import torch

    from scsa_ops.ops.triton.launches import LaunchRecorder
    from scsa_ops.ops.triton.pool import pool

    rec = LaunchRecorder(execute=False, keep=False)
    try:
        outs = [weakref.ref(t) for t in pool(torch.randn(1, 16, 8, 8), torch.float32)]
        gc.collect()
        assert rec.count == 1 and rec.launches == [] and all(o() is None for o in outs)
    finally:
        rec.restore()
