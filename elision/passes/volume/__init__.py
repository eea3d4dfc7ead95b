"""Volume-decoding passes: `query-independence` (analysis), `hoist-invariants` (split @forward into @prepare and
@evaluate), `sparse-volume` (check and record the coarse-to-fine plan), `adaptive-kv` (gathered cross-attention of
@evaluate for tiles of queries). The coarse-to-fine loop that runs the result lives in `elision.apps.volume`."""
from elision.passes.volume.adaptive_kv import AdaptiveKV, AdaptiveKVOptions
from elision.passes.volume.hoist_invariants import HoistInvariants, split_invariants
from elision.passes.volume.query_independence import QueryIndependence
from elision.passes.volume.record import VOLUME_ATTR, volume_record
from elision.passes.volume.sparse_volume import SparseVolume, SparseVolumeOptions

__all__ = ["AdaptiveKV", "AdaptiveKVOptions", "HoistInvariants", "QueryIndependence", "SparseVolume",
           "SparseVolumeOptions", "VOLUME_ATTR", "split_invariants", "volume_record"]
