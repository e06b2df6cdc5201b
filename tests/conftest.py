import os

import pytest
import torch

# Without a GPU, Triton's kernels (the query/key kernel) run on the CPU by its interpreter, chosen
# before Triton is first imported; nothing runs there unless a test asks (qk_kernel.ON_CPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from controlnet import Family

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads that
# spin-wait for each other make each step up to 100x slower. One thread per test process.
torch.set_num_threads(1)


@pytest.fixture(params=list(Family), ids=lambda f: f.value)
def family(request) -> Family:
    return request.param
