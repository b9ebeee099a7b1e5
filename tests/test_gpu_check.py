"""scripts/gpu-check.sh: its syntax, and its clear refusal on a machine without CUDA."""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "gpu-check.sh"


def test_gpu_check_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = SCRIPT.read_text()
    for step in ("precision in 32 bf16-mixed 16-mixed", "strategy=ddp", "-m gpu",
                 "FULL_SIZE", "mlflow run . --env-manager local -P"):
        assert step in text, step


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_check_refuses_clearly_without_a_gpu(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path),
                                 "TMPDIR": str(tmp_path)})
    assert result.returncode == 2
    assert "no CUDA GPU here" in result.stderr
