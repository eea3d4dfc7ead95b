"""Surface extraction, mesh files, previews and fidelity metrics for decoded volumes.

Marching cubes is scikit-image's Lewiner; vertices map from grid index to world with the same spacing
the decoder used (`2*bounds/r`, no `r+1` off-by-one). Metrics: occupancy IoU of two grids, Chamfer
distance and F-score of two meshes from surface samples (scipy KD-trees).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elision.apps.volume.decode import VolumeResult, spacing

MESH_SUFFIXES = (".ply", ".obj", ".glb", ".stl", ".off")


class MeshError(ValueError):
    pass


@dataclass
class Mesh:
    vertices: np.ndarray  # [V,3] float32
    faces: np.ndarray     # [F,3] int64

    def stats(self) -> dict:
        import trimesh  # optional (extra `3d`)
        if len(self.faces) == 0:
            return {"vertices": 0, "faces": 0, "watertight": False, "area": 0.0, "volume": 0.0}
        m = trimesh.Trimesh(self.vertices, self.faces, process=False)
        return {"vertices": int(len(self.vertices)), "faces": int(len(self.faces)),
                "watertight": bool(m.is_watertight), "area": float(m.area),
                "volume": float(m.volume) if m.is_watertight else None,
                "bounds": m.bounds.tolist()}


def extract_mesh(result: VolumeResult, iso: float = 0.0) -> Mesh:
    from skimage.measure import marching_cubes  # optional (extra `3d`)
    grid = result.grid.numpy() if isinstance(result.grid, torch.Tensor) else result.grid
    if not np.isfinite(grid).all():
        raise MeshError("volume grid contains NaN/inf; the decoder must fill every point")
    if grid.max() <= iso or grid.min() >= iso:
        return Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64))
    h = spacing(result.resolution, result.bounds)
    verts, faces, _, _ = marching_cubes(grid, iso, spacing=(h, h, h), method="lewiner")
    # Field is positive inside: flip winding so normals point outwards.
    return Mesh((verts - result.bounds).astype(np.float32), faces[:, ::-1].astype(np.int64).copy())


def save_mesh(mesh: Mesh, path: str | Path) -> Path:
    import trimesh  # optional (extra `3d`)
    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise MeshError(f"unsupported mesh format {path.suffix!r}; use one of {', '.join(MESH_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).export(str(path))
    return path


def render_preview(mesh: Mesh, path: str | Path, title: str = "", size_px: int = 640) -> Path:
    """Flat-shaded software render (matplotlib Agg, no display) of the mesh from an oblique view."""
    import matplotlib  # only previews need it (pyplot costs a noticeable part of a second to import)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed
    from matplotlib.collections import PolyCollection

    path = Path(path)
    fig = plt.figure(figsize=(size_px / 100, size_px / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_aspect("equal")
    if len(mesh.faces):
        # rotate: yaw 35 deg, pitch 25 deg; orthographic projection onto x/y, painter's algorithm on z
        a, b = np.radians(35), np.radians(25)
        ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        # grid axes are (x, y, z) with y up in most assets; view looks down -z
        v = mesh.vertices @ (rx @ ry).T
        tri = v[mesh.faces]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
        light = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
        shade = 0.25 + 0.75 * np.clip(n @ light, 0, 1)
        visible = n[:, 2] > -0.2
        order = np.argsort(tri[:, :, 2].mean(1))
        order = order[visible[order]]
        colors = np.stack([0.55 * shade, 0.7 * shade, 0.9 * shade, np.ones_like(shade)], 1)
        ax.add_collection(PolyCollection(tri[order][:, :, :2], facecolors=colors[order], edgecolors="none"))
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
    if title:
        ax.text(0.02, 0.97, title, transform=ax.transAxes, fontsize=9, va="top")
    fig.savefig(str(path))
    plt.close(fig)
    return path


def occupancy_iou(a: VolumeResult | torch.Tensor, b: VolumeResult | torch.Tensor, iso: float = 0.0) -> float:
    ga = a.grid if isinstance(a, VolumeResult) else a
    gb = b.grid if isinstance(b, VolumeResult) else b
    if ga.shape != gb.shape:
        raise MeshError(f"grids differ in shape: {tuple(ga.shape)} vs {tuple(gb.shape)}")
    ia, ib = ga > iso, gb > iso
    union = int((ia | ib).sum())
    return 1.0 if union == 0 else int((ia & ib).sum()) / union


def sample_surface(mesh: Mesh, n: int, seed: int = 0) -> np.ndarray:
    import trimesh  # optional (extra `3d`)
    if len(mesh.faces) == 0:
        return np.zeros((0, 3), np.float32)
    pts, _ = trimesh.sample.sample_surface(trimesh.Trimesh(mesh.vertices, mesh.faces, process=False), n, seed=seed)
    return pts.astype(np.float32)


def chamfer_fscore(a: Mesh, b: Mesh, n: int = 100_000, threshold: float = 0.01) -> dict:
    """Symmetric Chamfer-L1 (mean of both directions' mean distances) and F-score at `threshold`."""
    from scipy.spatial import cKDTree  # optional (extra `3d`)
    pa, pb = sample_surface(a, n, 1), sample_surface(b, n, 2)
    if len(pa) == 0 or len(pb) == 0:
        both = len(pa) == len(pb) == 0
        return {"chamfer": 0.0 if both else float("inf"), "fscore": 1.0 if both else 0.0}
    da, _ = cKDTree(pb).query(pa, workers=2)
    db, _ = cKDTree(pa).query(pb, workers=2)
    prec, rec = float((da < threshold).mean()), float((db < threshold).mean())
    f = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
    return {"chamfer": float((da.mean() + db.mean()) / 2), "fscore": f}


def lost_components(dense: VolumeResult, sparse: VolumeResult, iso: float = 0.0, min_voxels: int = 1) -> int:
    """Connected inside-components of the dense grid with no inside voxel left in the sparse grid."""
    from scipy import ndimage  # optional (extra `3d`)
    inside = (dense.grid > iso).numpy()
    labels, n = ndimage.label(inside)
    if n == 0:
        return 0
    kept = np.unique(labels[(sparse.grid > iso).numpy() & inside])
    sizes = np.bincount(labels.ravel())
    lost = [i for i in range(1, n + 1) if i not in set(kept.tolist()) and sizes[i] >= min_voxels]
    return len(lost)
