"""Model-level A/B: images/s of a network without SCSA, and of the same network with SCSA run
eagerly, fused, and under torch.compile (the eager module compiled, and the fused op inside a
compiled network), measured side by side in one run. The headline is the
fraction of the plain network's throughput that the SCSA network keeps (paper, RTX 4090:
2019 / 2433 = 0.83 for eager SCSA-ResNet-50). The compiled SCSA networks are compared with
the compiled plain network, since torch.compile also speeds up the convolutions around SCSA.

    python -m bench.model --model resnet50 mobilenetv2 [--batch 8] [--amp] [--channels-last]
        [--size 224] [--threads 2] [--compile | --no-compile] [--train]

Inference (no_grad, eval mode), or with --train one training step per batch (train mode:
forward, cross-entropy, backward, SGD with momentum; each variant its own optimizer). Writes a
markdown table to stdout and JSON + PNG (default bench/out/model.json, model.png).
"""
import argparse
import contextlib

import torch
import torch.nn.functional as F

from scsa_ops.models import BUILDERS

from . import common
from .op import fused_backend

VARIANTS = ("plain", "scsa_eager", "scsa_fused", "plain_compile", "scsa_compile", "scsa_fused_compile")
KEPT = {"scsa_eager": "plain", "scsa_fused": "plain", "scsa_compile": "plain_compile",
        "scsa_fused_compile": "plain_compile"}


def build_variants(name, device, compile_, channels_last, train):
    """{variant: model}; the SCSA variants carry the same weights."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    builder = BUILDERS[name]
    models = {"plain": builder(scsa=False), "scsa_eager": builder(backend="eager")}
    backend = fused_backend(device)
    if backend is not None:
        models["scsa_fused"] = builder(backend=backend)
        models["scsa_fused"].load_state_dict(models["scsa_eager"].state_dict())
    models = {k: m.to(device, memory_format=fmt).train(train) for k, m in models.items()}
    if compile_:
        models["plain_compile"] = common.compiled(models["plain"])  # per shape: the strongest baseline
        models["scsa_compile"] = common.compiled(models["scsa_eager"])
        if backend is not None:  # the fused ops inside a compiled network (no graph break)
            models["scsa_fused_compile"] = common.compiled(models["scsa_fused"], fullgraph=True)
    return models, backend


def bench_model(name, batch, size, device, amp, channels_last, reps, compile_, train=False):
    models, backend = build_variants(name, device, compile_, channels_last, train)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    autocast = torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16) \
        if amp else contextlib.nullcontext()

    def call(model):
        def infer():
            with torch.no_grad(), autocast:
                model(x)

        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9) if train else None
        labels = torch.zeros(batch, dtype=torch.long, device=device)

        def step():
            with autocast:
                loss = F.cross_entropy(model(x), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step if train else infer

    fns = {k: call(m) for k, m in models.items()}
    for _, fn in common.progress(list(fns.items()), f"{name}: warm-up/compile"):
        fn()
    ms = common.time_all(fns, device, reps, rounds=min(reps, 5))
    row = dict(model=name, batch=batch, size=size, amp=amp, channels_last=channels_last, train=train,
               fused_backend=backend,
               **{f"{k}_ms": ms.get(k) for k in VARIANTS})
    for k in VARIANTS:
        row[f"{k}_images_per_s"] = batch / ms[k] * 1e3 if k in ms else None
    for k, base in KEPT.items():
        row[f"{k}_fraction_kept"] = ms[base] / ms[k] if k in ms and base in ms else None
    row["fused_speedup_vs_eager"] = ms["scsa_eager"] / ms["scsa_fused"] if "scsa_fused" in ms else None
    return row


def print_table(rows, machine):
    what = "training step" if rows and rows[0]["train"] else "inference"
    print(f"\nSCSA model benchmark ({what}) on {common.machine_line(machine)}")
    header = ["model", "batch", "amp", "channels_last", *[f"{k} img/s" for k in VARIANTS],
              *[f"{k} kept" for k in KEPT]]
    print(common.markdown_table(header, [
        [r["model"], r["batch"], r["amp"], r["channels_last"],
         *[common.fmt(r[f"{k}_images_per_s"], ".1f") for k in VARIANTS],
         *[common.fmt(r[f"{k}_fraction_kept"], ".2f") for k in KEPT]] for r in rows]))


def plot(rows, machine, path):
    plt = common.figure()
    fig, axes = plt.subplots(1, len(rows), figsize=(6.5 * len(rows), 3.8), squeeze=False)
    colors = dict(plain="#55a868", scsa_eager="#888888", scsa_fused="#dd8452", plain_compile="#8fbc8f",
                  scsa_compile="#4c72b0", scsa_fused_compile="#c44e52")
    for ax, r in zip(axes[0], rows):
        ks = [k for k in VARIANTS if r[f"{k}_images_per_s"]]
        bars = ax.bar(range(len(ks)), [r[f"{k}_images_per_s"] for k in ks], color=[colors[k] for k in ks])
        ax.bar_label(bars, labels=[f"{r[f'{k}_images_per_s']:.0f}" + (
            f"\n({r[f'{k}_fraction_kept']:.2f} kept)" if r.get(f"{k}_fraction_kept") else "") for k in ks], fontsize=7)
        ax.set_xticks(range(len(ks)), [k.replace("_", "\n") for k in ks], fontsize=8)
        ax.set_ylabel("images/s")
        ax.set_title(f"{r['model']}, batch {r['batch']}, {r['size']}px" + (", training" if r["train"] else "")
                     + (", AMP" if r["amp"] else "") + (", channels_last" if r["channels_last"] else ""), fontsize=9)
        ax.margins(y=0.2)
    common.save_figure(plt, fig, f"SCSA networks: {common.machine_line(machine)}", path)


def main(argv=None):
    ap = common.parser(__doc__, "bench/out/model.json")
    ap.add_argument("--model", nargs="+", default=["resnet50", "mobilenetv2"], choices=sorted(BUILDERS))
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on a GPU, 8 on a CPU")
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--amp", action="store_true", help="autocast (fp16 on a GPU, bf16 on a CPU)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--train", action="store_true",
                    help="time a training step (forward, backward and an SGD step with momentum, which "
                         "writes every parameter: new versions each step, as in training)")
    ap.add_argument("--reps", type=int, default=None, help="timed batches per variant (default: 100 GPU, 10 CPU)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="time the torch.compile variants (default: on a GPU only; compiling two ResNet-50s "
                         "takes minutes on a small CPU)")
    args = ap.parse_args(argv)
    device = common.setup(args)
    batch = args.batch or (32 if device.type == "cuda" else 8)
    reps = args.reps or (100 if device.type == "cuda" else 10)
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    machine = common.machine(device)
    rows = []
    for name in args.model:
        rows.append(bench_model(name, batch, args.size, device, args.amp, args.channels_last, reps,
                                compile_, args.train))
        r = rows[-1]
        common.log(f"{name}: plain {common.fmt(r['plain_images_per_s'], '.1f')} img/s, SCSA eager "
                   f"{common.fmt(r['scsa_eager_images_per_s'], '.1f')}, "
                   f"fused {common.fmt(r['scsa_fused_images_per_s'], '.1f')}")
    print_table(rows, machine)
    payload = dict(benchmark="model", machine=machine,
                   settings=dict(batch=batch, size=args.size, reps=reps, amp=args.amp,
                                 channels_last=args.channels_last, compile=compile_, train=args.train), rows=rows)
    common.write_outputs(payload, args.out, lambda png: plot(rows, machine, png))
    return payload


if __name__ == "__main__":
    main()
