"""One build for every x86 CPU: each instruction set's kernels (scsa_ops._C_default, _avx2,
_avx512), chosen at load time as torch chooses its own (ATEN_CPU_CAPABILITY lowers the choice),
run forward and backward against the reference in a process of their own; the DEFAULT sources
stay portable; a wheel installed elsewhere runs every variant without compiling."""
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

import scsa_ops
from helpers import TOL
from scsa_ops import _build

ROOT = Path(__file__).resolve().parents[1]
HERE = _build.capability()  # the widest set this CPU (and torch) runs
RUNNABLE = _build.ISA_ORDER[:_build.ISA_ORDER.index(HERE) + 1]

# Forward and backward of a few configurations against the fp64 reference, then the low-precision
# dtypes and a NaN input against the eager module: what differs between the instruction sets are
# the vector loads and stores (16-bit partial ones: masked on AVX512, 32-bit vmaskmov pairs on AVX2),
# exp2 and the window sums.
CHECK = r"""
import sys, torch, scsa_ops
sys.path.insert(0, {tests!r})
from helpers import TOL, grad_err, pair, rel_err, run

assert scsa_ops.cpu_capability() == {isa!r}, scsa_ops.cpu_capability()
for cfg, shape in [(dict(dim=16, head_num=2, qkv_bias=True), (3, 16, 14, 21)),
                   (dict(dim=32, window_size=-1, gate_layer="softmax"), (2, 32, 9, 35)),
                   (dict(dim=8, group_kernel_sizes=(1, 3, 5, 7), window_size=3), (2, 8, 7, 40)),
                   (dict(dim=8), (2, 8, 14, 56))]:  # 8 windows a row: AVX512 sums them in vectors
    ref, fused = pair(cfg, backend="cpp", device="cpu")
    x, go = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    want, got = run(ref, x, go), run(fused, x, go)
    assert rel_err(got[0], want[0]) < TOL[torch.float64] and rel_err(got[1], want[1]) < TOL["fp64_grad"], cfg
    assert max(grad_err(got[2], want[2]).values()) < TOL["fp64_grad"], cfg
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for layout in (torch.contiguous_format, torch.channels_last):
            xl = x.to(dtype).to(memory_format=layout)
            out = fused.to(dtype)(xl)
            assert rel_err(out, ref(xl.double())) < 2 * TOL[dtype], (cfg, dtype, layout)
    fused.double()
# Every length of a row's last, partial vector of 16-bit values (1x1 windows take any width). The
# reference takes the rounded parameters: at one column a GroupNorm group holds two values, whose
# normalisation would amplify the parameters' rounding past any tolerance.
ref, fused = pair(dict(dim=8, window_size=1), backend="cpp", device="cpu")
for dtype in (torch.bfloat16, torch.float16):
    fused.to(dtype)
    ref.load_state_dict({{k: v.double() for k, v in fused.state_dict().items()}})
    for w in range(1, 18):
        x = torch.randn(2, 8, 3, w).to(dtype)
        assert rel_err(fused(x), ref(x.double())) < 2 * TOL[dtype], (dtype, w)
m = scsa_ops.SCSA(8, backend="cpp")
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(2, 8, 14, 14, dtype=dtype)
    x[0, 3, 2, 5] = float("nan")
    out, eager = m.to(dtype)(x), m.eager_forward(x)
    assert torch.equal(out.isnan(), eager.isnan()), (dtype, out.isnan().sum().item())
print("ok", scsa_ops.cpu_capability())
"""


