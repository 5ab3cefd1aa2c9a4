"""Installing the package never replaces the user's torch or the triton that torch pins: the build
uses the installed torch (--no-build-isolation, as the Makefile does), torch is a floor, and the
triton floor is no higher than the oldest supported torch's pin. The resolution against each
torch minor release on the package index needs the index (CI has it; `-m "not network"` leaves it
out offline) and reads metadata only (pip's fast-deps: no wheel is downloaded)."""
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parents[1]
OLDEST = Version("2.6")


def _pip(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def test_install_keeps_the_installed_torch(tmp_path):
    report = tmp_path / "report.json"
    proc = _pip("install", "--dry-run", "--no-build-isolation", "--no-index", "-e", str(ROOT), "--report",
                str(report), "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert planned <= {"scsa-ops", "scsa_ops"}, f"installing would also install {planned}"


def _newest_of_each_minor():
    """{minor: newest release} of every torch on the index from OLDEST on (no local builds)."""
    proc = _pip("index", "versions", "torch", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = re.search(r"Available versions: (.*)", proc.stdout).group(1).split(", ")
    newest = {}
    for v in map(Version, listed):
        if v.local is None and not v.is_prerelease and v >= OLDEST:
            minor = f"{v.major}.{v.minor}"
            newest[minor] = max(newest.get(minor, v), v)
    return newest


def _resolve(torch_version, tmp_path):
    """pip's plan for a fresh environment with this torch and the package: {name: version}, and
    the requirement torch itself states for triton."""
    report = tmp_path / f"torch{torch_version}.json"
    # fast-deps: each wheel's metadata by HTTP range requests, where an index serves no metadata file
    # of its own (without it pip downloads every wheel, torch's CUDA dependencies included: GBs).
    proc = _pip("install", "--dry-run", "--ignore-installed", "--no-build-isolation", "--no-cache-dir",
                "--use-feature=fast-deps", "--report", str(report), "-q", f"torch=={torch_version}", str(ROOT))
    assert proc.returncode == 0, (torch_version, proc.stderr[-3000:])
    planned = {item["metadata"]["name"].lower(): item["metadata"] for item in json.loads(report.read_text())["install"]}
    triton_pin = [Requirement(r) for r in planned["torch"].get("requires_dist", []) if r.startswith("triton")]
    return {name: meta["version"] for name, meta in planned.items()}, triton_pin


@pytest.mark.network
def test_resolves_beside_every_supported_torch_with_its_own_triton(tmp_path):
    newest = _newest_of_each_minor()
    assert "2.6" in newest and len(newest) >= 9, newest
    with ThreadPoolExecutor(4) as pool:
        plans = dict(zip(newest, pool.map(lambda v: _resolve(v, tmp_path), map(str, newest.values()))))
    for minor, (planned, triton_pin) in plans.items():
        # (a +cpu build of the same release, where a local wheel provides one, pins no triton)
        assert Version(planned["torch"]).base_version == str(newest[minor]), (minor, planned["torch"])
        for req in triton_pin:  # the CUDA wheel's pin, where its markers hold here (Linux x86-64)
            if req.marker is None or req.marker.evaluate():
                assert planned["triton"] in req.specifier, (minor, planned["triton"], str(req))

