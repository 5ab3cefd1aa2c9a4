"""Installing the package must never replace the user's torch: the build uses the installed torch
(--no-build-isolation, as the Makefile does) and the torch requirement is a floor, not a pin."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_install_keeps_the_installed_torch(tmp_path):
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--no-index",
                    "-e", str(ROOT), "--report", str(report), "-q"], check=True, capture_output=True, timeout=300)
    planned = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert planned <= {"scsa-ops", "scsa_ops"}, f"installing would also install {planned}"


def test_makefile_builds_without_isolation():
    assert "--no-build-isolation" in (ROOT / "Makefile").read_text()
