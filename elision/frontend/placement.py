"""Where and how a model runs: dtype, device and intra-op threads, checked and applied in one place.

Every command and API entry that loads or runs a torch model takes a `Placement` (the CLI builds it from
--dtype/--device/--threads, see `elision.cli.options`) and calls `place_model` / `place_inputs` on it, so the
rules (what counts as a float tensor, when threads are set, the CUDA refusal) are written once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from elision.errors import PlacementError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Placement:
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None  # None: leave torch's own count (all cores) alone

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise PlacementError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise PlacementError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or int(self.threads) != self.threads
                                         or self.threads < 1):
            raise PlacementError(f"threads must be an integer >= 1, got {self.threads!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def check_available(self) -> "Placement":
        """Raise PlacementError when the device is absent (before anything slow is loaded); returns self."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise PlacementError("device cuda: this torch has no usable CUDA device "
                                 f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
        return self

    def apply_threads(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))

    def place_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in this dtype on this device (in place, as `Module.to` works), threads set."""
        self.check_available()
        self.apply_threads()
        return model.to(device=self.device, dtype=self.torch_dtype)

    def place_inputs(self, inputs: Any) -> Any:
        """Tensors in `inputs` (nested tuples/lists/dicts) moved to the device; floating ones cast to the dtype
        (token ids and masks keep their integer dtype)."""
        if isinstance(inputs, torch.Tensor):
            x = inputs.to(self.device)
            return x.to(self.torch_dtype) if x.is_floating_point() else x
        if isinstance(inputs, (tuple, list)):
            return type(inputs)(self.place_inputs(x) for x in inputs)
        if isinstance(inputs, dict):
            return {k: self.place_inputs(v) for k, v in inputs.items()}
        return inputs


def placement_for(model: torch.nn.Module, dtype: str | None = None, device: str | None = None,
                  threads: int | None = None) -> Placement:
    """The Placement of the Python API: what is not given stays as `model` has it (its parameters' dtype and
    device), so an API call without these arguments never converts a model."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if dtype is None:
        dtype = str(param.dtype).removeprefix("torch.") if param is not None else "float32"
    if device is None:
        device = param.device.type if param is not None else "cpu"
    return Placement(dtype, device, threads).check_available()


DEFAULT = Placement()
