"""bench/gemv.py's Triton GEMV through Triton's interpreter on the CPU (the GPU sweep is the script itself)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first JIT-decorated

from kit.backends.triton_attention import triton_available  # noqa: E402
_spec = importlib.util.spec_from_file_location("bench_gemv", Path(__file__).parents[1] / "bench" / "gemv.py")
_gemv = sys.modules["bench_gemv"] = importlib.util.module_from_spec(_spec)  # NOTE: dataclasses look it up
_spec.loader.exec_module(_gemv)
GemvConfig, gemv = _gemv.GemvConfig, _gemv.gemv


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gemv_equals_the_float_product_for_each_row_count(m):
    """Rows that do not fill the last tile (N = 37) and a K that does not fill the last step (100)."""
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 100, generator=g), torch.randn(37, 100, generator=g)
    got = gemv(x, w, GemvConfig(block_n=8, block_k=32, num_warps=1, num_stages=1), impl="triton")
    assert got.shape == (m, 37) and got.dtype == torch.float32
    torch.testing.assert_close(got, x @ w.T, atol=1e-4, rtol=1e-4)


def test_gemv_refuses_what_it_cannot_take_by_name():
    with pytest.raises(ValueError, match="takes 1..4"):
        gemv(torch.randn(5, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"x must be \(M, K\)"):
        gemv(torch.randn(2, 8), torch.randn(3, 7))
    with pytest.raises(ValueError, match="share a dtype"):
        gemv(torch.randn(2, 8), torch.randn(3, 8).bfloat16())
    torch.testing.assert_close(gemv(torch.ones(1, 4), torch.ones(2, 4), impl="torch"), torch.full((1, 2), 4.0))
