"""Op-level A/B of one SCSA call: the eager module, torch.compile of it, the fused op, and a copy
of X (`x.clone()`: one read + one write, the memory roofline), side by side in one run, on the
SCSA input shapes a network really produces (traced from scsa_ops.models, with how many of its
SCSA modules see each shape). Fused = Triton on a GPU, the C++ path on a CPU (reported 'n/a' if
unavailable, never silently replaced by the eager fallback).

    python -m bench.op --preset resnet50 mobilenetv2 --dtype fp32 bf16 --mode fwd fwd+bwd \\
        --memory-format nchw channels_last [--batch 8] [--threads 2] [--no-compile]

Writes a markdown table to stdout, and JSON + PNG (default bench/out/op.json, op.png). fwd+bwd is a
training step as the op sees it, for every variant: the gradients set to None before the backward
(optimizer.zero_grad()), and every parameter given a new version after it, as an optimizer step
does (torch.autograd.graph.increment_version; the step's own arithmetic is left out).
On a CPU, glibc's mmap and trim thresholds are pinned (--malloc, common.pin_heap): large tensors
reuse freed heap pages, so that no variant's times depend on what the others allocated before it
(with glibc's self-adjusting thresholds the torch.compile baseline's allocations moved the fused
op's), and eager, which allocates most, is at its strongest. --malloc default measures glibc as it
comes, first-touch page faults of fresh mappings included.
Modelled bytes: DESIGN.md traffic units (full reads/writes of X) x bytes of X; GB/s of the fused
op as a fraction of the copy's measured GB/s says how close it runs to the memory limit.
"""
import itertools

import torch
from torch.autograd.graph import increment_version

from scsa_ops import SCSA
from scsa_ops.models import BUILDERS, scsa_input_shapes

from . import common

