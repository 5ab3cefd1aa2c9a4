"""What both benchmarks share: side-by-side timing, the machine description, and the outputs
(a markdown table on stdout, JSON with every number, a PNG chart)."""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import scsa_ops


def time_all(fns, device, reps, rounds=5, cold=False):
    """{name: median ms per call} for a dict of zero-argument callables, timed side by side.

    GPU: triton.testing.do_bench (CUDA events, L2 flushed before every call, median).
    CPU: perf_counter around each call, after warm-up, in `rounds` interleaved rounds so that
    machine noise (a shared virtual machine drifts by 2-3x over minutes) hits every column alike. With
    cold=True (bench.op --cold) the CPU's caches are flushed before every call, as do_bench
    flushes the GPU's L2: a buffer of twice the last-level cache is written, outside the timing."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return {k: do_bench(fn, warmup=25, rep=max(reps, 20), return_mode="median") for k, fn in fns.items()}
    flush = torch.empty(2 * last_level_cache_bytes() // 4) if cold else None
    for fn in fns.values():
        for _ in range(2):
            fn()
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            for _ in range(max(1, reps // rounds)):
                if flush is not None:
                    flush.fill_(r)
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def compiled(module, **kwargs):
    """torch.compile of `module` for the shapes it will see (dynamic=False: after a first shape
    dynamo would otherwise go symbolic, a weaker baseline). Dynamo's caches are emptied first and a
    hit of its recompile limit raises: the caches are keyed by code object, so every case's new
    module of one class counts against one limit (8 in torch 2.13), past which dynamo runs the
    frame eagerly without an error and a sweep would time eager under the compile label."""
    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(module, dynamic=False, **kwargs)


def cpu_caches():
    """{"L1": "32K", "L2": "512K", ...}: cpu0's data and unified caches as sysfs names their sizes
    ({} where the system does not say)."""
    caches = {}
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (index / "type").read_text().strip() != "Instruction":
                caches[f"L{(index / 'level').read_text().strip()}"] = (index / "size").read_text().strip()
    except OSError:
        pass
    return caches


def last_level_cache_bytes(default=32 << 20):
    """The largest of cpu_caches(), `default` where the system does not say."""
    sizes = []
    for text in cpu_caches().values():
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:].upper(), 1)
        try:
            sizes.append(int(text.rstrip("KMkm")) * scale)
        except ValueError:
            pass
    return max(sizes, default=default)


def cuda_launches(fn):
    """Device kernels (and memsets/copies) that one call of fn launches, read off the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def cpuinfo(*keys):
    """{key: value} of the first line of /proc/cpuinfo for each of `keys` that has one."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in keys and key not in info:
                info[key] = value.strip()
                if len(info) == len(keys):
                    break
    except OSError:
        pass
    return info


def cpu_name():
    return cpuinfo("model name").get("model name") or platform.processor() or "cpu"


def cpu_id():
    """Family, model and cache sizes: a virtual machine may name its CPUs only "AMD EPYC" or "Intel Xeon", and
    the kinds behind one name differ (Zen 3: 512 KiB L2 a core; Zen 4: 1 MiB, AVX512)."""
    info = {**cpuinfo("cpu family", "model"), **cpu_caches()}
    return ", ".join(f"{k} {v}" for k, v in info.items()) or platform.processor() or "unknown"


def machine(device):
    """Where the numbers came from: device, versions, threads, time."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
                device_type=device.type, cpu=cpu_name(), cpu_id=cpu_id(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                kernels_isa=scsa_ops.cpu_capability(),  # the C++ kernels that ran: ATEN_CPU_CAPABILITY lowers both
                cpu_count=os.cpu_count(), threads=torch.get_num_threads(), malloc=_malloc, torch=torch.__version__,
                triton=triton_version, cuda=torch.version.cuda, python=platform.python_version(),
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return info


def machine_line(info):
    dev = info["device"]
    if info["device_type"] != "cuda":
        dev += (f" ({info.get('cpu_id', 'cpu id not recorded')}; torch at {info['cpu_capability']}, "
                f"C++ kernels {info.get('kernels_isa')}; malloc {info.get('malloc', 'default')})")
    return (f"{dev}, {info['threads']} threads, torch {info['torch']}, triton {info['triton']}, "
            f"{info['timestamp']}")


def geomean(values):
    values = [v for v in values if v]
    return statistics.geometric_mean(values) if values else None


def fmt(v, spec=".3f", suffix=""):
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(items, desc):
    """A progress bar on stderr (tqdm) for sweeps; plain iteration when tqdm is missing."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="case", leave=False, dynamic_ncols=True)


def log(msg):
    try:
        from tqdm import tqdm

        tqdm.write(msg)
    except ImportError:
        print(msg, flush=True)


def parser(doc, out):
    """The options both benchmarks take; `out`: the default JSON path."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--out", default=out, help="JSON path; the PNG goes beside it")
    ap.add_argument("--malloc", choices=["pinned", "default"], default="pinned",
                    help="CPU: 'pinned' (default) fixes glibc's mmap and trim thresholds, so that a large tensor "
                         "reuses freed heap pages whatever ran before it (pin_heap); 'default' keeps glibc's "
                         "self-adjusting thresholds")
    return ap


# What pin_heap() made of the CPU allocator; machine() records it with every result.
_malloc = "default"


def pin_heap():
    """Large CPU tensors from glibc's heap, reused as a caching allocator reuses a GPU's: the mmap
    and trim thresholds fixed at 1 GiB. glibc's own thresholds adapt to the process's allocation
    history, so whether a tensor past them is an mmap of fresh pages (first-touch page faults in
    every call) or reused heap depends on what the process allocated before: in a side-by-side run,
    on the other variants (the torch.compile baseline's allocations moved the fused op's times),
    and eager, with its many full-size temporaries, most. A no-op without glibc; machine() says
    which it was."""
    import ctypes

    global _malloc
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        _malloc = "default (not glibc)"
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 30):
        _malloc = "pinned"


def setup(args):
    """The device the benchmark runs on (a GPU if there is one), with the thread count and, on a
    CPU, the allocator setting (--malloc) applied."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.malloc == "pinned":
        pin_heap()
    return device


def figure():
    """A matplotlib module with a file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, title, path):
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(payload, out, plot):
    """JSON with every number at `out`, the chart `plot(png_path)` beside it; says where."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    path = path.resolve()
    plot(path.with_suffix(".png"))
    print(f"\nwrote {path}\nwrote {path.with_suffix('.png')}")
