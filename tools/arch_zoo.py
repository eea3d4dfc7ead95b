"""Tiny random-weight Hugging Face models, one per model type, saved as model directories a user would have.

Each `Arch` names a transformers model class and its config class with tiny sizes (hidden 64, 1 layer (2 where layers alternate), a
257-token byte-level vocabulary for text models, 32x32 images for vision towers). `save_model_dir` builds the model
from the config alone (no download, random weights, seeded), saves it with `save_pretrained` (safetensors) and, for
text models, a byte-level tokenizer, so the elision CLI loads it exactly like a user's HF directory.

Used by `tools/arch_matrix.py` (the architecture coverage matrix) and `tests/apps/test_arch_matrix.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

EOS = "<eos>"
HIDDEN, INTER, HEADS, KV_HEADS, POSITIONS = 64, 128, 4, 2, 128
LAYERS = 1  # 2 where layers differ by design (alternating sliding/global attention)
# the logits' spread: random tiny LMs have near-flat logits, where greedy argmax ties would make "token-identical"
# depend on float summation order; a wider LM head makes the greedy choice well separated (same for every route)
LM_HEAD_SCALE = 8.0


@dataclass(frozen=True)
class Arch:
    model_type: str  # the HF model_type (config.json), the matrix's row name
    model_cls: str  # transformers class, e.g. "LlamaForCausalLM"
    config_cls: str
    config: dict = field(default_factory=dict)
    kind: str = "causal-lm"  # causal-lm | text-encoder | vision
    note: str = ""  # what this row exercises, for the README

    @property
    def is_causal_lm(self) -> bool:
        return self.kind == "causal-lm"


def _decoder(layers: int = LAYERS, **extra) -> dict:
    """Llama-family sizes: 4 query / 2 KV heads of size 16 (ORT GroupQueryAttention's smallest head size)."""
    return dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, max_position_embeddings=POSITIONS, **extra)


def _encoder(**extra) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                **extra)


def _vision(**extra) -> dict:
    return _encoder(image_size=32, patch_size=8, **extra)