PRESETS = {  # network and input size (H, W); batch: the device default unless fixed here
    "resnet50": dict(network="resnet50", input=(224, 224)),
    "resnet101": dict(network="resnet101", input=(224, 224)),
    "mobilenetv2": dict(network="mobilenetv2", input=(224, 224)),
    "detection": dict(network="resnet50", input=(800, 1333), batch=2),
    "tiny": dict(shapes=[(16, 14, 14), (32, 7, 7)]),  # the benchmark's own test: seconds, not a network
    # One small map at batch 1, where per-call overhead dominates: a training step's worst case.
    "small": dict(shapes=[(64, 14, 14)], batch=1),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# Fused traffic in full reads/writes of X (DESIGN.md): forward 3 reads + 1 write; backward: gate_grads
# reads g and X, input_grad reads g and X and writes dX. The backward's per-window partial sums
# (about 3/7 of X in fp32) and every other small tensor are left out.
FUSED_UNITS = {"fwd": 4, "fwd+bwd": 4 + 5}
IMPLS = ("eager", "compile", "fused", "copy")


def preset_shapes(name, batch):
    """[((B, C, H, W), how many SCSA modules of the network see it)] in network order."""
    p = PRESETS[name]
    if "shapes" in p:
        return [((p.get("batch", batch), *s), 1) for s in p["shapes"]]
    with torch.device("meta"):
        model = BUILDERS[p["network"]](backend="eager")
    return list(scsa_input_shapes(model, (p.get("batch", batch), 3, *p["input"])).items())


def fused_backend(device):
    if device.type == "cuda":
        return "triton"
    from scsa_ops.ops import cpp

    return "cpp" if cpp.load()[0] is not None else None


def _call(module, x, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                module(x)
    else:
        g = torch.randn_like(x)
        params = list(module.parameters())

        def run():
            # A training step as the op sees it: zero_grad() (set_to_none, its default) leaves no
            # gradient to accumulate into, so the backward hands each parameter its fresh one.
            x.grad = None
            for p in params:
                p.grad = None
            module(x).backward(g)
            # The optimizer step's effect on the op: a new version of every parameter (a check
            # cached per version would show here). Its arithmetic is the optimizer's, the same for
            # every variant; bench.model --train times a real one.
            increment_version(params)
    return run


def bench_case(shape, dtype_name, mode, memory_format, device, reps, compile_, cold=False):
    """One row: median ms of every implementation, speed-ups, bytes, bandwidth, launches."""
    c, dtype = shape[1], DTYPES[dtype_name]
    x = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=MEMORY_FORMATS[memory_format])
    x.requires_grad_(mode != "fwd")
    eager = SCSA(c, backend="eager").to(device, dtype).eval()
    fns = {"eager": _call(eager, x, mode)}
    if compile_:
        fns["compile"] = _call(common.compiled(eager), x, mode)  # for this shape only
    backend = fused_backend(device)
    if backend is not None:
        fused = SCSA(c, backend=backend).to(device, dtype).eval()
        fused.load_state_dict(eager.state_dict())
        fns["fused"] = _call(fused, x, mode)
    y = x.detach()
    fns["copy"] = lambda: y.clone()
    ms = common.time_all(fns, device, reps, cold=cold)
    row = dict(shape=list(shape), dtype=dtype_name, mode=mode, memory_format=memory_format,
               fused_backend=backend, **{f"{k}_ms": ms.get(k) for k in IMPLS})
    for base in ("eager", "compile"):
        ok = row[f"{base}_ms"] is not None and row["fused_ms"] is not None
        row[f"speedup_vs_{base}"] = row[f"{base}_ms"] / row["fused_ms"] if ok else None
    x_bytes = x.numel() * x.element_size()
    row["x_bytes"] = x_bytes
    row["fused_modelled_bytes"] = FUSED_UNITS[mode] * x_bytes
    row["copy_gbps"] = 2 * x_bytes / row["copy_ms"] / 1e6
    row["fused_gbps"] = row["fused_modelled_bytes"] / row["fused_ms"] / 1e6 if row["fused_ms"] else None
    row["fused_fraction_of_copy_bw"] = row["fused_gbps"] / row["copy_gbps"] if row["fused_gbps"] else None
    row["launches"] = {k: common.cuda_launches(fn) for k, fn in fns.items()} if device.type == "cuda" else None
    return row


def summarise(rows):
    """Per (preset, dtype, mode, memory format): geomean speed-ups, and the SCSA time of one
    forward of the whole network (sum of count x ms) per implementation."""
    groups = {}
    for r in rows:
        groups.setdefault((r["preset"], r["dtype"], r["mode"], r["memory_format"]), []).append(r)
    out = []
    for (preset, dtype, mode, fmt), rs in groups.items():
        s = dict(preset=preset, dtype=dtype, mode=mode, memory_format=fmt, shapes=len(rs))
        for base in ("eager", "compile"):
            ratios = [r[f"speedup_vs_{base}"] for r in rs]
            s[f"geomean_speedup_vs_{base}"] = common.geomean(ratios) if all(ratios) else None
        for k in IMPLS:
            vals = [r[f"{k}_ms"] for r in rs]
            s[f"network_{k}_ms"] = sum(r["count"] * v for r, v in zip(rs, vals)) if all(vals) else None
        out.append(s)
    return out


def print_table(rows, summary, machine, cold=False):
    caches = "; caches flushed before every call" if cold else ""
    print(f"\nSCSA op benchmark on {common.machine_line(machine)}{caches}")
    header = ["preset", "shape", "x", "dtype", "mode", "format", "eager ms", "compile ms", "fused ms", "copy ms",
              "vs eager", "vs compile", "fused GB/s", "of copy BW"]
    if any(r["launches"] for r in rows):
        header.append("launches e/c/f")
    body = []
    for r in rows:
        line = [r["preset"], tuple(r["shape"]), r["count"], r["dtype"], r["mode"], r["memory_format"],
                *[common.fmt(r[f"{k}_ms"]) for k in IMPLS],
                common.fmt(r["speedup_vs_eager"], ".2f", "x"), common.fmt(r["speedup_vs_compile"], ".2f", "x"),
                common.fmt(r["fused_gbps"], ".1f"), common.fmt(r["fused_fraction_of_copy_bw"], ".0%")]
        if len(header) > len(line):
            line.append("/".join(str(r["launches"].get(k, "-")) for k in ("eager", "compile", "fused")))
        body.append(line)
    print(common.markdown_table(header, body))
    print()
    header = ["preset", "dtype", "mode", "format", "geomean vs eager", "geomean vs compile",
              "network SCSA ms: eager", "compile", "fused"]
    print(common.markdown_table(header, [
        [s["preset"], s["dtype"], s["mode"], s["memory_format"], common.fmt(s["geomean_speedup_vs_eager"], ".2f", "x"),
         common.fmt(s["geomean_speedup_vs_compile"], ".2f", "x"), *[common.fmt(s[f"network_{k}_ms"], ".2f")
                                                                   for k in ("eager", "compile", "fused")]]
        for s in summary]))


def plot(rows, summary, machine, path):
    plt = common.figure()
    groups = [(s["preset"], s["dtype"], s["mode"], s["memory_format"]) for s in summary]
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 3.6 * len(groups)), squeeze=False)
    colors = dict(eager="#888888", compile="#4c72b0", fused="#dd8452", copy="#55a868")
    for (ax_ms, ax_sp), key in zip(axes, groups):
        rs = [r for r in rows if (r["preset"], r["dtype"], r["mode"], r["memory_format"]) == key]
        labels = ["x".join(map(str, r["shape"][1:])) + f"\n(x{r['count']})" for r in rs]
        n, width = len(rs), 0.2
        for i, k in enumerate(IMPLS):
            vals = [r[f"{k}_ms"] or 0 for r in rs]
            ax_ms.bar([j + (i - 1.5) * width for j in range(n)], vals, width, label=k, color=colors[k])
        ax_ms.set_yscale("log")
        ax_ms.set_ylabel("ms per call (log)")
        ax_ms.set_title(f"{' / '.join(key)}: latency, batch {rs[0]['shape'][0]}", fontsize=9)
        ax_ms.set_xticks(range(n), labels, fontsize=7)
        ax_ms.legend(fontsize=7)
        for i, base in enumerate(("eager", "compile")):
            vals = [r[f"speedup_vs_{base}"] or 0 for r in rs]
            bars = ax_sp.bar([j + (i - 0.5) * 0.35 for j in range(n)], vals, 0.35, label=f"fused vs {base}",
                             color=colors[base])
            ax_sp.bar_label(bars, fmt="%.1fx", fontsize=6)
        ax_sp.axhline(1.0, color="black", linewidth=0.8)
        ax_sp.set_ylabel("speed-up of fused")
        ax_sp.set_title(f"{' / '.join(key)}: speed-up", fontsize=9)
        ax_sp.set_xticks(range(n), labels, fontsize=7)
        ax_sp.legend(fontsize=7)
    common.save_figure(plt, fig, f"SCSA op: {common.machine_line(machine)}", path)


