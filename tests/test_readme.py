"""Every Python block of README.md runs as written, each in a fresh process on a CPU. A block that
imports a framework this environment lacks (ultralytics, timm, mmcv) is skipped with that reason;
`make test-frameworks` runs them."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
FRAMEWORKS = ("ultralytics", "timm", "mmcv", "mmengine", "torchvision")


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(block, tmp_path):
    imported = set(re.findall(r"^(?:from|import) (\w+)", block, flags=re.M))
    missing = [m for m in FRAMEWORKS if m in imported and importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (CI: make test-frameworks)")
    (tmp_path / "tests").symlink_to(ROOT / "tests")  # paths in the README are the checkout's
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: CPU tensors take the C++ path
    run = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
