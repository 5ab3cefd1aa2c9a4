"""A/B of one SCSA call: eager module vs torch.compile(eager) vs the fused op, side by side in one
run, on the shapes a network really feeds SCSA, with a copy of X (read + write) as the memory
roofline. The fused op is the Triton path on a GPU and the C++ path on a CPU (reported as 'n/a'
if the extension is unavailable, never silently replaced by the eager fallback). CPU timings are
interleaved: every implementation is timed in each of several rounds, and the median over all
rounds is reported, so machine noise hits all columns alike.

    python -m bench.op --preset resnet50 [--dtype bf16] [--mode fwd+bwd] [--batch 8] [--threads 2]
"""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from scsa_ops import SCSA

PRESETS = {  # (C, H, W) of each SCSA input, per network at 224x224
    "resnet50": [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRAFFIC_UNITS = {"fwd": 4, "fwd+bwd": 4 + 4.4}  # DESIGN.md: full reads/writes of X per call


def _time_all(fns, device, reps, rounds=5):
    """{name: median ms} for a dict of callables, timed side by side."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return {k: do_bench(fn, warmup=25, rep=100, return_mode="median") for k, fn in fns.items()}
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(max(1, reps // rounds)):
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _call(module, x, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                module(x)
    else:
        g = torch.randn_like(x)

        def run():
            x.grad = None
            module(x).backward(g)
    return run


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _fused_backend(device):
    if device.type == "cuda":
        return "triton"
    from scsa_ops.ops import cpp

    return "cpp" if cpp.load()[0] is not None else None


def bench_shape(c, h, w, batch, dtype, mode, device, reps, compile_):
    x = torch.randn(batch, c, h, w, dtype=dtype, device=device, requires_grad=(mode != "fwd"))
    eager = SCSA(c, backend="eager").to(device, dtype).eval()
    fns = {"eager": _call(eager, x, mode)}
    if compile_:
        fns["compile"] = _call(torch.compile(eager), x, mode)
    backend = _fused_backend(device)
    if backend is not None:
        fused = SCSA(c, backend=backend).to(device, dtype).eval()
        fused.load_state_dict(eager.state_dict())
        fns["fused"] = _call(fused, x, mode)
    y = x.detach()
    fns["copy"] = lambda: y.clone()
    ms = _time_all(fns, device, reps)
    row = dict(shape=[batch, c, h, w], fused_backend=backend,
               **{f"{k}_ms": ms.get(k) for k in ("eager", "compile", "fused", "copy")})
    nbytes = x.numel() * x.element_size()
    row["copy_gbps"] = 2 * nbytes / row["copy_ms"] / 1e6
    if row["fused_ms"] is not None:
        row["fused_gbps"] = TRAFFIC_UNITS[mode] * nbytes / row["fused_ms"] / 1e6
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="resnet50", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    ap.add_argument("--mode", default="fwd", choices=sorted(TRAFFIC_UNITS))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--out", default="bench/out/op.json")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    batch = args.batch or (32 if device.type == "cuda" else 8)
    rows = []
    for c, h, w in PRESETS[args.preset]:
        rows.append(bench_shape(c, h, w, batch, dtype, args.mode, device, args.reps, not args.no_compile))
        r = rows[-1]
        fmt = lambda v: "     n/a" if v is None else f"{v:8.3f}"  # noqa: E731
        sp = lambda v: "n/a" if v is None or r.get("fused_ms") is None else f"{v / r['fused_ms']:5.2f}x"  # noqa: E731
        print(f"{str(tuple(r['shape'])):22s} eager {fmt(r['eager_ms'])} ms  compile {fmt(r.get('compile_ms'))} ms  "
              f"fused {fmt(r['fused_ms'])} ms  copy {fmt(r['copy_ms'])} ms  vs eager {sp(r['eager_ms'])}  "
              f"vs compile {sp(r.get('compile_ms'))}",
              flush=True)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else _cpu_name(),
                torch=torch.__version__, threads=torch.get_num_threads(), dtype=str(dtype), mode=args.mode,
                preset=args.preset, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    for base in ("eager", "compile"):
        ratios = [r[f"{base}_ms"] / r["fused_ms"] for r in rows if r.get(f"{base}_ms") and r["fused_ms"]]
        if len(ratios) == len(rows):
            meta[f"geomean_speedup_vs_{base}"] = statistics.geometric_mean(ratios)
            print(f"geomean speedup of fused vs {base}: {meta[f'geomean_speedup_vs_{base}']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
