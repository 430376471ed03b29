"""scripts/gpu_check.py runs on GPU machines only by hand; its CPU dry run keeps the script itself working."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_check.py"


def test_dry_run_scores_equal_naive_and_reports_a_missing_vllm_in_one_line(tiny_llm_dir, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--model", str(tiny_llm_dir),
                           "--encoder", str(tiny_llm_dir), "--only", "scoring_fp32", "vllm_required", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["scoring_fp32"]["ok"] and result["scoring_fp32"]["max_abs_diff"] <= 1e-4
    assert result["vllm_required"]["ok"] and "\n" not in result["vllm_required"]["message"]
    assert "checks passed 3/3" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_usage_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "x", "--encoder", "y"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
