"""The accelerator benchmark runs end to end at tiny sizes on the CPU (as on a GPU/TPU)."""

import math

import pytest

from experiments.bench import accelerator


@pytest.mark.slow
def test_accelerator_bench_tiny():
    rows = accelerator.main(["--tiny", "--steps", "1"])
    assert [r["mode"] for r in rows] == ["live", "cached"]
    for r in rows:
        assert r["backend"] == "cpu" and r["memory_kind"] == "host RSS"
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
        assert 0 < r["mfu"] < 1 and r["peak_tflops"] > 0
    assert rows[0]["tflops"] * rows[0]["step_s"] > rows[1]["tflops"] * rows[1]["step_s"]  # 8N > 6N
