"""sparse-volume{min_res=16;levels=;band=auto;dilation=0;iso=0}: plan hierarchical (coarse-to-fine) decoding.

The rewrite of the decoding loop is a plan, not a graph change: the field function stays one function of query
points, and the coarse-to-fine driver (`elision.apps.volume.decode`) decides at run time which points to evaluate.
What the pass does at compile time is check that this is legal and record the plan:

  * the field function must be query-independent (the cached query-independence analysis; a PassError naming the op
    that mixes queries otherwise), so evaluating only the points near the surface gives exactly their dense values;
  * it must take query points [1, N, 3] with N dynamic and return one value per point;
  * the options below go into the module's volume record, where the driver reads them.

Levels: dense at min_res (or `levels` levels ending at the requested resolution), each level twice the previous one.
A coarse cell is refined when its corners straddle `iso` or one lies within `band` of it (band=auto: 0.95 of the
field's saturation measured on the coarsest level), dilated by `dilation` cells.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from elision.ir.core import Module
from elision.passes.base import Pass, PassError, register_pass
from elision.passes.volume.query_independence import require_query_independence
from elision.passes.volume.record import check_one_value_per_query, volume_record


@dataclass(frozen=True)
class SparseVolumeOptions:
    """The plan of `sparse-volume{...}`. The defaults are the conservative setting."""

    min_res: int = 16                  # coarsest (dense) level; each level doubles up to the requested resolution
    levels: Optional[int] = None       # number of levels instead of min_res
    band: Union[float, str] = "auto"   # level-0 |v - iso| threshold, or "auto" (0.95 x measured saturation)
    dilation: int = 0                  # extra active-cell dilation radius in coarse cells
    iso: float = 0.0

    def __post_init__(self) -> None:
        if self.min_res < 2:
            raise PassError(f"sparse-volume min_res must be >= 2, got {self.min_res}")
        if self.levels is not None and self.levels < 1:
            raise PassError(f"sparse-volume levels must be >= 1, got {self.levels}")
        if isinstance(self.band, str):
            if self.band != "auto":
                raise PassError(f"sparse-volume band must be a number >= 0 or 'auto', got {self.band!r}")
        elif not (self.band >= 0 and math.isfinite(self.band)):
            raise PassError(f"sparse-volume band must be a finite number >= 0, got {self.band}")
        if self.dilation < 0 or self.dilation > 8:
            raise PassError(f"sparse-volume dilation must be in 0..8 cells, got {self.dilation}")

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SparseVolumeOptions)}


@register_pass
@dataclass(frozen=True)
class SparseVolume(SparseVolumeOptions, Pass):
    """Plan hierarchical coarse-to-fine volume decoding: refine only cells near the surface."""

    name: ClassVar[str] = "sparse-volume"

    def run(self, module: Module) -> bool:
        fn, query_input, query_dim, _ = require_query_independence(module, self.name)
        check_one_value_per_query(fn, query_input, query_dim, self.name)
        volume_record(module)["sparse"] = self.options()
        return False
