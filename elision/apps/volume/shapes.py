"""Shape sources for fitting VecSet latents: meshes (trimesh) and analytic thin-part SDFs.

Field convention (Hunyuan3D-2): positive inside. Training targets are the truncated SDF
`clip(-sdf / trunc, -1, 1)`, so the field's Lipschitz constant is about 1/trunc, which is what the
sparse decoder's band calibration relies on.

Mesh signs come from generalized winding numbers (robust for watertight meshes, no rtree/embree needed),
distances from a KD-tree over dense surface samples.
"""
from __future__ import annotations

import io
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

CGAL_DATA = Path("/usr/share/doc/libcgal-dev/data.tar.gz")
TRUNC = 0.05
EXTENT = 0.85  # meshes are scaled so their bounding box fits [-EXTENT, EXTENT]^3


class ShapeError(ValueError):
    pass


@dataclass
class ShapeSource:
    """Something that can label points: signed distance (negative inside) for [N,3] float32 points."""

    name: str
    sdf: Callable[[np.ndarray], np.ndarray]
    surface_samples: Callable[[int, np.random.Generator], np.ndarray]
    mesh: object | None = None  # trimesh.Trimesh when the source is a mesh

    def target(self, points: np.ndarray) -> np.ndarray:
        return np.clip(-self.sdf(points) / TRUNC, -1.0, 1.0).astype(np.float32)


def winding_number(points: np.ndarray, triangles: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Generalized winding number (Van Oosterom-Strackee solid angles / 4 pi); ~1 inside, ~0 outside."""
    tri = torch.as_tensor(triangles, dtype=torch.float64)
    out = np.empty(len(points), dtype=np.float64)
    for s in range(0, len(points), chunk):
        p = torch.as_tensor(points[s:s + chunk], dtype=torch.float64)[:, None, None, :]
        r = tri[None] - p                                   # [n, F, 3, 3]
        a, b, c = r[:, :, 0], r[:, :, 1], r[:, :, 2]
        la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
        det = (a * torch.cross(b, c, dim=-1)).sum(-1)
        den = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
        out[s:s + chunk] = (torch.atan2(det, den).sum(-1) / (2 * math.pi)).numpy()
    return out


def _normalize(mesh):
    lo, hi = mesh.bounds
    mesh.apply_translation(-(lo + hi) / 2)
    mesh.apply_scale(2 * EXTENT / float((hi - lo).max()))
    return mesh


def mesh_source(mesh, name: str, surface_samples: int = 200_000) -> ShapeSource:
    """A watertight trimesh as a ShapeSource (normalised to the decoding box)."""
    import trimesh  # optional (extra `3d`)
    from scipy.spatial import cKDTree  # optional (extra `3d`)
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ShapeError(f"{name}: not a triangle mesh")
    if not mesh.is_watertight:
        raise ShapeError(f"{name}: mesh is not watertight ({len(mesh.faces)} faces); inside/outside is "
                         "undefined — repair it (e.g. trimesh.repair.fill_holes) first")
    mesh = _normalize(mesh.copy())
    trimesh.repair.fix_normals(mesh)
    dense, face_idx = trimesh.sample.sample_surface(mesh, surface_samples, seed=1)
    normals = np.asarray(mesh.face_normals)[face_idx]
    tree = cKDTree(dense)

    def sdf(points: np.ndarray) -> np.ndarray:
        # Sign from the outward normal at the nearest dense surface sample (a pseudo-normal test; exact
        # winding numbers cost O(points x faces) and are only used to validate it, see sign_agreement).
        dist, i = tree.query(points, workers=2)
        inside = np.einsum("ij,ij->i", points - dense[i], normals[i]) < 0
        return np.where(inside, -dist, dist).astype(np.float32)

    def surf(n: int, g: np.random.Generator) -> np.ndarray:
        return dense[g.integers(0, len(dense), n)].astype(np.float32)

    return ShapeSource(name=name, sdf=sdf, surface_samples=surf, mesh=mesh)


def sign_agreement(src: ShapeSource, n: int = 2000, seed: int = 0) -> float:
    """Fraction of uniform points where the fast sign equals the winding-number sign (mesh sources)."""
    if src.mesh is None:
        return 1.0
    pts = np.random.default_rng(seed).uniform(-1, 1, (n, 3)).astype(np.float32)
    exact = winding_number(pts, np.asarray(src.mesh.triangles)) > 0.5
    return float(((src.sdf(pts) < 0) == exact).mean())


def load_mesh_file(path: str | Path):
    import trimesh  # optional (extra `3d`)
    path = Path(path)
    if not path.is_file():
        raise ShapeError(f"mesh file {path} does not exist")
    try:
        mesh = trimesh.load(str(path), force="mesh")
    except Exception as e:  # trimesh raises many types for bad files
        raise ShapeError(f"cannot read {path} as a mesh ({type(e).__name__}: {e}); use .off/.obj/.ply/.stl/.glb")
    if not hasattr(mesh, "faces") or len(mesh.faces) == 0:
        raise ShapeError(f"{path} contains no triangles")
    return mesh


def cgal_mesh(name: str):
    """A mesh from Debian libcgal-demo's data.tar.gz (data/meshes/NAME.off), read without extracting."""
    import trimesh  # optional (extra `3d`)
    if not CGAL_DATA.is_file():
        raise ShapeError(f"{CGAL_DATA} not found; run `apt-get install -y libcgal-demo`")
    with tarfile.open(CGAL_DATA) as tar:
        member = f"data/meshes/{name}.off"
        try:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
        except KeyError:
            raise ShapeError(f"{member} is not in {CGAL_DATA}")
    return trimesh.load(io.BytesIO(data), file_type="off", force="mesh")


# ------------------------------------------------------------------ analytic thin parts

def _sd_box(p: np.ndarray, center, half) -> np.ndarray:
    q = np.abs(p - np.asarray(center, np.float32)) - np.asarray(half, np.float32)
    return np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)


