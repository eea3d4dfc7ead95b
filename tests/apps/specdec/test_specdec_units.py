"""Building blocks: token trees, templates, KV compaction, cost-aware sizing, calibration, bad input, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from elision.apps.specdec import CacheOverflowError, SpeculativeGenerator, TokenTree, generate  # noqa: E402
from elision.apps.specdec.backends import HFCausalLMBackend  # noqa: E402
from elision.apps.specdec.session import KVSession  # noqa: E402
from elision.runtime.generation.tree_builders import StaticTemplate, VerifyCostCurve, choose_tree_size  # noqa: E402

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from specdec_helpers import save_tiny_lm_dir

    return save_tiny_lm_dir(tmp_path_factory.mktemp("tiny_lm"))


def test_tree_structure_and_mask():
    tree = TokenTree.root(7)
    a = tree.add(0, 1, 0.5)
    b = tree.add(0, 2, 0.3)
    c = tree.add(a, 3, 0.2)
    assert tree.add(0, 1, 0.1) == a  # siblings are distinct tokens
    assert tree.depths == [0, 1, 1, 2]
    assert tree.path_tokens(c) == [1, 3] and tree.path_nodes(c) == [0, a, c]
    mask = tree.ancestor_mask()
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False],
                             [True, False, True, False], [True, True, False, True]]
    assert len(tree.truncate(2)) == 2 and tree.truncate(2).tokens == [7, 1]
    del b


def test_static_templates_parse_and_reject_bad_specs():
    assert StaticTemplate.parse("chain-3").paths == ((0,), (0, 0), (0, 0, 0))
    assert len(StaticTemplate.parse("2x2")) == 1 + 2 + 4
    assert StaticTemplate.parse("[(0,), (1,), (0, 0)]").paths == ((0,), (1,), (0, 0))
    for bad in ["chain-0", "2xq", "[(0, 0)]", "banana"]:
        with pytest.raises(ValueError, match="bad static tree template"):
            StaticTemplate.parse(bad)


def test_tree_kv_compaction_matches_sequential_decoding(llama):
    """Verify a branching tree, keep one non-prefix path, continue: logits equal a plain forward of the sequence."""
    prompt = [5, 9, 11, 3, 8]
    session = KVSession(HFCausalLMBackend(llama), 1, 64)
    session.prefill([prompt])
    tree = TokenTree.root(20)
    x = tree.add(0, 30, 0.9)
    tree.add(0, 31, 0.5)
    y = tree.add(x, 32, 0.5)
    tree.add(x, 33, 0.4)
    z = tree.add(y, 34, 0.3)
    logits = session.extend([tree])
    full = llama(torch.tensor([prompt + [20, 30, 32, 34]])).logits[0]
    torch.testing.assert_close(logits[0, [0, x, y, z]].double(), full[len(prompt):].double(), atol=1e-9, rtol=0)
    session.commit([[0, x, y]])  # accepted 30, 32: keep root + x + y (slots 0, 1, 3 of the tree)
    nxt = session.extend([TokenTree.root(40)])
    full = llama(torch.tensor([prompt + [20, 30, 32, 40]])).logits[0, -1]
    torch.testing.assert_close(nxt[0, 0].double(), full.double(), atol=1e-9, rtol=0)


def test_batched_sessions_with_holes_and_repack(llama):
    """Sequences accepting different path lengths leave holes; results stay exact through a repack."""
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    session = KVSession(HFCausalLMBackend(llama), 2, 64)
    session.prefill(prompts)
    trees = [TokenTree.chain(10, [11, 12]), TokenTree.chain(13, [14])]
    session.extend(trees)
    session.commit([[0, 1, 2], [0]])
    assert session.seq_lens == [6, 7] and session.table.holes() > 0
    session.repack()
    assert session.table.holes() == 1  # only the length difference remains
    logits = session.extend([TokenTree.root(20), TokenTree.root(21)])
    ref0 = llama(torch.tensor([[1, 2, 3, 10, 11, 12, 20]])).logits[0, -1]
    ref1 = llama(torch.tensor([[4, 5, 6, 7, 8, 9, 13, 21]])).logits[0, -1]
    torch.testing.assert_close(logits[0, 0].double(), ref0, atol=1e-9, rtol=0)
    torch.testing.assert_close(logits[1, 0].double(), ref1, atol=1e-9, rtol=0)


def test_cost_curve_measured_and_size_choice():
    curve = VerifyCostCurve([1, 2, 4, 8], [1.0, 1.05, 1.7, 2.3])
    assert curve.cost(3) == 1.7 and curve.cost(1) == 1.0
    chain = TokenTree.chain(0, [1, 2, 3, 4, 5, 6, 7], score=1.0)
    chain.scores = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    # expected tokens / cost: n=2 -> 1.9/1.05, n=4 -> 3.4/1.7, n=8 -> 5.2/2.3 (best)
    assert choose_tree_size([chain], curve, 8) == 8
    weak = TokenTree.chain(0, [1, 2, 3], score=0.05)
    weak.scores = [1.0, 0.05, 0.01, 0.001]
    assert choose_tree_size([weak], curve, 8) == 2  # the best draft token is always tried (exploration)
    assert choose_tree_size([weak], curve, 8, min_size=1) == 1


def test_measured_curve_on_model(llama):
    session = KVSession(HFCausalLMBackend(llama), 1, 128)
    session.prefill([[1, 2, 3, 4]])
    curve = VerifyCostCurve.measure(session, 8, reps=1)
    assert curve.sizes == [1, 2, 3, 4, 5, 6, 8] and all(t > 0 for t in curve.seconds)
    assert session.seq_lens == [4] and session.table.length == 4  # measuring left the cache as it was


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(input_ids=[[]]), ValueError, "prompt 0 is empty"),
        (dict(input_ids=[list(range(64))]), ValueError, "too long"),
        (dict(input_ids=[[1, 2, 3]], max_new_tokens=62), CacheOverflowError, "cache overflow.*at most 61"),
        (dict(input_ids=[[1, 2, 3]], drafter="telepathy"), ValueError, "unknown drafter 'telepathy'"),
        (dict(input_ids=[[1, 2, 3]], tree="bushy"), ValueError, "unknown tree 'bushy'"),
        (dict(input_ids=[[1, 2, 3]], drafter="draft-model"), ValueError, "needs draft_model="),
        (dict(input_ids=[[1, 2, 3]], stop_strings=["\n"]), ValueError, "stop_strings need a tokenizer"),
        (dict(input_ids=[[1, 2, 999]]), ValueError, "outside the vocabulary"),
        (dict(input_ids=[[1, 2]], do_sample=True, temperature=0.0), ValueError, "temperature must be > 0"),
    ],
)
def test_bad_input_errors(llama, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(llama, **kwargs)


def test_cache_capacity_error(llama):
    gen = SpeculativeGenerator(llama, drafter="lookup", max_cache_len=20)
    with pytest.raises(CacheOverflowError, match="max_cache_len is 20"):
        gen.generate([[1, 2, 3]], max_new_tokens=30)


def test_streamer_receives_prompt_then_tokens(llama):
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    result = generate(llama, [[3, 4, 5, 3, 4]], max_new_tokens=12, drafter="lookup", streamer=streamer)
    assert streamer.chunks[0] == [3, 4, 5, 3, 4] and streamer.ended
    assert sum(streamer.chunks[1:], []) == result.tokens[0]


def test_layer_skip_calibration_picks_a_measured_set(llama):
    from elision.apps.specdec.calibrate import calibrate_layer_skip

    cal = calibrate_layer_skip(llama, [[1, 2, 3, 1, 2]], max_new_tokens=8)
    assert cal.table and cal.baseline_tokens_per_s > 0
    assert cal.best in [frozenset(r["skip"]) for r in cal.table]
    assert 0 not in cal.best and 2 not in cal.best  # first and last layer are kept


def test_stop_strings_with_tokenizer(lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True).eval()
    ids = tok("def dumps(obj):\n    return", return_tensors="pt").input_ids
    full = generate(model, ids, max_new_tokens=20, tokenizer=tok)
    text = full.text[0]
    assert len(text) > 4
    stop = text[2:4]
    cut = generate(model, ids, max_new_tokens=20, tokenizer=tok, stop_strings=[stop])
    assert stop in cut.text[0] and len(cut.tokens[0]) <= len(full.tokens[0])
    assert cut.tokens[0] == full.tokens[0][: len(cut.tokens[0])]
    assert stop not in tok.decode(cut.tokens[0][:-1])  # generation stopped at the first token completing it


def test_visualize_png_and_html(llama, tmp_path):
    from elision.apps.specdec.visualize import pick_step, render_tree

    result = generate(llama, [[3, 4, 5, 3, 4, 5, 3]], max_new_tokens=10, drafter="recycling+lookup", record_trees=True)
    step = pick_step(result)
    png = render_tree(step, tmp_path / "tree.png")
    html = render_tree(step, tmp_path / "tree.html")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in html.read_text() and "bonus" in html.read_text()
    with pytest.raises(ValueError, match=".png or .html"):
        render_tree(step, tmp_path / "tree.txt")


def _cli():
    import typer

    from elision.cli.generate import register

    app = typer.Typer()
    register(app)

    @app.command("version")
    def _version() -> None:  # a second command keeps typer in multi-command mode, as in the real CLI
        pass

    return app


def test_cli_json_matches_hf_greedy(lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    prompt = "def loads(s):\n    return"
    out = CliRunner().invoke(_cli(), ["generate", str(lm_dir), "--prompt", prompt, "--max-new-tokens", "16", "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(payload) == {"tokens", "text", "stats"}
    assert {"tokens_per_s", "forward_passes", "mean_accepted_length"} <= set(payload["stats"])
    tok = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert payload["tokens"] == ref
    assert payload["text"] == tok.decode(ref, skip_special_tokens=True)


def test_cli_streams_and_visualizes(lm_dir, tmp_path):
    from typer.testing import CliRunner

    pic = tmp_path / "t.html"
    out = CliRunner().invoke(_cli(), ["generate", str(lm_dir), "--prompt", "import os\nimport", "-n", "12",
                                      "--drafter", "lookup", "--visualize", str(pic)])
    assert out.exit_code == 0, out.output
    assert "tok/s" in out.output and pic.is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["/nonexistent/model", "--prompt", "x"], "does not exist"),
        (["{dir}", "--prompt", ""], "prompt is empty"),
        (["{dir}", "--prompt", "x", "--drafter", "bogus"], "unknown drafter 'bogus'"),
        (["{dir}", "--prompt", "x", "--tree", "static:zz"], "bad static tree template"),
        (["{dir}", "--prompt", "x", "-n", "500"], "cache overflow"),
        (["{dir}", "--prompt", "x", "--visualize", "tree.jpg"], ".png or .html"),
    ],
)
def test_cli_bad_input_is_one_clear_line(lm_dir, args, message):
    from typer.testing import CliRunner

    args = [a.replace("{dir}", str(lm_dir)) for a in args]
    out = CliRunner().invoke(_cli(), ["generate", *args])
    assert out.exit_code == 2, out.output
    assert message in " ".join(out.output.split())
    assert "Traceback" not in out.output


def test_generator_drives_a_bare_backend_object(llama):
    """The decoding loop only needs the tensor-level backend protocol (what a compiled backend implements)."""
    from test_specdec_greedy import hf_greedy

    backend = HFCausalLMBackend(llama)
    gen = SpeculativeGenerator(backend, drafter="recycling+layer-skip", tree="static:3x2x1", skip_layers=[1])
    prompt = [7, 8, 9, 7, 8, 9, 7]
    result = gen.generate([prompt], max_new_tokens=12)
    assert result.tokens[0] == hf_greedy(llama, prompt, 12, None)
