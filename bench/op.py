"""A/B of one SCSA call: eager module vs torch.compile(eager) vs the fused op, side by side in one
run, on the shapes a network really feeds SCSA. On a GPU the fused op is the Triton path and a
device-to-device copy of X is the memory roofline; on a CPU with no C++ extension built the fused
column reports the eager fallback honestly as 'n/a'.

    python -m bench.op --preset resnet50 [--dtype bf16] [--mode fwd+bwd] [--batch 8]
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


def _time_ms(fn, device, reps):
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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


def bench_shape(c, h, w, batch, dtype, mode, device, reps, compile_):
    x = torch.randn(batch, c, h, w, dtype=dtype, device=device, requires_grad=(mode != "fwd"))
    eager = SCSA(c, backend="eager").to(device, dtype).eval()
    fused = SCSA(c, backend="auto").to(device, dtype).eval()
    fused.load_state_dict(eager.state_dict())
    row = dict(shape=[batch, c, h, w], eager_ms=_time_ms(_call(eager, x, mode), device, reps))
    if compile_:
        compiled = torch.compile(eager)
        row["compile_ms"] = _time_ms(_call(compiled, x, mode), device, reps)
    row["fused_ms"] = _time_ms(_call(fused, x, mode), device, reps) if device.type == "cuda" else None
    if device.type == "cuda":
        y = x.detach()
        row["copy_ms"] = _time_ms(lambda: y.clone(), device, reps)
        nbytes = x.numel() * x.element_size()
        row["fused_gbps"] = TRAFFIC_UNITS[mode] * nbytes / row["fused_ms"] / 1e6
        row["copy_gbps"] = 2 * nbytes / row["copy_ms"] / 1e6
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="resnet50", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    ap.add_argument("--mode", default="fwd", choices=sorted(TRAFFIC_UNITS))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--out", default="bench/out/op.json")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    batch = args.batch or (32 if device.type == "cuda" else 8)
    rows = []
    for c, h, w in PRESETS[args.preset]:
        rows.append(bench_shape(c, h, w, batch, dtype, args.mode, device, args.reps, not args.no_compile))
        r = rows[-1]
        fmt = lambda v: "     n/a" if v is None else f"{v:8.3f}"  # noqa: E731
        sp = lambda v: "n/a" if v is None or r.get("fused_ms") is None else f"{v / r['fused_ms']:5.2f}x"  # noqa: E731
        print(f"{str(tuple(r['shape'])):22s} eager {fmt(r['eager_ms'])} ms  compile {fmt(r.get('compile_ms'))} ms  "
              f"fused {fmt(r['fused_ms'])} ms  vs eager {sp(r['eager_ms'])}  vs compile {sp(r.get('compile_ms'))}",
              flush=True)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, threads=torch.get_num_threads(), dtype=str(dtype), mode=args.mode,
                preset=args.preset, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if device.type == "cpu":
        print("note: no GPU here and the C++ CPU path is not built yet, so 'fused' runs only on CUDA.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
