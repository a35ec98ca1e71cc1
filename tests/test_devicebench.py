"""The matmul measurement behind MFU must not move the global RNGs: LoRA dropout draws from
them, so a first run on a machine (nothing cached yet, so it measures) would otherwise train
differently from every later run with the same seed."""

import pytest

from mlxft import devicebench


def test_torch_measurement_leaves_the_global_rng_alone():
    torch = pytest.importorskip("torch")
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    assert devicebench._torch_gflops("float32", shape=(16, 16, 16)) > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_mlx_measurement_leaves_the_global_rng_alone():
    mx = pytest.importorskip("mlx.core")
    mx.random.seed(123)
    expected = mx.random.uniform(shape=(4,)).tolist()
    mx.random.seed(123)
    assert devicebench._mlx_gflops("float32", shape=(16, 16, 16)) > 0
    assert mx.random.uniform(shape=(4,)).tolist() == expected
