"""Every kernel variant that realistic shapes launch compiles for sm_90 (the H100/H200 the model
targets) with no GPU, and the fp32/fp16/bf16 variants use at most 128 registers (every launch's
.maxnreg, scsa_ops/ops/triton/utils.py) and spill none. `python -m
bench.aot_compile` also compiles sm_80; the test keeps to one target, in two shards (one per core),
to fit CI's time. fp64 exists for verification (gradcheck); its
libdevice calls (div, sqrt, exp) may use a small stack frame, so it is held to compiling only."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_compiles_for_gpu_targets_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, "-m", "bench.aot_compile", "90", "--shard", f"{i}/2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
             for i in range(2)]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        assert "TRITON_DEFAULT_FP_FUSION" not in err  # every launch states its FMA contraction
        rows += [json.loads(line) for line in out.splitlines()]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_pool_fwd_kernel", "_spatial_gate_fwd_kernel", "_gated_pool_fwd_kernel", "_group_fwd_kernel",
                       "_channel_attention_fwd_kernel", "_poison_logits_kernel", "_apply_gates_kernel",
                       "_gate_grads_bwd_kernel", "_channel_attention_bwd_kernel", "_spatial_gate_bwd_kernel",
                       "_param_grads_kernel"}
    assert {r["sm"] for r in rows} == {90}
    spilling = [r for r in rows if (r["spill_bytes"] or r["regs"] > 128) and "*fp64" not in r["ptr_types"]]
    assert spilling == [], spilling
