"""The attention window of speculative decoding, read from real Hugging Face configs: one window for every layer,
or a one-line refusal where the config mixes sliding-window and full-attention layers (Gemma 2/3), which would
otherwise decode differently from the model (the architecture matrix found Gemma 3 off HF greedy at token 5)."""
import pytest
import torch
import transformers as T

from elision.apps.specdec.attention_window import attention_window
from elision.apps.specdec.backends import HFCausalLMBackend
from elision.apps.specdec.compiled_backend import model_config


def test_uniform_windows():
    assert attention_window(T.MistralConfig(sliding_window=12, num_hidden_layers=2)) == 12
    assert attention_window(T.MistralConfig(sliding_window=None, num_hidden_layers=2)) is None
    assert attention_window(T.LlamaConfig(num_hidden_layers=2)) is None
    # Qwen2 declares a window but does not use it (use_sliding_window=False, every layer full)
    assert attention_window(T.Qwen2Config(num_hidden_layers=2, sliding_window=12)) is None
    assert attention_window(T.Gemma3TextConfig(num_hidden_layers=2, sliding_window=12,
                                               layer_types=["sliding_attention"] * 2)) == 12
    assert attention_window(T.Gemma3TextConfig(num_hidden_layers=2, sliding_window=12,
                                               layer_types=["full_attention"] * 2)) is None


@pytest.mark.parametrize("cfg", [T.Gemma2Config(num_hidden_layers=2, sliding_window=12),
                                 T.Gemma3TextConfig(num_hidden_layers=2, sliding_window=12,
                                                    layer_types=["sliding_attention", "full_attention"])],
                         ids=["gemma2", "gemma3"])
def test_mixed_layers_are_refused_in_one_line(cfg):
    with pytest.raises(ValueError, match=r"mixes sliding-window \(12\) and full-attention layers") as e:
        attention_window(cfg)
    assert "\n" not in str(e.value)


def test_both_backends_refuse_a_mixed_model():
    torch.manual_seed(0)
    cfg = T.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16, vocab_size=64, sliding_window=4,
                             layer_types=["sliding_attention", "full_attention"])
    model = T.Gemma3ForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="gemma3_text mixes"):
        HFCausalLMBackend(model)
    with pytest.raises(ValueError, match="gemma3_text mixes"):
        model_config(model)