ARCHS: tuple[Arch, ...] = (
    # ------------------------------------------------------------------ causal LMs
    Arch("llama", "LlamaForCausalLM", "LlamaConfig", _decoder(), note="RMSNorm, RoPE, GQA, gated SiLU MLP"),
    Arch("mistral", "MistralForCausalLM", "MistralConfig", _decoder(sliding_window=12), note="sliding window 12"),
    Arch("qwen2", "Qwen2ForCausalLM", "Qwen2Config", _decoder(), note="q/k/v biases"),
    Arch("qwen3", "Qwen3ForCausalLM", "Qwen3Config", _decoder(head_dim=16), note="q/k RMSNorm"),
    Arch("gemma", "GemmaForCausalLM", "GemmaConfig", _decoder(head_dim=16), note="(1+w) RMSNorm, GeLU, scaled embedding"),
    Arch("gemma2", "Gemma2ForCausalLM", "Gemma2Config", _decoder(layers=2, head_dim=16, sliding_window=12),
         note="logit soft-capping, sandwich norms, alternating sliding window"),
    Arch("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextConfig", _decoder(layers=2, head_dim=16, sliding_window=12,
                  layer_types=["sliding_attention", "full_attention"]),
         note="q/k norms, local/global RoPE"),
    Arch("phi", "PhiForCausalLM", "PhiConfig", _decoder(), note="parallel attention+MLP, partial RoPE, LayerNorm"),
    Arch("phi3", "Phi3ForCausalLM", "Phi3Config", _decoder(pad_token_id=0), note="packed qkv and gate_up projections"),
    Arch("gpt2", "GPT2LMHeadModel", "GPT2Config", dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS),
         note="learned positions, Conv1D projections"),
    Arch("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig",
         dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              max_position_embeddings=POSITIONS), note="packed interleaved qkv, parallel residual, partial RoPE"),
    Arch("gptj", "GPTJForCausalLM", "GPTJConfig",
         dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS, rotary_dim=8),
         note="interleaved (GPT-J style) rotary, parallel attention+MLP"),
    Arch("falcon", "FalconForCausalLM", "FalconConfig",
         dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, new_decoder_architecture=True,
              num_kv_heads=KV_HEADS, max_position_embeddings=POSITIONS), note="new decoder architecture, GQA"),
    Arch("stablelm", "StableLmForCausalLM", "StableLmConfig", _decoder(), note="LayerNorm, partial RoPE"),
    Arch("olmo", "OlmoForCausalLM", "OlmoConfig", _decoder(), note="non-parametric LayerNorm"),
    Arch("olmo2", "Olmo2ForCausalLM", "Olmo2Config", _decoder(), note="post-norms, q/k RMSNorm"),
    Arch("granite", "GraniteForCausalLM", "GraniteConfig", _decoder(embedding_multiplier=2.0, residual_multiplier=0.5,
                                                                    logits_scaling=0.5),
         note="embedding/residual/attention/logit multipliers"),
    Arch("starcoder2", "Starcoder2ForCausalLM", "Starcoder2Config", _decoder(), note="LayerNorm, biases, GeLU MLP"),
    Arch("cohere", "CohereForCausalLM", "CohereConfig", _decoder(), note="parallel block, interleaved RoPE, logit scale"),
    Arch("opt", "OPTForCausalLM", "OPTConfig",
         dict(hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN), note="learned positions with offset 2"),
    Arch("bloom", "BloomForCausalLM", "BloomConfig", dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
         note="ALiBi position bias"),
    Arch("gpt_bigcode", "GPTBigCodeForCausalLM", "GPTBigCodeConfig",
         dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS), note="multi-query attention"),
    Arch("helium", "HeliumForCausalLM", "HeliumConfig", _decoder(head_dim=16)),
    Arch("smollm3", "SmolLM3ForCausalLM", "SmolLM3Config", _decoder(), note="no RoPE in every 4th layer"),
    Arch("mixtral", "MixtralForCausalLM", "MixtralConfig", _decoder(num_local_experts=4, num_experts_per_tok=2),
         note="mixture of experts (top-2 of 4)"),
    # ------------------------------------------------------------------ text encoders
    Arch("bert", "BertModel", "BertConfig", _encoder(max_position_embeddings=POSITIONS), "text-encoder"),
    Arch("roberta", "RobertaModel", "RobertaConfig", _encoder(max_position_embeddings=POSITIONS + 2), "text-encoder",
         note="positions offset by the padding id"),
    Arch("distilbert", "DistilBertModel", "DistilBertConfig",
         dict(dim=HIDDEN, hidden_dim=INTER, n_layers=LAYERS, n_heads=HEADS, max_position_embeddings=POSITIONS),
         "text-encoder"),
    Arch("electra", "ElectraModel", "ElectraConfig", _encoder(embedding_size=32, max_position_embeddings=POSITIONS),
         "text-encoder", note="embedding projection"),
    Arch("albert", "AlbertModel", "AlbertConfig", _encoder(embedding_size=32, max_position_embeddings=POSITIONS),
         "text-encoder", note="shared layer weights"),
    Arch("clip_text_model", "CLIPTextModel", "CLIPTextConfig", _encoder(max_position_embeddings=POSITIONS),
         "text-encoder", note="causal text tower, argmax pooling"),
    Arch("siglip_text_model", "SiglipTextModel", "SiglipTextConfig", _encoder(max_position_embeddings=POSITIONS),
         "text-encoder"),
    # ------------------------------------------------------------------ vision
    Arch("vit", "ViTModel", "ViTConfig", _vision(), "vision"),
    Arch("clip_vision_model", "CLIPVisionModel", "CLIPVisionConfig", _vision(), "vision", note="pre-LayerNorm, quick GeLU"),
    Arch("siglip_vision_model", "SiglipVisionModel", "SiglipVisionConfig", _vision(), "vision",
         note="attention-pooling head"),
    Arch("dinov2", "Dinov2Model", "Dinov2Config", _vision(), "vision", note="layer scale, interpolated positions"),
)

BY_TYPE = {a.model_type: a for a in ARCHS}


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: the 256 byte symbols plus <eos> (id 256). No training, no files."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def build_model(arch: Arch, vocab_size: int | None = None, seed: int = 0) -> torch.nn.Module:
    """The tiny model with seeded random weights (norm weights perturbed so that `1 + w` norms are exercised)."""
    import transformers

    cfg_cls = getattr(transformers, arch.config_cls)
    kwargs = dict(arch.config)
    if arch.kind != "vision":
        kwargs["vocab_size"] = vocab_size
    if arch.is_causal_lm:
        kwargs.update(bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    config = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, arch.model_cls)(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # some start at 0 (Gemma's 1 + w) or 1: make them matter
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        head = model.get_output_embeddings() if arch.is_causal_lm else None
        if head is not None:
            head.weight.mul_(LM_HEAD_SCALE)
    return model


def save_model_dir(arch: Arch, path: Path, seed: int = 0) -> Path:
    """Build `arch` tiny and save it (weights, config, tokenizer for text models) into `path`, like a user's HF dir."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_tokenizer() if arch.kind != "vision" else None
    model = build_model(arch, vocab_size=len(tokenizer) if tokenizer is not None else None, seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
