"""The request checks and the stop-string handling of `elision serve`, without Ray."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("pydantic", reason="the serve extra is not installed: pip install 'elision[serve]'")

from elision.apps.serve.protocol import (ModelCard, RequestError, check_limits, finish_reason,  # noqa: E402
                                         parse_completion_request)
from elision.apps.serve.stop_text import StopTextFilter, cut_at_stop  # noqa: E402

CARD = ModelCard(name="m", max_positions=64, vocab_size=100, eos_token_ids=(0,), tokenizer_json="{}")


def parse(obj) -> object:
    return parse_completion_request(json.dumps(obj).encode())


def test_defaults_follow_openai():
    req = parse({"prompt": "hi"})
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.seed, req.stream) == (16, 1.0, 1.0, None, None, False)
    assert not req.greedy and req.generation_options() == {"stop_strings": None, "do_sample": True,
                                                           "temperature": 1.0, "top_p": 1.0, "seed": None}
    greedy = parse({"prompt": "hi", "temperature": 0, "stop": "\n", "top_p": 0.5})
    assert greedy.greedy and greedy.generation_options() == {"stop_strings": ["\n"]}  # top_p means nothing greedy


@pytest.mark.parametrize("body, says", [
    (b"", "not valid JSON"),
    (b"\x80abc", "not valid UTF-8 (byte 0)"),
    (b"\"prompt\"", "must be a JSON object, got str"),
    (b"{\"prompt\": \"a\", \"echo\": true}", "unknown field 'echo'"),
    (b"{\"prompt\": 3}", "prompt: Input should be a valid string"),
    (b"{\"prompt\": \"a\", \"max_tokens\": true}", "max_tokens: Input should be a valid integer"),
    (b"{\"prompt\": \"a\", \"stream\": \"yes\"}", "stream: Input should be a valid boolean"),
    (b"{\"prompt\": \"a\", \"top_p\": 0}", "top_p: Input should be greater than 0"),
    (b"{\"prompt\": \"a\", \"seed\": -1}", "seed: Input should be greater than or equal to 0"),
    (b"{\"prompt\": \"a\", \"stop\": [\"1\", \"2\", \"3\", \"4\", \"5\"]}", "at most 4 stop strings"),
    (b"{\"prompt\": \"a\", \"stop\": \"\"}", "stop strings must be non-empty"),
    (b"{\"prompt\": \"\"}", "prompt is empty"),
    (b"{\"prompt\": \"\\udc00x\"}", "lone surrogate"),
])
def test_bad_bodies_are_400_with_the_reason(body, says):
    with pytest.raises(RequestError) as e:
        parse_completion_request(body)
    assert e.value.status == 400 and says in str(e.value)
    assert e.value.body()["error"]["message"] == str(e.value)


def test_oversized_bodies_are_413():
    with pytest.raises(RequestError) as e:
        parse_completion_request(b"{\"prompt\": \"" + b"x" * (2 << 20) + b"\"}")
    assert e.value.status == 413


@pytest.mark.parametrize("fields, prompt_tokens, says", [
    ({"max_tokens": 0}, 3, "max_tokens must be >= 1"),
    ({"max_tokens": 64}, 3, "over the model's limit"),
    ({"max_tokens": 1}, 64, "over the model's position limit of 64"),
    ({"max_tokens": 10}, 60, "lower max_tokens to at most 4"),
    ({"model": "other"}, 3, "not served here"),
])
def test_limits(fields, prompt_tokens, says):
    with pytest.raises(RequestError) as e:
        check_limits(parse({"prompt": "p", **fields}), prompt_tokens, CARD)
    assert says in str(e.value)


def test_requests_within_limits_pass():
    check_limits(parse({"prompt": "p", "max_tokens": 4, "model": "m"}), 60, CARD)
    check_limits(parse({"prompt": "p", "max_tokens": 63}), 1, CARD)


def test_finish_reason():
    assert finish_reason([5, 6], 2, (0,)) == "length"
    assert finish_reason([5, 0], 2, (0,)) == "stop"  # EOS as the last allowed token
    assert finish_reason([5], 2, (0,)) == "stop"


pieces = st.lists(st.text(alphabet="ab\n", max_size=3), max_size=8)
stops = st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3)


@settings(max_examples=300, deadline=None)
@given(pieces, stops)
def test_streamed_text_equals_the_cut_text(parts, stop_strings):
    """What a stream sends equals the non-streaming text, for any split of the generated text into pieces: the
    pieces arrive until the text holds a stop string (where the generation loop stops)."""
    text, sent = "", []
    for p in parts:
        text += p
        sent.append(p)
        if any(s in text for s in stop_strings):
            break
    f = StopTextFilter(stop_strings)
    streamed = "".join(f.push(p) for p in sent) + f.finish()
    want, found = cut_at_stop(text, stop_strings)
    assert streamed == want
    assert f.stopped == found
