"""Non-overlapping average pooling (``lasnn.ops.avg_pool``) against ATen's ``avg_pool1d/2d``: forward and
forward+backward, on the time-folded spike tensors a T=4 student pools (Fashion-MNIST student
``[T*B, 16, 28, 28]`` and ``[T*B, 32, 14, 14]`` with B=128, MNIST-1D ``[T*B, 16, 40]``).

    pytest benches/bench_avg_pool.py --keep-cpu-memory [--benchmark-json out.json]

Bytes moved by the minimal design (e = element size, input of n elements, kernel of k elements):
    fwd     read x, write out                  = (n + n / k) e
    fwdbwd  fwd, then read grad_out, write grad_x = 2 (n + n / k) e
Target (judged by reading the output): the ``lasnn`` row within 2x the time of a memory copy of the same
bytes (``fraction_of_copy_bw`` >= 0.5) and at least 3x faster than ATen's NCHW kernel on one thread.
On CUDA the op runs ATen's pooling, so only CPU rows are measured.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lasnn import _ext
from lasnn.ops.avg_pool import avg_pool

SHAPES = {  # name -> (shape, kernel)
    "fashion-stage1": ((512, 16, 28, 28), [2, 2]),
    "fashion-stage2": ((512, 32, 14, 14), [2, 2]),
    "mnist1d-stage1": ((256, 16, 40), [2]),
}
IMPLS = ("lasnn", "aten")


def _fn(impl: str, kernel: list[int]):
    if impl == "lasnn":
        if not _ext.c_has_op("avg_pool_fwd"):
            pytest.skip("lasnn._C without lasnn::avg_pool_fwd")
        return lambda x: avg_pool(x, kernel)
    if len(kernel) == 1:
        return lambda x: F.avg_pool1d(x, kernel, kernel)
    return lambda x: F.avg_pool2d(x, kernel, kernel)


@pytest.mark.parametrize("pass_", ("fwd", "fwdbwd"))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_avg_pool(benchmark, record, run_timed, impl, shape_name, pass_):
    shape, kernel = SHAPES[shape_name]
    fn = _fn(impl, kernel)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(shape, generator=gen) < 0.2).float()  # spikes, as in an SNN
    k = 1
    for v in kernel:
        k *= v
    n = x.numel()
    benchmark.group = f"avg_pool {pass_} {shape_name} {'x'.join(map(str, shape))}"
    if pass_ == "fwd":

        def run():
            with torch.no_grad():
                fn(x)

        run_timed(run)
        moved = (n + n // k) * 4
    else:
        g = torch.randn(fn(x).shape, generator=gen)
        xr = x.requires_grad_(True)

        def run():
            torch.autograd.grad(fn(xr), xr, g)  # not .backward: no accumulation into xr.grad in the timing

        run_timed(run)
        moved = 2 * (n + n // k) * 4
    record(x.device, moved, n * 4, impl=impl, kernel=kernel, shape=list(shape))
