"""A dry run of the fused GPU path with no GPU: the real launchers run the forward and backward on
CPU tensors with the kernels' bodies skipped (scsa_ops.ops.triton.launches.LaunchRecorder), every launch is bound
by Triton's own JIT binder (so the compiled variant carries exactly the specialisation a launch on
a GPU would: divisibility-by-16 hints, integers equal to 1 as constants), compiled for sm_90, and
reported: registers and spills (ptxas -v), the narrowest global load and store in the PTX, and
among them those of the full-size tensors (X, g, out, dX: the accesses whose address derives
from those arguments, traced through the PTX), the bytes its tensor arguments hold, and a
roofline time.

    python -m bench.gpu_model --preset resnet50 --dtype fp16 --batch 32 [--memory-format nchw] [--json PATH]
    python -m bench.gpu_model --shape 1,16,14,56 [--preset ...]   # more shapes, each an SCSA(C)
    python -m bench.gpu_model --host [--preset ...]   # the host (Python) time of a call instead

The model (an H100 SXM: 3.35 TB/s HBM3): a launch moves every tensor argument once, whole (read
or written), and takes max(bytes / 3.35 TB/s, 2 us), 2 us being a launch's fixed cost on the
device; a pass is the sum of its launches. The copy floor of a pass is what `x.clone()` moves: X
read and written once (the forward's output, the backward's dX are X-sized). The model ignores
latency and occupancy, so it is a lower bound: how far a pass is from it is what the kernels'
memory traffic alone costs. Run without TRITON_INTERPRET (the interpreter's kernels are not
JIT functions).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without the interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from bench.common import machine, machine_line, pin_heap  # noqa: E402
from bench.op import DTYPES, MEMORY_FORMATS, PRESETS, preset_shapes  # noqa: E402
from scsa_ops import SCSA, backends  # noqa: E402
from scsa_ops.autograd import fused_scsa  # noqa: E402
from scsa_ops.backends import triton_provider  # noqa: E402
from scsa_ops.ops.triton.launches import LaunchRecorder, all_kernels  # noqa: E402

TARGET = dict(name="H100 SXM (model)", arch=90, hbm_tb_s=3.35, launch_us=2.0)


def record(module, x):
    """[(pass, kernel name, args, kwargs, grid)] of one fused forward and backward of `module`."""
    rec = LaunchRecorder(execute=False)
    try:
        x = x.detach().requires_grad_()
        out = fused_scsa(x, module.state_dict_params(), module.config, triton_provider()[0])
        n_forward = len(rec.launches)
        out.backward(torch.ones_like(out))
    finally:
        rec.restore()
    return [("forward" if i < n_forward else "backward", name, args, kwargs, grid)
            for i, ((name, args, kwargs), grid) in enumerate(zip(rec.launches, rec.grids))]


def bind(kernel, args, kwargs, arch):
    """(bound arguments, the ASTSource a launch compiles, its options), by the JIT's own binder and
    argument packing (triton/runtime/jit.py JITFunction.run) for target sm_<arch>."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return bound, ASTSource(kernel, signature, constexprs, attrs), options


def ptxas_report(ptx, arch):
    """(registers, spill bytes) from ptxas -v, with the flags Triton's own ptxas call uses."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", "-lineinfo",
                              f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = max(int(r) for r in re.findall(r"Used (\d+) registers", log))
    return regs, sum(int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")
_INSTRUCTION = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.:]*)\s+([^;]*);")
_REGISTER = re.compile(r"%[a-z]+\d+")
_PARAM = re.compile(r"_param_(\d+)\]")


def accesses_by_param(ptx):
    """[(ld|st, bits, {kernel parameter indices})]: every global access with the parameters its
    address derives from, traced back through the instructions that define each register."""
    defs, params, accesses = {}, {}, []
    for line in ptx.splitlines():
        found = _INSTRUCTION.match(line)
        if not found:
            continue
        op, operands = found.groups()
        access = _ACCESS.match(op + " ")
        if op.startswith("ld.param"):
            named = _PARAM.search(operands)  # none for a load through a register (a param-space pointer)
            if named:
                params.setdefault(_REGISTER.findall(operands)[0], set()).add(int(named.group(1)))
        elif access:
            kind, vec, bits = access.groups()
            address = _REGISTER.findall(operands[operands.index("["):])[0]
            accesses.append((kind, int(vec or 1) * int(bits), address))
        elif operands.startswith("{"):
            dst, src = operands.split("}", 1)
            for reg in _REGISTER.findall(dst):
                defs.setdefault(reg, set()).update(_REGISTER.findall(src))
        elif (regs := _REGISTER.findall(operands)):
            defs.setdefault(regs[0], set()).update(regs[1:])
    out = []
    for kind, bits, address in accesses:
        reached, seen, stack = set(), set(), [address]
        while stack:
            reg = stack.pop()
            if reg not in seen:
                seen.add(reg)
                reached |= params.get(reg, set())
                stack.extend(defs.get(reg, ()))
        out.append((kind, bits, reached))
    return out


def narrowest(accesses, params=None):
    """(narrowest global load, narrowest global store) in bits (vector lanes x element width) of
    `accesses` (accesses_by_param), or of those whose address derives from one of `params`; None
    where there is none."""
    widths = {"ld": [], "st": []}
    for kind, bits, reached in accesses:
        if params is None or reached & params:
            widths[kind].append(bits)
    return min(widths["ld"], default=None), min(widths["st"], default=None)


def full_size_params(src, bound, numel):
    """Indices of the launch's kernel parameters that are full-size tensors (numel elements: X, g,
    out, dX), in the PTX's parameter order (the non-constexpr arguments)."""
    names = [name for name, ty in src.signature.items() if ty != "constexpr"]
    return {i for i, name in enumerate(names) if isinstance(bound[name], torch.Tensor) and bound[name].numel() == numel}


