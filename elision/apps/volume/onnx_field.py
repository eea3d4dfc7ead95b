"""ONNX artifacts of the split field decoder, driven by onnxruntime.

`export_field_onnx(model, out_dir)` writes (torch.onnx dynamo exporter, opset 18):
  latents_side.onnx   latents [1,M,E]          -> k, v [heads,M,d]       (once per shape)
  field_chunk.onnx    points [N,3], k, v       -> values [N]             (per query chunk, dynamic N)
  query_heads.onnx    points [N,3]             -> q [heads,N,d]          (adaptive-KV probe queries)
  field_gathered.onnx points [T,C,3], k, v, tokens [heads,T,k] -> values [T,C]
                      (adaptive KV: each tile of C queries attends only to its own k tokens per head; the
                      token gather is one flat Gather, so no per-tile copy of K/V is materialized)
plus field.json (config, files). `OrtFieldDecoder(out_dir)` implements `GatheredFieldDecoder` with
onnxruntime sessions only (no PyTorch model), so the hierarchical loop and adaptive KV run on ORT.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elision.models.vecset import VecSetField
from elision.apps.volume.adaptive_kv import gathered_attention
from elision.apps.volume.field import KVState

OPSET = 18


class _LatentSide(nn.Module):
    def __init__(self, model: VecSetField) -> None:
        super().__init__()
        self.model = model

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.model.transformer(self.model.post_kl(latents))
        k, v = self.model.geo_decoder.latent_kv(z)
        return k[0], v[0]


class _FieldChunk(nn.Module):
    def __init__(self, model: VecSetField) -> None:
        super().__init__()
        self.geo = model.geo_decoder

    def forward(self, points: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x, q = self.geo.query_heads(points.unsqueeze(0))
        attn = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0))
        return self.geo.epilogue(x, attn)[0, :, 0]


class _QueryHeads(nn.Module):
    def __init__(self, model: VecSetField) -> None:
        super().__init__()
        self.geo = model.geo_decoder

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.geo.query_heads(points.unsqueeze(0))[1][0]


class _FieldGathered(nn.Module):
    def __init__(self, model: VecSetField) -> None:
        super().__init__()
        self.geo = model.geo_decoder

    def forward(self, points: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        tiles, c = points.shape[0], points.shape[1]
        x, q = self.geo.query_heads(points.reshape(1, -1, 3))
        h = q.shape[1]
        attn = gathered_attention(q[0].reshape(h, tiles, c, -1), k, v, tokens, use_kernel=False)
        return self.geo.epilogue(x, attn.reshape(1, h, tiles * c, -1))[0, :, 0].reshape(tiles, c)


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic: dict) -> None:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=OPSET, input_names=input_names,
                                 output_names=output_names, dynamic_shapes=dynamic, verbose=False)
    prog.save(str(path))


def export_field_onnx(model: VecSetField, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    dec_w = c.width // c.geo_decoder_downsample_ratio
    heads = c.heads // c.geo_decoder_downsample_ratio
    d = dec_w // heads
    n = torch.export.Dim("queries", min=1, max=2 ** 24)
    tiles, tile = torch.export.Dim("tiles", min=1, max=2 ** 20), torch.export.Dim("tile", min=1, max=2 ** 16)
    topk = torch.export.Dim("topk", min=1, max=c.num_latents)
    lat = torch.randn(1, c.num_latents, c.embed_dim)
    pts = torch.rand(17, 3) * 2 - 1
    k = torch.randn(heads, c.num_latents, d)
    tile_pts = torch.rand(3, 5, 3) * 2 - 1
    tokens = torch.randint(0, c.num_latents, (heads, 3, min(7, c.num_latents)))
    with torch.no_grad():
        _export(_LatentSide(model), (lat,), out / "latents_side.onnx", ["latents"], ["k", "v"], None)
        # distinct k and v tensors: passing one object twice lets the exporter alias the two inputs
        _export(_FieldChunk(model), (pts, k, k.clone() + 1), out / "field_chunk.onnx", ["points", "k", "v"], ["values"],
                {"points": {0: n}, "k": None, "v": None})
        _export(_QueryHeads(model), (pts,), out / "query_heads.onnx", ["points"], ["q"], {"points": {0: n}})
        _export(_FieldGathered(model), (tile_pts, k, k.clone() + 1, tokens), out / "field_gathered.onnx",
                ["points", "k", "v", "tokens"], ["values"],
                {"points": {0: tiles, 1: tile}, "k": None, "v": None, "tokens": {1: tiles, 2: topk}})
    (out / "field.json").write_text(json.dumps({"config": json.loads(c.to_json()), "opset": OPSET,
                                                "lipschitz": model.lipschitz,
                                                "files": SESSION_FILES}, indent=1))
    return out


SESSIONS = ("latents_side", "field_chunk", "query_heads", "field_gathered")
SESSION_FILES = [f"{name}.onnx" for name in SESSIONS]


class OrtFieldDecoder:
    """GatheredFieldDecoder backed by onnxruntime sessions (CPU provider unless told otherwise)."""

    def __init__(self, artifact_dir: str | Path, threads: int = 2, providers: list[str] | None = None) -> None:
        import onnxruntime as ort
        d = Path(artifact_dir)
        if not (d / "field.json").is_file():
            raise FileNotFoundError(f"{d} is not a field-decoder ONNX artifact (no field.json); "
                                    "write one with export_field_onnx")
        meta = json.loads((d / "field.json").read_text())
        self.lipschitz = meta.get("lipschitz")  # band calibration travels with the artifact
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # ORT's pool threads spin after each run by default; between runs (adaptive KV plans its tiles in torch
        # between session calls) spinning threads would take the cores the planner needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        prov = providers or ["CPUExecutionProvider"]
        missing = [f for f in SESSION_FILES if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{d}: field-decoder artifact lacks {', '.join(missing)} (written by an older "
                                    "elision?); export it again with export_field_onnx")
        self.sessions = {name: ort.InferenceSession(str(d / f"{name}.onnx"), so, providers=prov) for name in SESSIONS}

    def prepare(self, latents: torch.Tensor) -> KVState:
        lat = latents.float().reshape(1, *latents.shape[-2:]).numpy()
        k, v = self.sessions["latents_side"].run(None, {"latents": lat})
        return KVState(torch.from_numpy(k), torch.from_numpy(v))

    def kv(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        return state.k, state.v

    def evaluate(self, state: KVState, points: torch.Tensor) -> torch.Tensor:
        (vals,) = self.sessions["field_chunk"].run(None, {"points": np.ascontiguousarray(points.numpy(), np.float32),
                                                          "k": state.k.numpy(), "v": state.v.numpy()})
        return torch.from_numpy(vals)

    def query_heads(self, state: KVState, points: torch.Tensor) -> torch.Tensor:
        (q,) = self.sessions["query_heads"].run(None, {"points": np.ascontiguousarray(points.numpy(), np.float32)})
        return torch.from_numpy(q)

    def evaluate_gathered(self, state: KVState, points: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        (vals,) = self.sessions["field_gathered"].run(None, {
            "points": np.ascontiguousarray(points.numpy(), np.float32), "k": state.k.numpy(), "v": state.v.numpy(),
            "tokens": np.ascontiguousarray(tokens.numpy(), np.int64)})
        return torch.from_numpy(vals)
