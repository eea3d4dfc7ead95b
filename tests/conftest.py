"""Shared pytest setup.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported, so it is set here before any
test module can import triton: every Triton kernel then runs on CPU tensors under Triton's
interpreter (there is no GPU on CI).  ``setdefault`` keeps an explicit ``TRITON_INTERPRET=0`` on a
GPU machine working.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest single-threaded, and `make test` runs two workers on two cores; modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