def tensor_bytes(bound):
    return sum(v.numel() * v.element_size() for v in bound.values() if isinstance(v, torch.Tensor))


def model_launch(name, args, kwargs, grid, kernels, arch, cache, numel):
    kernel = kernels[name]
    bound, src, options = bind(kernel, args, kwargs, arch)
    key = (name, src.hash(), str(options))
    if key not in cache:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        ptx = compiled.asm["ptx"]
        accesses = accesses_by_param(ptx)
        cache[key] = (*ptxas_report(ptx, arch), *narrowest(accesses),
                      *narrowest(accesses, full_size_params(src, bound, numel)))
    regs, spills, load_bits, store_bits, x_load_bits, x_store_bits = cache[key]
    grid = grid(bound) if callable(grid) else grid
    moved = tensor_bytes(bound)
    model_us = max(moved / (TARGET["hbm_tb_s"] * 1e6), TARGET["launch_us"])
    return dict(kernel=name, grid=list(grid), num_warps=options.num_warps, registers=regs, spills=spills,
                min_global_load_bits=load_bits, min_global_store_bits=store_bits,
                full_size_load_bits=x_load_bits, full_size_store_bits=x_store_bits, bytes=moved,
                model_us=round(model_us, 3))


def cases(shapes, dtype_name, memory_format, arch=TARGET["arch"]):
    """One result per shape and pass; shapes: [(B, C, H, W)], each an SCSA(C) as bench.op builds it."""
    kernels, cache, out = all_kernels(), {}, []
    for shape in shapes:
        module = SCSA(shape[1]).to(DTYPES[dtype_name])
        x = torch.randn(shape, dtype=DTYPES[dtype_name]).contiguous(memory_format=MEMORY_FORMATS[memory_format])
        launches = record(module, x)
        copy_floor_us = 2 * x.numel() * x.element_size() / (TARGET["hbm_tb_s"] * 1e6)
        for pass_ in ("forward", "backward"):
            rows = [model_launch(name, args, kwargs, grid, kernels, arch, cache, x.numel())
                    for p, name, args, kwargs, grid in launches if p == pass_]
            out.append({"shape": list(shape), "dtype": dtype_name, "memory_format": memory_format, "pass": pass_,
                        "launches": rows, "model_us": round(sum(r["model_us"] for r in rows), 3),
                        "copy_floor_us": round(copy_floor_us, 3)})
    return out


def table(results):
    lines = ["| shape | dtype | format | pass | kernel | grid | warps | regs | spills | ld bits | st bits | "
             "X ld/st bits | MB | model us |", "|" + " --- |" * 14]
    for case in results:
        head = f"| {tuple(case['shape'])} | {case['dtype']} | {case['memory_format']} | {case['pass']} |"
        for r in case["launches"]:
            full = "/".join("-" if b is None else str(b) for b in (r["full_size_load_bits"], r["full_size_store_bits"]))
            lines.append(f"{head} {r['kernel']} | {tuple(r['grid'])} | {r['num_warps']} | {r['registers']} | "
                         f"{r['spills']} | {r['min_global_load_bits']} | {r['min_global_store_bits']} | {full} | "
                         f"{r['bytes'] / 1e6:.2f} | {r['model_us']:.2f} |")
        lines.append(f"{head} **total** | | | | | | | | | **{case['model_us']:.2f}** (copy floor "
                     f"{case['copy_floor_us']:.2f}, {case['model_us'] / case['copy_floor_us']:.1f}x) |")
    return "\n".join(lines)


