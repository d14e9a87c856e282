"""The TPU launch scripts' self-test: syntax, usage texts, dry-run gcloud commands (no TPU needed)."""

import shutil
import subprocess
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parent.parent / "tpu_scripts" / "check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_tpu_scripts_self_check_passes():
    result = subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
