"""VecSet shape autoencoder (decoder side) with Hunyuan3D-2 ShapeVAE parameter names.

Architecture (3DShape2VecSet / Hunyuan3D-2): latents [B, M, embed_dim] -> `post_kl` Linear -> a stack of
pre-LN self-attention blocks (`transformer.resblocks.*`, optional per-head q/k LayerNorm) -> a geometry
decoder (`geo_decoder`) that maps query points [B, N, 3] through a Fourier embedding and `query_proj`,
one cross-attention block from the queries to the latent set, an optional `ln_post` and `output_proj`
to one occupancy/SDF value per point (positive inside).

Module and parameter names follow `hy3dgen/shapegen/models/autoencoders` so that a Hunyuan3D-2 VAE
state dict loads with `load_state_dict(strict=True)` into `VecSetField(HUNYUAN3D_2_VAE)`; the
Fourier frequencies are a non-persistent buffer there too, so they are not part of the checkpoint.

`VecSetField.forward(points, latents)` is the traced unit: the compiler splits it into the
shape-invariant latent side (@prepare) and the per-query-chunk field side (@evaluate) with hoist-invariants.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from elision.models.builtin_model import BuiltinModel

BUILTIN_DIR = Path(__file__).parent / "builtin"
FIXTURE_DIR = BUILTIN_DIR / "vecset-fixtures"
LOCAL_FIXTURE_DIR = BUILTIN_DIR / "vecset-local"  # LOCAL_VAE fitted with local attention, its own latents


@dataclass(frozen=True)
class VecSetConfig:
    """Hyper-parameters with the names of Hunyuan3D-2's `ShapeVAE.__init__`."""

    num_latents: int
    embed_dim: int
    width: int
    heads: int
    num_decoder_layers: int
    geo_decoder_downsample_ratio: int = 1
    geo_decoder_mlp_expand_ratio: int = 4
    geo_decoder_ln_post: bool = True
    num_freqs: int = 8
    include_pi: bool = False
    qkv_bias: bool = False
    qk_norm: bool = True
    scale_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_latents", "embed_dim", "width", "heads", "num_decoder_layers", "num_freqs"):
            if int(getattr(self, name)) < (0 if name in ("num_decoder_layers", "num_freqs") else 1):
                raise ValueError(f"VecSetConfig.{name} must be positive, got {getattr(self, name)}")
        dec_width = self.width // self.geo_decoder_downsample_ratio
        dec_heads = self.heads // self.geo_decoder_downsample_ratio
        if self.width % self.heads or dec_heads < 1 or dec_width % dec_heads:
            raise ValueError(
                f"width {self.width} must be divisible by heads {self.heads} (also after "
                f"geo_decoder_downsample_ratio={self.geo_decoder_downsample_ratio})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "VecSetConfig":
        return VecSetConfig(**json.loads(text))


# Hunyuan3D-2 `hunyuan3d-vae-v2-0` config.yaml values (see research note §2.1).
HUNYUAN3D_2_VAE = VecSetConfig(num_latents=3072, embed_dim=64, width=1024, heads=16, num_decoder_layers=16,
                               qkv_bias=False, qk_norm=True, include_pi=False,
                               scale_factor=0.9990943042622529)
# The FlashVDM "turbo" VAE: half-width decoder, MLP ratio 1, no ln_post.
HUNYUAN3D_2_TURBO_VAE = replace(HUNYUAN3D_2_VAE, geo_decoder_downsample_ratio=2,
                                geo_decoder_mlp_expand_ratio=1, geo_decoder_ln_post=False)
# Small enough to fit to one shape in a minute on 2 CPU cores; same module structure.
TINY_VAE = VecSetConfig(num_latents=128, embed_dim=16, width=64, heads=4, num_decoder_layers=2,
                        qkv_bias=False, qk_norm=True, include_pi=False)
# Many latents, narrow decoder, no q/k norm (3DShape2VecSet's decoder has none; with it the logits stay too
# flat for any top-k to hold the mass): cross-attention dominates the per-query cost, as at full size, and the
# fit's locality term makes the attention local. The model for measuring adaptive KV with fidelity.
LOCAL_VAE = replace(TINY_VAE, num_latents=1024, width=32, heads=4, num_decoder_layers=0, qk_norm=False)


class FourierEmbedder(nn.Module):
    """cat(x, sin(x * f), cos(x * f)) with f = 2^arange(num_freqs) (times pi if include_pi), per coordinate."""

    def __init__(self, num_freqs: int = 8, input_dim: int = 3, include_pi: bool = False) -> None:
        super().__init__()
        freqs = 2.0 ** torch.arange(num_freqs, dtype=torch.float32)
        if include_pi:
            freqs = freqs * math.pi
        # Non-persistent: Hunyuan checkpoints do not contain it.
        self.register_buffer("frequencies", freqs, persistent=False)
        self.num_freqs = num_freqs
        self.out_dim = input_dim * (2 * num_freqs + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embed = (x.unsqueeze(-1) * self.frequencies).flatten(-2)
        return torch.cat((x, embed.sin(), embed.cos()), dim=-1)


class MLP(nn.Module):
    def __init__(self, *, width: int, expand_ratio: int = 4) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, width * expand_ratio)
        self.c_proj = nn.Linear(width * expand_ratio, width)
        self.gelu = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


def _qk_norm(dim: int, enabled: bool) -> nn.Module:
    return nn.LayerNorm(dim, elementwise_affine=True, eps=1e-6) if enabled else nn.Identity()


class QKVMultiheadAttention(nn.Module):
    def __init__(self, *, heads: int, width: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q_norm = _qk_norm(width // heads, qk_norm)
        self.k_norm = _qk_norm(width // heads, qk_norm)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, n_ctx, width3 = qkv.shape
        # Hunyuan packs q,k,v per head: view(heads, 3*d) then split along the last dim.
        q, k, v = qkv.view(bs, n_ctx, self.heads, -1).split(width3 // self.heads // 3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(bs, n_ctx, -1)


class MultiheadAttention(nn.Module):
    def __init__(self, *, width: int, heads: int, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.c_qkv = nn.Linear(width, width * 3, bias=qkv_bias)
        self.c_proj = nn.Linear(width, width)
        self.attention = QKVMultiheadAttention(heads=heads, width=width, qk_norm=qk_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.attention(self.c_qkv(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, *, width: int, heads: int, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.attn = MultiheadAttention(width=width, heads=heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.ln_1 = nn.LayerNorm(width, elementwise_affine=True, eps=1e-6)
        self.mlp = MLP(width=width)
        self.ln_2 = nn.LayerNorm(width, elementwise_affine=True, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, *, width: int, layers: int, heads: int, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width=width, heads=heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
             for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class QKVMultiheadCrossAttention(nn.Module):
    def __init__(self, *, heads: int, width: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q_norm = _qk_norm(width // heads, qk_norm)
        self.k_norm = _qk_norm(width // heads, qk_norm)

    def split_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, 2W] -> normalised K and V, each [B, heads, M, d] (the latent-side half)."""
        bs, n_data, width2 = kv.shape
        k, v = kv.view(bs, n_data, self.heads, -1).split(width2 // self.heads // 2, dim=-1)
        return self.k_norm(k).transpose(1, 2), v.transpose(1, 2)

    def project_q(self, q: torch.Tensor) -> torch.Tensor:
        bs, n_ctx, _ = q.shape
        return self.q_norm(q.view(bs, n_ctx, self.heads, -1)).transpose(1, 2)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        k, v = self.split_kv(kv)
        qh = self.project_q(q)
        out = F.scaled_dot_product_attention(qh, k, v)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


class MultiheadCrossAttention(nn.Module):
    def __init__(self, *, width: int, heads: int, data_width: int, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.c_q = nn.Linear(width, width, bias=qkv_bias)
        self.c_kv = nn.Linear(data_width, width * 2, bias=qkv_bias)
        self.c_proj = nn.Linear(width, width)
        self.attention = QKVMultiheadCrossAttention(heads=heads, width=width, qk_norm=qk_norm)

    def forward(self, x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.attention(self.c_q(x), self.c_kv(data)))


class ResidualCrossAttentionBlock(nn.Module):
    def __init__(self, *, width: int, heads: int, mlp_expand_ratio: int, data_width: int,
                 qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.attn = MultiheadCrossAttention(width=width, heads=heads, data_width=data_width,
                                            qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.ln_1 = nn.LayerNorm(width, elementwise_affine=True, eps=1e-6)
        self.ln_2 = nn.LayerNorm(data_width, elementwise_affine=True, eps=1e-6)
        self.ln_3 = nn.LayerNorm(width, elementwise_affine=True, eps=1e-6)
        self.mlp = MLP(width=width, expand_ratio=mlp_expand_ratio)

    def forward(self, x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), self.ln_2(data))
        return x + self.mlp(self.ln_3(x))


class CrossAttentionDecoder(nn.Module):
    """Hunyuan's `geo_decoder`: query points -> one field value each, attending to the latent set."""

    def __init__(self, *, fourier_embedder: FourierEmbedder, width: int, heads: int, mlp_expand_ratio: int,
                 downsample_ratio: int, enable_ln_post: bool, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.fourier_embedder = fourier_embedder
        self.downsample_ratio = downsample_ratio
        self.enable_ln_post = enable_ln_post
        self.query_proj = nn.Linear(fourier_embedder.out_dim, width)
        if downsample_ratio != 1:
            self.latents_proj = nn.Linear(width * downsample_ratio, width)
        if not enable_ln_post:  # Hunyuan turns qk_norm off together with ln_post (turbo decoder)
            qk_norm = False
        self.cross_attn_decoder = ResidualCrossAttentionBlock(
            width=width, heads=heads, mlp_expand_ratio=mlp_expand_ratio, data_width=width,
            qkv_bias=qkv_bias, qk_norm=qk_norm)
        if enable_ln_post:
            self.ln_post = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, 1)

    # --- the cross-attention's inputs, for the attention-locality term of a fit (`apps.volume.encode`); decoding
    # splits the traced forward instead (the hoist-invariants pass) ---
    def latent_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [B, heads, M, d] from the transformer output."""
        if self.downsample_ratio != 1:
            latents = self.latents_proj(latents)
        block = self.cross_attn_decoder
        return block.attn.attention.split_kv(block.attn.c_kv(block.ln_2(latents)))

    def query_heads(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query embedding x [B,N,W], per-head queries [B,heads,N,d])."""
        x = self.query_proj(self.fourier_embedder(points))
        block = self.cross_attn_decoder
        return x, block.attn.attention.project_q(block.attn.c_q(block.ln_1(x)))

    def forward(self, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.query_proj(self.fourier_embedder(queries))
        if self.downsample_ratio != 1:
            latents = self.latents_proj(latents)
        x = self.cross_attn_decoder(x, latents)
        if self.enable_ln_post:
            x = self.ln_post(x)
        return self.output_proj(x)


class ShapeVAE(nn.Module):
    """Hunyuan3D-2 ShapeVAE decoder side: `forward(latents)` = transformer(post_kl(latents))."""

    def __init__(self, config: VecSetConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.fourier_embedder = FourierEmbedder(num_freqs=c.num_freqs, include_pi=c.include_pi)
        self.post_kl = nn.Linear(c.embed_dim, c.width)
        self.transformer = Transformer(width=c.width, layers=c.num_decoder_layers, heads=c.heads,
                                       qkv_bias=c.qkv_bias, qk_norm=c.qk_norm)
        self.geo_decoder = CrossAttentionDecoder(
            fourier_embedder=self.fourier_embedder,
            width=c.width // c.geo_decoder_downsample_ratio,
            heads=c.heads // c.geo_decoder_downsample_ratio,
            mlp_expand_ratio=c.geo_decoder_mlp_expand_ratio,
            downsample_ratio=c.geo_decoder_downsample_ratio,
            enable_ln_post=c.geo_decoder_ln_post, qkv_bias=c.qkv_bias, qk_norm=c.qk_norm)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.post_kl(latents))


class VecSetField(ShapeVAE):
    """The whole field decoder as one traced function: (points [B,N,3], latents [B,M,E]) -> field [B,N].

    Same parameters (and names) as ShapeVAE; the latent-side work is recomputed on every call, which is
    exactly what the hoist-invariants rewrite removes.
    """

    lipschitz: float | None = None  # set from checkpoint metadata when calibrated

    def forward(self, points: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        z = self.transformer(self.post_kl(latents))
        return self.geo_decoder(points, z).squeeze(-1)


def build_field(config: VecSetConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> VecSetField:
    """Random-weight field decoder (eval mode). `device="meta"` allocates nothing (for name/shape checks)."""
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = VecSetField(config)
    return model.eval()


def save_checkpoint(model: VecSetField, path: str | Path, half: bool = True) -> None:
    """safetensors with the config in the metadata; `half` stores fp16 weights (loaded back as fp32)."""
    tensors = {k: (v.detach().half() if half else v.detach().float()).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"elision.vecset.config": model.config.to_json()})


def load_checkpoint(path: str | Path) -> VecSetField:
    """Load a checkpoint written by `save_checkpoint` (strict names, fp32)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VecSet checkpoint {path} does not exist")
    with _readable_safetensors(path, "VecSet checkpoint"):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "elision.vecset.config" not in meta:
            raise ValueError(f"{path} has no 'elision.vecset.config' metadata; write it with "
                             "elision.models.vecset.save_checkpoint")
        model = VecSetField(VecSetConfig.from_json(meta["elision.vecset.config"]))
        model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    # Band calibration of the sparse decoder: Lipschitz constant of the field near the surface.
    if "elision.vecset.lipschitz" in meta:
        model.lipschitz = float(meta["elision.vecset.lipschitz"])
    return model.eval()


def load_latents(path: str | Path) -> torch.Tensor:
    """Latents [1, M, E] fp32 from a safetensors file with key 'latents'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latents file {path} does not exist")
    with _readable_safetensors(path, "latents file"):
        data = load_file(str(path))
        if "latents" not in data:
            raise ValueError(f"{path} has no tensor named 'latents' (found: {sorted(data)})")
        lat = data["latents"].float()
    return lat.unsqueeze(0) if lat.dim() == 2 else lat


@contextlib.contextmanager
def _readable_safetensors(path: Path, what: str):
    """Whatever a broken or foreign file makes safetensors / torch raise becomes one ValueError naming the file."""
    try:
        yield
    except ValueError:
        raise
    except (SafetensorError, OSError, RuntimeError, TypeError, KeyError, OverflowError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a valid {what} ({first})") from None


def save_latents(latents: torch.Tensor, path: str | Path, **metadata: str) -> None:
    save_file({"latents": latents.detach().float().contiguous()}, str(path),
              metadata={k: str(v) for k, v in metadata.items()})


def fixture_names(directory: Path = FIXTURE_DIR) -> list[str]:
    return sorted(p.name[: -len(".latents.safetensors")] for p in directory.glob("*.latents.safetensors"))


def fixture_latents(name: str, directory: Path = FIXTURE_DIR) -> torch.Tensor:
    """Latents of a fixture shape; `directory` picks the model they were fitted for (FIXTURE_DIR: vecset-tiny,
    LOCAL_FIXTURE_DIR: vecset-local)."""
    path = directory / f"{name}.latents.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no VecSet fixture {name!r} in {directory.name}; available: "
                                f"{', '.join(fixture_names(directory)) or '(none)'}; run tools/make_shape_fixtures.py")
    return load_latents(path)


def _checkpoint_builder(directory: Path, name: str, make: str):
    def build() -> VecSetField:
        ckpt = directory / f"{name}.safetensors"
        if ckpt.is_file():
            return load_checkpoint(ckpt)
        raise FileNotFoundError(f"{ckpt} is missing; run tools/make_shape_fixtures.py {make}".rstrip())
    return build


def _example_inputs(model: VecSetField) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.config
    g = torch.Generator().manual_seed(0)
    return (torch.rand(1, 64, 3, generator=g) * 2 - 1, torch.randn(1, c.num_latents, c.embed_dim, generator=g))


_QUERIES_DYNAMIC = {0: {1: "queries"}}
BUILTINS = [
    BuiltinModel(
        name="vecset-tiny",
        description="Tiny VecSet shape decoder (Hunyuan3D-2 ShapeVAE layout) auto-decoded on CGAL meshes "
                    "and thin procedural parts; latents under models/builtin/vecset-fixtures",
        build=_checkpoint_builder(FIXTURE_DIR, "vecset-tiny", ""), example_inputs=_example_inputs,
        dynamic_dims=_QUERIES_DYNAMIC, kind="shape-decoder"),
    BuiltinModel(
        name="vecset-local",
        description="VecSet decoder with 1024 latents, width 32 and local cross-attention (fitted with a "
                    "locality term), for adaptive-KV fidelity; latents under models/builtin/vecset-local",
        build=_checkpoint_builder(LOCAL_FIXTURE_DIR, "vecset-local", "--local"), example_inputs=_example_inputs,
        dynamic_dims=_QUERIES_DYNAMIC, kind="shape-decoder"),
    BuiltinModel(
        name="vecset-hunyuan-random",
        description="Hunyuan3D-2 VAE-sized VecSet field decoder (3072 latents, width 1024, 16 heads, "
                    "16 layers), random weights, for benchmarks and name checks",
        build=lambda: build_field(HUNYUAN3D_2_VAE), example_inputs=_example_inputs,
        dynamic_dims=_QUERIES_DYNAMIC, kind="shape-decoder"),
]