def main(argv=None):
    ap = common.parser(__doc__, "bench/out/op.json")
    ap.add_argument("--preset", nargs="+", default=["resnet50"], choices=sorted(PRESETS))
    ap.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES),
                    help="default: fp16 on a GPU, fp32 on a CPU")
    ap.add_argument("--mode", nargs="+", default=["fwd"], choices=sorted(FUSED_UNITS))
    ap.add_argument("--memory-format", nargs="+", default=["nchw"], choices=sorted(MEMORY_FORMATS))
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on a GPU, 8 on a CPU (detection: 2)")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per implementation and case")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--cold", action="store_true",
                    help="CPU: flush the caches before every timed call (as do_bench flushes a GPU's L2)")
    args = ap.parse_args(argv)
    device = common.setup(args)
    dtypes = args.dtype or (["fp16"] if device.type == "cuda" else ["fp32"])
    if device.type == "cpu" and "fp16" in dtypes:
        ap.error("fp16 is a GPU dtype in this benchmark; on a CPU use fp32 or bf16")
    batch = args.batch or (32 if device.type == "cuda" else 8)
    cases = [(p, s, n, d, m, f) for p in args.preset for s, n in preset_shapes(p, batch)
             for d, m, f in itertools.product(dtypes, args.mode, args.memory_format)]
    machine = common.machine(device)
    rows = []
    for preset, shape, count, dt, mode, fmt in common.progress(cases, "bench.op"):
        row = dict(preset=preset, count=count, **bench_case(shape, dt, mode, fmt, device, args.reps,
                                                            not args.no_compile, args.cold))
        rows.append(row)
        common.log(f"{preset} {tuple(shape)} {dt} {mode} {fmt}: fused {common.fmt(row['fused_ms'])} ms, "
                   f"eager {common.fmt(row['eager_ms'])} ms, compile {common.fmt(row['compile_ms'])} ms")
    summary = summarise(rows)
    print_table(rows, summary, machine, args.cold and device.type == "cpu")
    payload = dict(benchmark="op", machine=machine,
                   settings=dict(batch=batch, reps=args.reps, compile=not args.no_compile, cold=args.cold,
                                 fused_units=FUSED_UNITS, timing=common.time_all.__doc__.split("\n\n")[1].strip()),
                   rows=rows, summary=summary)
    common.write_outputs(payload, args.out, lambda png: plot(rows, summary, machine, png))
    return payload


if __name__ == "__main__":
    main()
