"""Compiling a whole model: `elision.compile(...)` (`api`), `torch.compile(backend="elision")` (`backend`) and
the differential checks against eager PyTorch (`numerics`)."""