def _autograd_floor(params):
    """An autograd.Function with SCSA's inputs and none of its work: the forward saves x and the
    parameters and allocates the output, the backward hands back gradients made once. What torch's
    autograd (apply, the engine, one edge per parameter) costs a training call before any of the
    package's own host code."""
    grads = [torch.zeros_like(p) for p in params]

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *params):
            ctx.save_for_backward(x, *params)
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, g):
            _ = ctx.saved_tensors  # unpacked, as every backward does
            return (g, *grads)

    return Floor.apply


def host_us(shapes, dtype_name, memory_format, calls=100, repeats=30):
    """[{shape, forward_us, train_us, autograd_floor_us}]: host time per call of
    scsa_ops.SCSA(C, backend='triton') as a GPU run makes it (the module's checks, dispatch,
    launchers, allocations), every kernel launch stubbed before Triton's own launch path (kernel.run:
    scsa_ops.ops.triton.launches.LaunchRecorder), on CPU tensors. forward: an inference call;
    train: forward + backward; autograd_floor: the same forward + backward of _autograd_floor, the
    part of train that is torch's. Min over `repeats` runs of `calls` calls, every case in each
    round (a shared machine's timing swings by 2x for seconds at a time: the minimum is what the
    code costs)."""
    import time

    pin_heap()  # as a GPU run's caching allocator hands a freed block straight back
    provider = triton_provider()[0]
    triton_for, resolved = backends._triton_for, backends._resolved
    backends._triton_for = lambda device: (provider, None)  # the provider of a CUDA device
    backends._resolved = {}
    rec = LaunchRecorder(execute=False, keep=False)
    try:
        out, timed = [], []  # rows; (row, key, fn) to time
        for shape in shapes:
            module = SCSA(shape[1], backend="triton").to(DTYPES[dtype_name])
            x = torch.randn(shape, dtype=DTYPES[dtype_name]).contiguous(memory_format=MEMORY_FORMATS[memory_format])
            xg = x.detach().requires_grad_()
            g = torch.ones_like(x)
            wrt = [xg, *module.parameters()]

            def forward(module=module, x=x):  # an inference call (grad mode is off around the timing loop)
                module(x)

            def train(module=module, xg=xg, wrt=wrt, g=g):  # autograd.grad: no .grad accumulation (CPU work)
                torch.autograd.grad(module(xg), wrt, g)

            floor_apply = _autograd_floor(wrt[1:])

            def floor(apply=floor_apply, wrt=wrt, g=g):
                torch.autograd.grad(apply(*wrt), wrt, g)

            row = {"shape": list(shape)}
            out.append(row)
            for key, fn, grad in (("forward_us", forward, False), ("train_us", train, True)):
                rec.count = 0
                with torch.set_grad_enabled(grad):
                    fn()
                row["launches_" + key[:-3]] = rec.count
                row[key] = float("inf")
                timed.append((row, key, fn, grad))
            row["autograd_floor_us"] = float("inf")
            timed.append((row, "autograd_floor_us", floor, True))
        # Interleaved: a slow spell of the machine (seconds long) then hits every case alike.
        for _ in range(repeats):
            for row, key, fn, grad in timed:
                with torch.set_grad_enabled(grad):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    row[key] = min(row[key], round((time.perf_counter() - t0) / calls * 1e6, 1))
    finally:
        rec.restore()
        backends._triton_for, backends._resolved = triton_for, resolved
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="*", choices=sorted(PRESETS), default=["resnet50"])
    ap.add_argument("--shape", action="append", default=[], type=lambda s: tuple(int(v) for v in s.split(",")),
                    help="B,C,H,W: a shape to add to the presets' (repeatable)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--memory-format", choices=["nchw", "channels_last"], default="nchw")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--host", action="store_true", help="measure the host time of a call instead (no compiling)")
    args = ap.parse_args(argv)
    shapes = [shape for preset in args.preset for shape, _ in preset_shapes(preset, args.batch)] + args.shape
    if args.host:
        rows = host_us(shapes, args.dtype, args.memory_format)
        info = machine(torch.device("cpu"))
        print(f"Host time per call, launches stubbed, {args.dtype}, {args.memory_format}: {machine_line(info)}")
        print("| shape | forward us (launches) | forward + backward us (launches) | of which autograd's floor us |\n"
              "| --- | --- | --- | --- |")
        for r in rows:
            print(f"| {tuple(r['shape'])} | {r['forward_us']} ({r['launches_forward']}) | {r['train_us']} "
                  f"({r['launches_train']}) | {r['autograd_floor_us']} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(machine=info, dtype=args.dtype, memory_format=args.memory_format, host=rows), f,
                          indent=1)
        return rows
    results = cases(shapes, args.dtype, args.memory_format)
    print(f"Dry run, {TARGET['name']}: sm_{TARGET['arch']}, {TARGET['hbm_tb_s']} TB/s, "
          f"{TARGET['launch_us']} us a launch; triton {triton.__version__}, torch {torch.__version__}")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(target=TARGET, cases=results), f, indent=1)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