def _python(script, env=None, cwd=ROOT, python=sys.executable):
    proc = subprocess.run([python, "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _env(isa, tmp_path):
    # An empty extensions cache: a JIT build would leave a directory there.
    return dict(os.environ, ATEN_CPU_CAPABILITY=isa.lower(), TORCH_EXTENSIONS_DIR=str(tmp_path / "jit"))


@pytest.mark.parametrize("isa", _build.built_isas())
def test_each_instruction_set_matches_the_reference(isa, tmp_path):
    if isa not in RUNNABLE:
        pytest.skip(f"this CPU runs torch at {HERE}: the {isa} kernels cannot execute here")
    proc = _python(CHECK.format(tests=str(ROOT / "tests"), isa=isa), _env(isa, tmp_path))
    assert proc.stdout.split() == ["ok", isa]
    assert not (tmp_path / "jit").exists() and "compiling" not in proc.stderr


def test_cpu_capability_names_the_loaded_kernels():
    assert scsa_ops.cpu_capability() == HERE == torch.backends.cpu.get_cpu_capability()
    assert f"{_build.module_name(HERE)}" in sys.modules


def test_a_missing_module_falls_back_to_a_narrower_one(tmp_path):
    if len(RUNNABLE) < 2:
        pytest.skip(f"this CPU runs only the {HERE} kernels")
    script = (f"import sys; sys.modules[{_build.module_name(HERE)!r}] = None\n"  # `import` raises ImportError
              "import torch, scsa_ops\n"
              "m = scsa_ops.SCSA(8, backend='cpp').double(); x = torch.randn(2, 8, 9, 9, dtype=torch.float64)\n"
              f"assert (m(x) - m.eager_forward(x)).abs().max() < {TOL[torch.float64]}\n"
              "print(scsa_ops.cpu_capability())\n")
    proc = _python(script, _env(HERE, tmp_path))
    assert proc.stdout.strip() == RUNNABLE[-2]
    assert f"running the {RUNNABLE[-2]} kernels on a CPU that runs torch at {HERE}" in proc.stderr


def test_default_sources_are_portable():
    """x86 intrinsics only inside `#if defined(CPU_CAPABILITY_AVX...)` blocks: the DEFAULT build is
    what aarch64 (and any CPU without AVX2) compiles, and it cannot be compiled here."""
    intrinsic = re.compile(r"\b_mm\d*_|\b__m\d+|\b__mmask|immintrin")
    offenders = []
    for path in sorted((ROOT / "csrc").glob("*.[ch]*")):
        stack = []
        for no, line in enumerate(path.read_text().splitlines(), 1):
            directive = line.strip()
            if directive.startswith("#if"):
                stack.append("CPU_CAPABILITY_AVX" in directive)
            elif directive.startswith("#el"):
                stack[-1] = "CPU_CAPABILITY_AVX" in directive and directive.startswith("#elif")
            elif directive.startswith("#endif"):
                stack.pop()
            elif intrinsic.search(line) and not any(stack):
                offenders.append(f"{path.name}:{no}: {directive}")
    assert offenders == []


def test_wheel_installed_elsewhere_runs_every_variant_without_compiling(tmp_path):
    """`pip wheel .` -> a fresh environment that has this torch (and nothing of this checkout) ->
    every runnable variant from a directory outside the repository, with no JIT build; the wheel
    carries csrc/ for the fallback."""
    _python(f"import subprocess, sys; subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', "
            f"'--no-build-isolation', '-w', {str(tmp_path / 'dist')!r}, {str(ROOT)!r}], check=True)")
    wheel, = (tmp_path / "dist").glob("scsa_ops-*.whl")
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this checkout on the path
    site = _python("import site; print(site.getsitepackages()[0])", clean, python=python).stdout.strip()
    # This torch (and the test dependencies) without this checkout's editable install: a path
    # entry, which does not run the .pth files (the editable finder) of the directory it adds.
    torch_site = str(Path(torch.__file__).parents[1])
    Path(site, "host_packages.pth").write_text(torch_site + "\n")
    _python(f"import subprocess, sys; subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', "
            f"{str(wheel)!r}], check=True)", clean, python=python)
    where = _python("import scsa_ops, scsa_ops._build as b; print(scsa_ops.__file__); print(b.CSRC); "
                    "print(len(b.sources()))", clean, cwd=tmp_path, python=python).stdout.split()
    assert where[0].startswith(site) and where[1].startswith(site) and int(where[2]) > 0, where
    for isa in RUNNABLE:
        env = _env(isa, tmp_path)
        env.pop("PYTHONPATH", None)
        script = CHECK.format(tests=str(ROOT / "tests"), isa=isa).replace("import sys, torch, scsa_ops", (
            "import sys, torch, scsa_ops\nassert scsa_ops.__file__.startswith(" + repr(site) + "), scsa_ops.__file__"))
        proc = _python(script, env, cwd=tmp_path, python=python)
        assert proc.stdout.split() == ["ok", isa]
        assert not (tmp_path / "jit").exists() and "compiling" not in proc.stderr
