"""Shared pytest setup.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported, so it is set here before any
test module can import triton: every Triton kernel then runs on CPU tensors under Triton's
interpreter (there is no GPU on CI).  ``setdefault`` keeps an explicit ``TRITON_INTERPRET=0`` on a
GPU machine working.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
