"""`elision.generate` behaves like Hugging Face `model.generate`: same defaults (generation_config: EOS, pad, length),
same output layout (full rows as a LongTensor), HF's drafter spellings, HF streamers. Every case compares with real
`model.generate` on tiny real HF models built from configs (float64, so the oracle compares algorithms, not float32
rounding; see test_specdec_greedy)."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers.generation.streamers import BaseStreamer

import elision
from specdec_helpers import save_tiny_lm_dir

VOCAB = 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed: int = 0, layers: int = 3, eos: int | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=128, eos_token_id=eos, bos_token_id=None,
                                      pad_token_id=None)
    return transformers.LlamaForCausalLM(config).to(torch.float64).eval()


PROMPT = torch.tensor([[5, 9, 3, 5, 9, 3, 5, 9, 7, 1, 2]])


def test_defaults_come_from_generation_config_like_hf():
    model = tiny_llama()
    want = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT))  # HF's default: 20 new tokens
    got = elision.generate(model, PROMPT)
    assert got.dtype == torch.long and got.shape == want.shape == (1, PROMPT.shape[1] + 20)
    assert torch.equal(got, want)


def test_eos_from_generation_config_stops_where_hf_stops():
    model = tiny_llama()
    free = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=24)[0, PROMPT.shape[1]:]
    eos = int(free[6])  # a token greedy decoding reaches after a few steps
    model.generation_config.eos_token_id = eos
    model.generation_config.max_new_tokens = 24
    want = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT))
    got = elision.generate(model, PROMPT)
    assert torch.equal(got, want)
    stop = free.tolist().index(eos)
    assert got.shape[1] == PROMPT.shape[1] + stop + 1 and int(got[0, -1]) == eos  # stopped at EOS, EOS kept


def test_left_padded_batch_is_filled_with_pad_like_hf():
    model = tiny_llama(seed=1)
    pad = VOCAB - 1
    rows = [[4, 8, 15, 16, 23, 42 % VOCAB, 4, 8], [7, 7, 2, 9]]
    ids = torch.full((2, 8), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, 8 - len(r):] = torch.tensor(r)
        mask[b, 8 - len(r):] = 1
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=pad)
    eos = int(free[1, 8 + 3])  # row 1 stops early, row 0 (most likely) runs on: the pad fill is exercised
    kwargs = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=pad, eos_token_id=eos)
    want = model.generate(ids, **kwargs)
    got = elision.generate(model, ids, **kwargs)
    assert torch.equal(got, want)
    assert got.shape[1] > 8 + 4 and (got[1, 8 + 4:] == pad).all()


def test_prompt_lookup_num_tokens_is_the_lookup_drafter():
    model = tiny_llama(seed=2)
    want = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=30,
                          prompt_lookup_num_tokens=4)
    out = elision.generate(model, PROMPT, max_new_tokens=30, prompt_lookup_num_tokens=4,
                           return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    assert out.stats["drafter"] == "lookup" and out.stats["new_tokens"] == 30
    assert out.stats["forward_passes"] <= 30


def test_assistant_model_is_the_draft_model_drafter():
    model, assistant = tiny_llama(seed=3), tiny_llama(seed=4, layers=1)
    want = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=16,
                          assistant_model=assistant)
    out = elision.generate(model, PROMPT, max_new_tokens=16, assistant_model=assistant, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    assert torch.equal(want, model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=16))
    assert out.stats["drafter"] == "draft-model"


class _Recorder(BaseStreamer):
    """A Hugging Face streamer that keeps what it was given."""

    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value.flatten().tolist())

    def end(self):
        self.ended += 1


def test_streamers_get_the_prompt_then_the_new_tokens_like_hf():
    model = tiny_llama(seed=5)
    theirs, ours = _Recorder(), _Recorder()
    want = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=10, streamer=theirs)
    got = elision.generate(model, PROMPT, max_new_tokens=10, streamer=ours)
    assert torch.equal(got, want)
    assert ours.puts[0] == theirs.puts[0] == PROMPT[0].tolist()
    flat = lambda puts: [t for p in puts[1:] for t in p]  # noqa: E731 - HF puts one token a step, elision a path
    assert flat(ours.puts) == flat(theirs.puts) == want[0, PROMPT.shape[1]:].tolist()
    assert ours.ended == theirs.ended == 1


def test_text_streamer_prints_what_hf_prints(tmp_path, capsys):
    path = save_tiny_lm_dir(tmp_path / "lm", sharpen=4.0)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).to(torch.float64).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("def dumps(obj, *, skipkeys=False", return_tensors="pt").input_ids
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                          streamer=transformers.TextStreamer(tok, skip_prompt=True))
    theirs = capsys.readouterr().out
    got = elision.generate(model, ids, max_new_tokens=20, streamer=transformers.TextStreamer(tok, skip_prompt=True))
    assert torch.equal(got, want)
    assert capsys.readouterr().out == theirs and theirs.strip()


@pytest.mark.parametrize("kwargs,message", [
    ({"num_beams": 2}, "does not implement num_beams"),
    ({"repetition_penalty": 1.3}, "does not implement repetition_penalty"),
    ({"output_scores": True}, "does not implement output_scores"),
    ({"frobnicate": 1}, "does not take frobnicate"),
    ({"prompt_lookup_num_tokens": 4, "drafter": "copy"}, "not both"),
])
def test_what_it_cannot_honour_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        elision.generate(tiny_llama(), PROMPT, max_new_tokens=4, **kwargs)
