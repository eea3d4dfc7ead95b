"""ModelMap: what the model map found in one function, with its text, JSON and applicable-rewrites reports."""
from __future__ import annotations

from dataclasses import dataclass, field

from elision.analysis.model_map.decoder import DecoderMap
from elision.analysis.model_map.records import (Attention, ClsToken, Embedding, Layer, Linear, ModelKind, Norm,
                                                PatchEmbed)
from elision.ir.core import Node, Value


@dataclass
class ModelMap:
    kind: ModelKind
    embedding: Embedding | None
    layers: list[Layer]
    final_norm: Norm | None
    lm_head: Linear | None
    patch_embed: PatchEmbed | None
    cls_token: ClsToken | None
    position_ids: Value | None
    position_nodes: list[Node]
    attention_mask: list[Node]
    unrecognized: list[str]
    stacks: dict[str, list[Layer]] = field(default_factory=dict)   # every layer stack (VLMs have two)
    position_embedding: Embedding | None = None
    image_merge: Node | None = None   # VLM: where image features enter the token sequence
    extra_embeddings: list[Embedding] = field(default_factory=list)  # token-type / segment embeddings
    projector: list[Linear] = field(default_factory=list)  # VLM: linears from the vision stack to the merge
    attentions: list[Attention] = field(default_factory=list)  # every recognized attention, in graph order
    norms: list[Norm] = field(default_factory=list)            # every recognized norm, in graph order
    fn_name: str = "forward"
    op_histogram: dict[str, int] = field(default_factory=dict)
    decoder: DecoderMap | None = None   # the KV-cache view of a decoder-only LM (see `decoder`)
    decoder_problem: str | None = None  # why there is none

    # ---- text ------------------------------------------------------------------------------------
    def describe(self) -> list[str]:
        lines = [f"model kind: {self.kind}"]
        if self.embedding:
            e = self.embedding
            lines.append(f"token embedding: {e.param} ({e.num_embeddings} x {e.dim}) indexed by %{e.input.name}")
        for e in self.extra_embeddings:
            lines.append(f"extra embedding summed into the tokens: {e.param}")
        if self.position_embedding:
            lines.append(f"position embedding: {self.position_embedding.param}")
        if self.patch_embed:
            p = self.patch_embed
            lines.append(f"patch embedding: {p.weight} patch {'x'.join(map(str, p.patch_size))} -> "
                         f"{p.num_patches if p.num_patches is not None else '?'} patches of dim {p.dim}")
        if self.cls_token:
            lines.append(f"[CLS] token: {self.cls_token.param} ({self.cls_token.how})")
        if self.image_merge is not None:
            lines.append(f"image features merged into the token sequence at %{self.image_merge.result.name} "
                         f"({self.image_merge.op})")
        if self.projector:
            lines.append(f"image projector: {len(self.projector)} linear(s) "
                         f"({', '.join(p.weight for p in self.projector)})")
        if self.position_ids is not None:
            lines.append(f"position ids: %{self.position_ids.name} ({len(self.position_nodes)} nodes)")
        if self.attention_mask:
            lines.append(f"attention mask subgraph: {len(self.attention_mask)} nodes")
        for stack, layers in self.stacks.items():
            lines.append(f"layer stack {stack or '(no loc)'}: {len(layers)} layers")
            for ly in layers:
                a = ly.attention
                mlp = "none" if ly.mlp is None else ("gated" if ly.mlp.gated else "plain") + (
                    f" ({ly.mlp.activation})" if ly.mlp.activation else "")
                norms = "+".join(n.kind for n in ly.norms) or "none"
                projs = "".join(c for c, p in zip("qkvo", (a.q_proj, a.k_proj, a.v_proj, a.o_proj)) if p is not None)
                lines.append(
                    f"  [{ly.index}] {ly.loc}: attention {a.kind} heads={a.num_heads} kv_heads={a.num_kv_heads} "
                    f"head_dim={a.head_dim} mask={a.mask_kind}{' (from input)' if a.mask_depends_on_input else ''}"
                    f"{' rotary' if a.rotary else ''}{' packed-qkv' if a.packed_qkv else ''} proj={projs or '-'}; "
                    f"mlp {mlp}{' (parallel to the attention)' if ly.parallel else ''}; norms {norms}"
                    f"{' (post-norm)' if ly.post_norm else ''}")
        if self.decoder is not None:
            d, s0 = self.decoder, self.decoder.sites[0]
            lines.append(f"decoder view (kv-cache): {d.num_layers} attention sites in {d.layer_prefix}, heads "
                         f"{s0.heads}/{s0.kv_heads} x {s0.head_dim}, positions "
                         f"{', '.join('%' + p.name for p in d.positions)}, LM head reads %{d.hidden.name}")
        if self.final_norm:
            lines.append(f"final norm: {self.final_norm.kind} ({self.final_norm.weight})")
        if self.lm_head:
            lines.append(f"LM head: {self.lm_head.weight} ({self.lm_head.in_features} -> {self.lm_head.out_features})")
        if self.unrecognized:
            lines.append("not recognized:")
            lines += [f"  - {u}" for u in self.unrecognized]
        return lines

    def applicable_rewrites(self) -> list[tuple[str, bool, str]]:
        """(rewrite, applies, one-line reason) for each rewrite elision knows."""
        out: list[tuple[str, bool, str]] = []
        causal = bool(self.layers) and all(ly.attention.causal for ly in self.layers)
        if self.lm_head is not None and causal and self.decoder is not None:
            out.append(("speculative-decoding", True, f"causal decoder with an LM head ({len(self.layers)} layers)"))
        else:
            why = ("no LM head" if self.lm_head is None else "attention is not causal" if not causal
                   else f"no KV-cache view: {self.decoder_problem}")
            out.append(("speculative-decoding", False, why))
        bidir = [ly for ly in self.layers if ly.attention.causal is False]
        vision = [ly for st in self.stacks.values() for ly in st if ly.attention.causal is False]
        if self.kind in ("encoder", "vision", "vision-language") and (bidir or vision):
            what = {"encoder": "bidirectional encoder", "vision": "ViT tokens",
                    "vision-language": "image tokens in a vision-language model"}[self.kind]
            out.append(("token-pruning", True, f"{what}: tokens can be dropped between layers"))
        else:
            out.append(("token-pruning", False, "needs an encoder, ViT or VLM token sequence"
                        + ("" if self.kind == "unknown" else f" (this is a {self.kind})")))
        n = sum(len(s) for s in self.stacks.values())
        if n >= 2:
            out.append(("layer-skipping", True, f"{n} residual layers whose branches can be skipped"))
        else:
            out.append(("layer-skipping", False, "needs a stack of at least 2 recognized residual layers"))
        cross = [ly for st in self.stacks.values() for ly in st
                 if ly.attention.q_proj is not None and ly.attention.k_proj is not None
                 and ly.attention.q_proj.input != ly.attention.k_proj.input]
        if cross:
            out.append(("sparse-volume", True, f"{len(cross)} query/latent cross-attention layer(s)"))
        else:
            out.append(("sparse-volume", False, "no query/latent cross-attention found"))
        return out

    def as_dict(self) -> dict:
        def lin(x: Linear | None):
            return None if x is None else {"weight": x.weight, "bias": x.bias, "in": x.in_features,
                                           "out": x.out_features, "node": x.node.result.name, "loc": x.loc}

        def norm(n: Norm | None):
            return None if n is None else {"kind": n.kind, "weight": n.weight, "weight_offset": n.weight_offset,
                                           "bias": n.bias, "eps": n.eps, "input": n.input.name,
                                           "output": n.output.name}

        def layer(ly: Layer):
            a = ly.attention
            return {
                "index": ly.index, "loc": ly.loc, "input": ly.input.name, "output": ly.output.name,
                "post_norm": ly.post_norm, "parallel": ly.parallel,
                "attention": {"kind": a.kind, "num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads,
                              "head_dim": a.head_dim, "causal": a.causal, "mask_kind": a.mask_kind,
                              "mask_from_input": a.mask_depends_on_input, "rotary": a.rotary,
                              "packed_qkv": a.packed_qkv, "q_proj": lin(a.q_proj), "k_proj": lin(a.k_proj),
                              "v_proj": lin(a.v_proj), "o_proj": lin(a.o_proj), "scale": a.scale},
                "mlp": None if ly.mlp is None else {"gated": ly.mlp.gated, "activation": ly.mlp.activation,
                                                     "linears": [lin(x) for x in ly.mlp.linears]},
                "norms": [norm(n) for n in ly.norms],
                "residual_adds": [n.result.name for n in ly.residual_adds],
            }

        return {
            "kind": self.kind,
            "embedding": None if self.embedding is None else {
                "param": self.embedding.param, "input": self.embedding.input.name,
                "num_embeddings": self.embedding.num_embeddings, "dim": self.embedding.dim},
            "position_embedding": None if self.position_embedding is None else self.position_embedding.param,
            "patch_embed": None if self.patch_embed is None else {
                "weight": self.patch_embed.weight, "patch_size": list(self.patch_embed.patch_size),
                "num_patches": self.patch_embed.num_patches, "dim": self.patch_embed.dim},
            "cls_token": None if self.cls_token is None else {"param": self.cls_token.param, "how": self.cls_token.how},
            "position_ids": None if self.position_ids is None else self.position_ids.name,
            "extra_embeddings": [e.param for e in self.extra_embeddings],
            "projector": [p.weight for p in self.projector],
            "attention_mask_nodes": len(self.attention_mask),
            "stacks": {k: [layer(ly) for ly in v] for k, v in self.stacks.items()},
            "num_layers": len(self.layers),
            "final_norm": norm(self.final_norm),
            "lm_head": lin(self.lm_head),
            "decoder": None if self.decoder is None else {
                "layer_prefix": self.decoder.layer_prefix, "num_layers": self.decoder.num_layers,
                "heads": self.decoder.sites[0].heads, "kv_heads": self.decoder.sites[0].kv_heads,
                "head_dim": self.decoder.sites[0].head_dim, "positions": [p.name for p in self.decoder.positions],
                "hidden": self.decoder.hidden.name},
            "decoder_problem": self.decoder_problem,
            "unrecognized": list(self.unrecognized),
            "applicable_rewrites": [{"rewrite": r, "applies": ok, "reason": why}
                                    for r, ok, why in self.applicable_rewrites()],
        }