def _sd_sphere(p, center, r) -> np.ndarray:
    return np.linalg.norm(p - np.asarray(center, np.float32), axis=-1) - r


def _sd_capsule(p, a, b, r) -> np.ndarray:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    pa, ba = p - a, b - a
    h = np.clip((pa @ ba) / (ba @ ba), 0, 1)
    return np.linalg.norm(pa - h[:, None] * ba, axis=-1) - r


def analytic_source(name: str, sdf: Callable[[np.ndarray], np.ndarray], resolution: int = 160) -> ShapeSource:
    """Analytic SDF plus a reference mesh (marching cubes of the exact SDF) for surface samples."""
    import trimesh  # optional (extra `3d`)
    from skimage.measure import marching_cubes  # optional (extra `3d`)
    h = 2.0 / resolution
    ax = np.linspace(-1, 1, resolution + 1, dtype=np.float32)
    grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    vol = sdf(grid).reshape((resolution + 1,) * 3)
    verts, faces, _, _ = marching_cubes(vol, 0.0, spacing=(h, h, h))
    mesh = trimesh.Trimesh(verts - 1.0, faces[:, ::-1], process=False)
    dense, _ = trimesh.sample.sample_surface(mesh, 200_000, seed=1)
    dense = dense.astype(np.float32)

    def surf(n: int, g: np.random.Generator) -> np.ndarray:
        return dense[g.integers(0, len(dense), n)]

    src = ShapeSource(name, sdf, surf, mesh=None)
    src.reference_mesh = mesh  # type: ignore[attr-defined]
    return src


def plate_sdf(p: np.ndarray) -> np.ndarray:
    return np.minimum(_sd_sphere(p, (0, 0.25, 0), 0.4), _sd_box(p, (0, -0.3, 0), (0.7, 0.01, 0.5)))


def thin_plate() -> ShapeSource:
    """A sphere on a 0.02-thick plate: thinner than a 64^3 coarse cell (0.032)."""
    return analytic_source("thin_plate", plate_sdf)


def thin_rods() -> ShapeSource:
    """A ball with three 0.016-radius rods (a tripod) reaching to the box corners."""
    def sdf(p):
        d = _sd_sphere(p, (0, 0.1, 0), 0.25)
        for end in ((0.7, -0.7, 0.6), (-0.7, -0.7, 0.6), (0.0, -0.7, -0.75)):
            d = np.minimum(d, _sd_capsule(p, (0, 0.1, 0), end, 0.016))
        return d
    return analytic_source("thin_rods", sdf)


def thin_shell() -> ShapeSource:
    """A bowl: a 0.02-thick spherical shell cut open at the top."""
    def sdf(p):
        shell = np.abs(_sd_sphere(p, (0, 0, 0), 0.7)) - 0.01
        return np.maximum(shell, p[:, 1] - 0.35)
    return analytic_source("thin_shell", sdf)


PROCEDURAL = {"thin_plate": thin_plate, "thin_rods": thin_rods, "thin_shell": thin_shell}


def training_points(src: ShapeSource, n: int, g: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """40% uniform in the box, 60% near the surface (two noise scales); returns (points, targets)."""
    nu = int(n * 0.4)
    ns = n - nu
    surf = src.surface_samples(ns, g)
    sigma = np.where(g.random(ns) < 0.5, 0.01, 0.05).astype(np.float32)[:, None]
    near = np.clip(surf + g.normal(size=surf.shape).astype(np.float32) * sigma, -1, 1)
    pts = np.concatenate([g.uniform(-1, 1, (nu, 3)).astype(np.float32), near])
    return pts, src.target(pts)
