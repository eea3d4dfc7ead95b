"""Compiling a whole model: `elision.compile(...)` (`api`), `torch.compile(backend="elision")` (`backend`) and
the differential checks against eager PyTorch (`numerics`).

The backend's pieces: `optimize` (elision's rewrites on one Dynamo graph), `torch_target` (inductor code
generation and the candidates), `ort_target` (ONNX Runtime lowering), `select` (the first call keeps plain inductor
unless another candidate that matches the graph as given is measurably faster), `records` (what each graph runs, and why: fallbacks are queryable).
"""
