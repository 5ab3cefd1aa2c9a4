"""One command for a GPU machine with torch preinstalled and no network (`make gpu-check`): the GPU
tests, the op benchmark (fused against eager and torch.compile, fp16, forward and forward +
backward) and the modelled time of every pass beside the measured one, all as JSON in one folder.

    python -m bench.gpu_check --out DIR                    # on a CUDA machine
    python -m bench.gpu_check --out DIR --rehearse         # on a CPU: the same steps, tiny sizes

The rehearsal (tests/test_gpu_check.py runs it in `make test`) takes every step with the Triton
interpreter, the `tiny` preset and fp32, so that the command cannot break unseen between GPU runs.
Each step's wall time is in summary.json; the whole is budgeted at BUDGET_S on one H100.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
BUDGET_S = 8 * 60
# What a GPU has to show: fp64 golden vectors, fp32/fp16/bf16 against the reference, forward and
# backward, CUDA-graph capture of a forward and of a training step, an autocast + GradScaler fp16
# step, torch.compile fullgraph, and no host synchronisation in a training step.
GPU_TESTS = ["tests/test_golden.py", "tests/test_fused.py", "tests/test_launches.py", "tests/test_amp.py",
             "tests/test_compile.py", "tests/test_nonfinite.py"]
# The Triton cases alone: the C++ path's are CPU tests, which `make test` runs everywhere.
GPU_SELECTION = "triton or cuda"
# A CPU rehearsal runs a few of them in the interpreter (seconds, not minutes).
REHEARSAL_SELECTION = "triton and (test_matches_official or test_autocast_gradscaler_step or cuda_graph)"


def run_tests(out, files, selection, workers):
    """pytest on `files` (-k `selection`) with `workers` processes -> tests.json (counts, failures)."""
    xml = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selection, f"--junitxml={xml}",
           *(["-n", str(workers)] if workers > 1 else []), *files]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "tests.log").write_text(proc.stdout + proc.stderr)
    counts, failures = dict(passed=0, failed=0, skipped=0), []
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failures.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    result = dict(command=" ".join(cmd), returncode=proc.returncode, **counts, failures=failures)
    xml.unlink()
    return result


def _python(out, name, *args):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return dict(command=" ".join(["python -m", *args]), log=f"{name}.log")


def modelled_beside_measured(op, model):
    """Per shape: the fused op's measured ms (forward, forward + backward) beside the model's us."""
    modelled = {}
    for case in model["cases"]:
        modelled.setdefault(tuple(case["shape"]), {})[case["pass"]] = case["model_us"]
    rows = []
    for row in op["rows"]:
        m = modelled.get(tuple(row["shape"]), {})
        us = m.get("forward") if row["mode"] == "fwd" else (m.get("forward", 0) + m.get("backward", 0)) or None
        rows.append(dict(shape=row["shape"], mode=row["mode"], dtype=row["dtype"], fused_ms=row["fused_ms"],
                         eager_ms=row["eager_ms"], compile_ms=row["compile_ms"], modelled_us=us,
                         measured_over_model=(row["fused_ms"] * 1e3 / us) if us and row["fused_ms"] else None))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the folder every JSON goes to")
    ap.add_argument("--rehearse", action="store_true", help="a CPU rehearsal: interpreter, tiny preset, fp32")
    ap.add_argument("--workers", type=int, default=None, help="pytest-xdist workers (default: 8 on a GPU)")
    args = ap.parse_args(argv)
    if not args.rehearse and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or --rehearse on a CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset, dtype, batch = ("tiny", "fp32", "2") if args.rehearse else ("resnet50", "fp16", "32")
    workers = args.workers or (1 if args.rehearse else min(8, os.cpu_count() or 1))
    summary = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (rehearsal)",
                   torch=torch.__version__, python=sys.version.split()[0], budget_s=BUDGET_S, steps={})
    try:
        import triton
        summary["triton"] = triton.__version__
    except ImportError:
        summary["triton"] = None
    start = time.perf_counter()

    def step(name, fn):
        t = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # a failed step is reported with the others, and fails the command
            result = dict(error=f"{type(e).__name__}: {e}")
        summary["steps"][name] = dict(seconds=round(time.perf_counter() - t, 1), result=result)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return result

    # The model compiles every launch for sm_90 on the host's CPUs and needs no GPU: it runs beside
    # the tests and the benchmark instead of after them. No interpreter, whatever this process runs.
    no_interpreter = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    model_cmd = [sys.executable, "-m", "bench.gpu_model", "--preset", preset, "--dtype", dtype, "--batch", batch,
                 "--json", str(out / "gpu_model.json")]
    model_log = open(out / "gpu_model.log", "w")
    model_proc = subprocess.Popen(model_cmd, cwd=ROOT, stdout=model_log, stderr=subprocess.STDOUT, env=no_interpreter)
    model_start = time.perf_counter()
    selection = REHEARSAL_SELECTION if args.rehearse else GPU_SELECTION
    step("tests", lambda: run_tests(out, GPU_TESTS, selection, workers))
    bench = ["--preset", preset, "--dtype", dtype, "--batch", batch, "--mode", "fwd", "fwd+bwd",
             "--out", str(out / "op.json")]
    rehearsal = ["--reps", "3", "--no-compile"] if args.rehearse else []
    step("op_bench", lambda: _python(out, "op", "bench.op", *bench, *rehearsal))

    def model():
        code = model_proc.wait()
        model_log.close()
        summary["gpu_model_seconds"] = round(time.perf_counter() - model_start, 1)
        if code != 0:
            raise RuntimeError(f"{' '.join(model_cmd[1:])} failed: see gpu_model.log")
        return dict(command=" ".join(["python", *model_cmd[1:]]), log="gpu_model.log")

    step("gpu_model", model)

    def compare():
        op, model = (json.loads((out / f"{n}.json").read_text()) for n in ("op", "gpu_model"))
        rows = modelled_beside_measured(op, model)
        (out / "model_vs_measured.json").write_text(json.dumps(rows, indent=1))
        print("| shape | mode | fused ms | modelled ms | measured / model | eager ms | compile ms |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            cells = [r["fused_ms"], r["modelled_us"] and r["modelled_us"] / 1e3, r["measured_over_model"],
                     r["eager_ms"], r["compile_ms"]]
            values = " | ".join("-" if v is None else f"{v:.3f}" for v in cells)
            print(f"| {tuple(r['shape'])} | {r['mode']} | {values} |")
        return rows

    step("model_vs_measured", compare)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["within_budget"] = summary["seconds"] <= BUDGET_S
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    tests = summary["steps"]["tests"]["result"]
    failed = [n for n, s in summary["steps"].items() if "error" in s["result"]]
    print(json.dumps(dict(tests={k: tests.get(k) for k in ("passed", "failed", "skipped", "error")},
                          failed_steps=failed, seconds=summary["seconds"]), indent=1))
    return 0 if not failed and not tests.get("failed") and tests.get("returncode") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
