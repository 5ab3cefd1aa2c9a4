"""The benchmark code itself: a tiny preset runs end to end and writes JSON with every field, and a
PNG. Timings are not judged here (speed claims live in the benchmark's output, not in tests)."""
import json
import platform

import pytest
import torch

import scsa_ops
from bench import common
from bench import model as bench_model
from bench import op as bench_op

MACHINE = {"device", "device_type", "cpu", "cpu_id", "cpu_capability", "kernels_isa", "cpu_count", "threads", "malloc",
           "torch", "triton", "cuda", "python", "timestamp"}
OP_ROW = {"preset", "count", "shape", "dtype", "mode", "memory_format", "fused_backend", "eager_ms", "compile_ms",
          "fused_ms", "copy_ms", "speedup_vs_eager", "speedup_vs_compile", "x_bytes", "fused_modelled_bytes",
          "copy_gbps", "fused_gbps", "fused_fraction_of_copy_bw", "launches"}
OP_SUMMARY = {"preset", "dtype", "mode", "memory_format", "shapes", "geomean_speedup_vs_eager",
              "geomean_speedup_vs_compile", "network_eager_ms", "network_compile_ms", "network_fused_ms",
              "network_copy_ms"}


@pytest.fixture(autouse=True)
def _dynamo_config():
    """common.compiled sets dynamo's config for a benchmark's whole process; here only for the test."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=torch._dynamo.config.fail_on_recompile_limit_hit):
        yield


def _read(path):
    payload = json.loads(path.read_text())
    png = path.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert set(payload["machine"]) == MACHINE and payload["machine"]["threads"] >= 1
    assert payload["machine"]["kernels_isa"] == scsa_ops.cpu_capability()
    assert payload["machine"]["cpu_id"] == common.cpu_id() and common.cpu_id() != "unknown"
    # --malloc pinned, the default: on glibc each variant's times are its own.
    assert payload["machine"]["malloc"] == ("pinned" if platform.libc_ver()[0] == "glibc" else "default (not glibc)")
    return payload


def _positive(row, keys):
    for k in keys:
        assert isinstance(row[k], (int, float)) and row[k] > 0, (k, row[k])


def test_op_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "op.json"
    bench_op.main(["--preset", "tiny", "--reps", "3", "--batch", "2", "--out", str(out)])
    payload = _read(out)
    assert payload["benchmark"] == "op" and payload["settings"]["compile"] is True
    rows = payload["rows"]
    assert [r["shape"] for r in rows] == [[2, 16, 14, 14], [2, 32, 7, 7]]
    for r in rows:
        assert set(r) == OP_ROW
        assert r["fused_backend"] == "cpp" and r["launches"] is None  # CPU: no kernel launches to count
        _positive(r, [k for k in OP_ROW if k.endswith(("_ms", "gbps", "bytes", "_bw")) or k.startswith("speedup")])
        assert r["speedup_vs_eager"] == pytest.approx(r["eager_ms"] / r["fused_ms"])
        assert r["fused_modelled_bytes"] == 4 * r["x_bytes"] == 4 * 4 * 2 * r["shape"][1] * r["shape"][2] ** 2
    (s,) = payload["summary"]
    assert set(s) == OP_SUMMARY
    _positive(s, [k for k in OP_SUMMARY if k.startswith(("geomean", "network"))])
    assert s["network_fused_ms"] == pytest.approx(sum(r["fused_ms"] for r in rows))
    printed = capsys.readouterr().out
    assert "| tiny | (2, 16, 14, 14) |" in printed and str(out) in printed and str(out.with_suffix(".png")) in printed


def test_op_bench_sweep_without_compile(tmp_path, capsys, monkeypatch):
    out = tmp_path / "op.json"
    flushes = []
    real_fill = torch.Tensor.fill_

    def fill(t, value):  # the cache flush: one buffer of twice the last-level cache, written per call
        flushes.append(t.numel() * t.element_size())
        return real_fill(t, value)

    monkeypatch.setattr(torch.Tensor, "fill_", fill)
    bench_op.main(["--preset", "tiny", "--reps", "2", "--batch", "1", "--no-compile", "--dtype", "fp32", "bf16",
                   "--mode", "fwd+bwd", "--memory-format", "nchw", "channels_last", "--cold", "--out", str(out)])
    monkeypatch.undo()
    assert "caches flushed before every call" in capsys.readouterr().out
    # 8 cases x 3 implementations (eager, fused, copy) x 5 rounds of one call (reps < rounds), each after a flush
    llc = common.last_level_cache_bytes()
    assert flushes.count(2 * llc) == 8 * 3 * 5 and llc >= 1 << 20
    payload = _read(out)
    assert payload["settings"]["cold"] is True
    rows = payload["rows"]
    assert len(rows) == 2 * 2 * 2 and len(payload["summary"]) == 4
    assert {(r["dtype"], r["memory_format"]) for r in rows} == {(d, f) for d in ("fp32", "bf16")
                                                               for f in ("nchw", "channels_last")}
    for r in rows:
        assert r["compile_ms"] is None and r["speedup_vs_compile"] is None
        assert r["fused_modelled_bytes"] == 9 * r["x_bytes"]
        _positive(r, ["eager_ms", "fused_ms", "copy_ms", "speedup_vs_eager", "fused_gbps"])


def test_op_presets_are_the_networks_shapes():
    assert bench_op.preset_shapes("resnet50", 8) == [((8, 64, 56, 56), 3), ((8, 128, 28, 28), 4),
                                                     ((8, 256, 14, 14), 6), ((8, 512, 7, 7), 3)]
    assert bench_op.preset_shapes("detection", 32) == [((2, 64, 200, 334), 3), ((2, 128, 100, 167), 4),
                                                       ((2, 256, 50, 84), 6), ((2, 512, 25, 42), 3)]
    assert [n for _, n in bench_op.preset_shapes("resnet101", 1)] == [3, 4, 23, 3]
    assert sum(n for _, n in bench_op.preset_shapes("mobilenetv2", 1)) == 17


def test_bad_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit):
        bench_op.main(["--preset", "nope"])
    with pytest.raises(SystemExit):
        bench_op.main(["--preset", "tiny", "--dtype", "fp16"])  # no GPU here
    assert "fp16 is a GPU dtype" in capsys.readouterr().err


@pytest.mark.parametrize("train", [False, True])
def test_model_bench_end_to_end(tmp_path, train):
    out = tmp_path / "model.json"
    bench_model.main(["--model", "mobilenetv2", "--batch", "2", "--reps", "2", "--out", str(out)]
                     + (["--train"] if train else []))
    payload = _read(out)
    assert payload["benchmark"] == "model" and payload["settings"]["compile"] is False  # CPU default
    assert payload["settings"]["train"] is train
    (r,) = payload["rows"]
    assert r["train"] is train
    expected = {"model", "batch", "size", "amp", "channels_last", "train", "fused_backend", "fused_speedup_vs_eager"}
    expected |= {f"{k}_{s}" for k in bench_model.VARIANTS for s in ("ms", "images_per_s")}
    expected |= {f"{k}_fraction_kept" for k in bench_model.KEPT}
    assert set(r) == expected
    _positive(r, ["plain_ms", "scsa_eager_ms", "scsa_fused_ms", "scsa_fused_fraction_kept", "fused_speedup_vs_eager"])
    assert r["plain_images_per_s"] == pytest.approx(2e3 / r["plain_ms"])
    assert r["scsa_eager_fraction_kept"] == pytest.approx(r["plain_ms"] / r["scsa_eager_ms"])
    assert r["plain_compile_ms"] is None and r["scsa_compile_fraction_kept"] is None


def test_compile_baseline_compiles_every_case():
    """A sweep builds a new module and a new shape per case, and dynamo counts every one against a
    single recompile limit per code object; past it dynamo would run the case eagerly without an
    error, and the compile column would time eager. Each case must compile its own graph."""
    from torch._dynamo.utils import counters

    for n in range(2, torch._dynamo.config.recompile_limit + 4):
        counters.clear()
        f = common.compiled(torch.nn.Linear(n, 2), backend="eager")
        assert f(torch.randn(3, n)).shape == (3, 2)
        assert counters["stats"]["unique_graphs"] == 1, n


def test_training_bench_steps_as_an_optimizer():
    """bench.op's fwd+bwd step is a training step as the op sees it: every parameter gets a new
    version each step (nothing cached per version survives), and its gradient is the step's own,
    as after optimizer.zero_grad(), not accumulated over the timed calls."""
    module = scsa_ops.SCSA(8)
    run = bench_op._call(module, torch.randn(1, 8, 7, 7, requires_grad=True), "fwd+bwd")
    run()
    versions = [p._version for p in module.parameters()]
    grads = [p.grad.clone() for p in module.parameters()]
    run()
    assert all(p._version > v for p, v in zip(module.parameters(), versions))
    for p, g in zip(module.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
