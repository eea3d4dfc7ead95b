"""Per-machine calibration of a generation artifact: the intra-op thread count and the verification-cost curve.

Both depend on the machine (CPU model, cores available, onnxruntime version), not on the request, so they are
measured once per machine instead of on every call: at compile time into the artifact's manifest
(`runtime_settings["generation"]["calibration"][machine_id]`), and on any other machine at first use into the
user cache (`<cache>/calibration/<artifact key>.json`, see `elision.runtime.user_cache`).

    record = load_calibration(manifest, artifact_dir)   # this machine's record (empty when never measured)
    record.threads, record.curve(threads)
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elision.runtime.generation.tree_builders import VerifyCostCurve
from elision.runtime.user_cache import cache_root, read_json, write_json

__all__ = ["MachineCalibration", "artifact_key", "available_cores", "load_calibration", "machine_fingerprint",
           "save_calibration"]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_fingerprint(with_onnxruntime: bool = True) -> dict[str, Any]:
    """What a timing depends on besides the model: CPU, usable cores, OS (and the onnxruntime build)."""
    fingerprint = {"cpu": _cpu_model(), "cores": available_cores(), "arch": platform.machine(),
                   "system": platform.system()}
    if with_onnxruntime:
        import onnxruntime as ort  # not for the torch loop's curves, which never load it

        fingerprint.update(onnxruntime=ort.__version__, providers=ort.get_available_providers())
    return fingerprint


def _digest(value: Any, n: int) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:n]


def artifact_key(manifest: dict) -> str:
    """Identifies the artifact's graphs and weights (their sha256s in the manifest)."""
    return _digest(manifest.get("files", {}), 20)


@dataclass
class MachineCalibration:
    machine_id: str
    machine: dict[str, Any]
    threads: int | None = None  # the fastest intra-op thread count measured on this machine (None: not measured)
    step_s: dict[int, float] = field(default_factory=dict)  # one-token step seconds per thread count tried
    curves: dict[int, dict[str, list]] = field(default_factory=dict)  # threads -> {"sizes", "seconds"} (batch 1)
    measured_at: str = ""

    def curve(self, threads: int) -> VerifyCostCurve | None:
        data = self.curves.get(int(threads))
        return VerifyCostCurve(data["sizes"], data["seconds"]) if data else None

    def set_curve(self, threads: int, curve: VerifyCostCurve) -> None:
        self.curves[int(threads)] = {"sizes": list(curve.sizes), "seconds": list(curve.seconds)}
        self.measured_at = time.strftime("%Y-%m-%dT%H:%M:%S")

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "threads": self.threads, "step_s": {str(k): v for k, v in self.step_s.items()},
                "curves": {str(k): v for k, v in self.curves.items()}, "measured_at": self.measured_at}

    @classmethod
    def from_json(cls, machine_id: str, data: dict[str, Any]) -> "MachineCalibration":
        return cls(machine_id, dict(data.get("machine", {})), data.get("threads"),
                   {int(k): float(v) for k, v in data.get("step_s", {}).items()},
                   {int(k): v for k, v in data.get("curves", {}).items()}, str(data.get("measured_at", "")))


def _user_cache_file(manifest: dict) -> Path:
    return cache_root() / "calibration" / f"{artifact_key(manifest)}.json"


def load_calibration(manifest: dict) -> MachineCalibration:
    """This machine's calibration of the artifact: the user cache's record, else the manifest's, else empty."""
    machine = machine_fingerprint()
    machine_id = _digest(machine, 12)
    cached = read_json(_user_cache_file(manifest)) or {}
    if isinstance(cached.get(machine_id), dict):
        return MachineCalibration.from_json(machine_id, cached[machine_id])
    shipped = manifest.get("runtime_settings", {}).get("generation", {}).get("calibration", {})
    if isinstance(shipped.get(machine_id), dict):
        return MachineCalibration.from_json(machine_id, shipped[machine_id])
    return MachineCalibration(machine_id, machine)


def save_calibration(record: MachineCalibration, manifest: dict, manifest_path: Path | None = None) -> None:
    """Keep `record` in the user cache, and in the manifest at `manifest_path` too when given (compile time: the
    manifest is not among the hashed files, so recording a measurement does not invalidate the artifact)."""
    path = _user_cache_file(manifest)
    cached = read_json(path) or {}
    cached[record.machine_id] = record.to_json()
    write_json(path, cached)
    if manifest_path is not None:
        generation = manifest.setdefault("runtime_settings", {}).setdefault("generation", {})
        generation.setdefault("calibration", {})[record.machine_id] = record.to_json()
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
