"""The in-place ONNX Runtime generation step (`step.onnx`: GroupQueryAttention over KV buffers shared by past and
present) and the loop around it.

* The lowering fuses every attention (and packs QKV, with biases for Qwen2) and the compile-time differential check
  passes (a model whose attention cannot fuse falls back to the concatenating form and says why: the head-size-8
  model of test_ort_generate.py).
* The in-place cache equals the concatenating one: the step session and the `@verify` session, driven through the
  same ragged batch of trees with idle sequences and compactions, give the same logits and hold the same K/V.
* Greedy speculative decoding over the step session is token-identical to Hugging Face greedy `generate`, for every
  drafter, tree shape and batch size (hypothesis), batched requests included.
* The calibration (threads, cost curve) is measured at compile time, or once per machine: never per call.

The random models' LM heads are sharpened so float32 argmax ties are rare; an example whose Hugging Face greedy
trajectory still meets a near-tie (top-2 gap < 1e-4, where float32 summation order may legitimately flip the
argmax) is discarded, not counted (hypothesis `assume`).
"""
from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from elision.apps.specdec.artifact import export_generation_artifact
from elision.apps.specdec.step_check import compare_sessions
from elision.runtime.generation import step_signature as sig
from elision.runtime.generation.ort_generator import GenerationError, OrtGenerator
from specdec_helpers import save_tiny_lm_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DRAFTERS = ["none", "lookup", "recycling", "copy", "recycling+lookup"]
TREES = ["dynamic", "static:chain-4", "static:3x2x1", "static:[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]"]


@pytest.fixture(scope="module", autouse=True)
def user_cache(tmp_path_factory):
    """A private user cache, so calibrations measured here neither leak out nor come in from earlier runs."""
    old = os.environ.get("ELISION_CACHE_DIR")
    path = tmp_path_factory.mktemp("user-cache")
    os.environ["ELISION_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ELISION_CACHE_DIR", None)
    else:
        os.environ["ELISION_CACHE_DIR"] = old


def _model(tmp_path_factory, arch: str, forms: tuple[str, ...], hidden_size: int = 64):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp(arch)
    model_dir = save_tiny_lm_dir(root / "model", arch, layers=2, hidden_size=hidden_size, sharpen=4.0)
    reports = {form: export_generation_artifact(str(model_dir), root / form, form=form,
                                                calibrate=form == sig.STEP_FORM) for form in forms}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return SimpleNamespace(dir=model_dir, root=root, reports=reports, model=model,
                           tokenizer=AutoTokenizer.from_pretrained(model_dir),
                           gens={form: OrtGenerator.load(root / form, threads=1) for form in forms})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _model(tmp_path_factory, "llama", (sig.STEP_FORM, sig.VERIFY_FORM))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return _model(tmp_path_factory, "qwen2", (sig.STEP_FORM,))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return _model(tmp_path_factory, "mistral", (sig.STEP_FORM,))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _model(tmp_path_factory, "qwen3", (sig.STEP_FORM,))


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    """Head size 32 with rotary over its first 16 dims (GQA's CPU kernel rotates a multiple of 16)."""
    return _model(tmp_path_factory, "phi", (sig.STEP_FORM,), hidden_size=128)


def hf_greedy(model, ids: list[int], max_new: int, eos: list[int]) -> tuple[list[int], float]:
    """HF greedy continuation and the smallest top-2 logit gap along it (a near-tie makes float32 results fragile)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos or None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(ids):].tolist(), min(gaps)


def _ops(path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_lowering_fuses_every_attention_and_packs_qkv(arch, request):
    m = request.getfixturevalue(arch)
    report = m.reports[sig.STEP_FORM]
    assert report["form"] == sig.STEP_FORM and "step_lowering" not in report
    assert report["max_relative_error"] <= 1e-4
    fusions = report["generation"]["lowering"]
    assert fusions["group_query_attention"] == 2 and fusions["packed_qkv"] == 2
    ops = _ops(m.root / sig.STEP_FORM / "step.onnx")
    assert ops["GroupQueryAttention"] == 2 and "Concat" not in ops and "Softmax" not in ops
    # one GEMM per layer for q, k and v (plus o, gate, up, down) and the LM head
    assert ops["MatMul"] == 2 * 5 + 1
    spec = OrtGenerator.load(m.root / sig.STEP_FORM, threads=1).artifact.spec(sig.STEP_FUNCTION)
    assert spec.input_names[:3] == [sig.INPUT_IDS, sig.POSITION_IDS, sig.ATTENTION_BIAS]
    assert spec.output_names == [sig.LOGITS] + [sig.present_name(i // 2, ("key", "value")[i % 2]) for i in range(4)]


def test_qwen3_head_norms_feed_gqa_which_rotates_after_them(qwen3):
    """Qwen3 normalizes q and k per head before the rotary: the norms stay in the graph (onnxruntime's CPU kernel
    refuses GQA's own q/k norm inputs) and GQA reads their output flattened back to [batch, n, heads * head_dim]."""
    report = qwen3.reports[sig.STEP_FORM]
    assert report["form"] == sig.STEP_FORM and "step_lowering" not in report
    assert report["max_relative_error"] <= 1e-4
    assert report["generation"]["lowering"]["group_query_attention"] == 2
    model = onnx.load(str(qwen3.root / sig.STEP_FORM / "step.onnx"), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}

    def weights_between(value: str) -> set[str]:
        """The model weights read on the way from `value` back to its projection's MatMul (not through it)."""
        found, todo = set(), [value]
        while todo:
            node = producers.get(todo.pop())
            if node is None or node.op_type == "MatMul":
                continue
            found |= {i for i in node.input if i.startswith("fn.p_")}
            todo += [i for i in node.input if i in producers]
        return found

    gqas = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqas) == 2 and not any(n.op_type in ("Concat", "Softmax") for n in model.graph.node)
    for layer, gqa in enumerate(gqas):
        assert producers[gqa.input[0]].op_type == producers[gqa.input[1]].op_type == "Reshape"  # back to BSD
        assert weights_between(gqa.input[0]) == {f"fn.p_model_layers_{layer}_self_attn_q_norm_weight"}
        assert weights_between(gqa.input[1]) == {f"fn.p_model_layers_{layer}_self_attn_k_norm_weight"}
        assert len(gqa.input) < 15 or not any(gqa.input[14:16])  # not GQA's q_norm_weight / k_norm_weight


def test_inplace_cache_equals_concatenating_cache(llama):
    """Same trees, same commits: same logits, and the buffers hold the same K/V for every committed position."""
    step, concat = (llama.gens[f].new_session(3, 96) for f in (sig.STEP_FORM, sig.VERIFY_FORM))
    vocab = llama.gens[sig.STEP_FORM].vocab_size
    worst = compare_sessions(step, concat, vocab, steps=5, seed=3, prompt_lengths=(11, 3, 7), tree_size=8)
    assert worst <= 1e-5
    assert step.seq_lens == concat.seq_lens
    for b, n in enumerate(step.seq_lens):
        np.testing.assert_allclose(step.kv[:, b, :, :n], concat.kv[:, b, :, :n], rtol=0, atol=1e-5)


def test_step_inputs_keep_their_shapes_across_bias_buckets(llama):
    """Steps of one token, chains and trees, ragged rows crossing a bias bucket (BIAS_BUCKET columns each) and
    running into the position limit (128 here: GroupQueryAttention's rotary tables end there, so the padded width
    must too), a row sometimes idle in a plain step: the step session's fixed-shape inputs (bias wider than the
    cache, total_sequence_length its width) give the concatenating session's logits, and its buffers hold the same
    K/V."""
    from elision.apps.specdec.step_check import random_tree
    from elision.runtime.generation.ort_step_session import BIAS_BUCKET

    step, concat = (llama.gens[f].new_session(2, 128) for f in (sig.STEP_FORM, sig.VERIFY_FORM))
    vocab = llama.gens[sig.STEP_FORM].vocab_size
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (BIAS_BUCKET - 3, 5)]
    for s in (step, concat):
        s.prefill(prompts)
    worst = 0.0
    for i in range(24):
        kind = i % 3
        if kind == 0:  # at most one token each: the plain step's own path (`_run_plain`), a row sometimes idle
            calls = [("extend_chains", [[int(rng.integers(0, vocab))] if rng.random() < 0.75 else [] for _ in prompts])]
        elif kind == 1:
            calls = [("extend_chains", [rng.integers(0, vocab, int(rng.integers(1, 4))).tolist() for _ in prompts])]
        else:
            calls = [("extend", [random_tree(rng, int(rng.integers(0, vocab)), 5, vocab) for _ in prompts])]
        name, arg = calls[0]
        got, want = (np.array(getattr(s, name)(arg), dtype=np.float64) for s in (step, concat))
        counts = [len(a) for a in arg]
        for b, n in enumerate(counts):
            if n:  # an idle row has no logits to compare
                worst = max(worst, float(np.abs(got[b, :n] - want[b, :n]).max()) / max(1.0, float(np.abs(want[b, :n]).max())))
        keep = [[] if n == 0 else list(range(int(rng.integers(1, n + 1)))) if kind != 2
                else arg[b].path_nodes(int(rng.integers(0, n))) for b, n in enumerate(counts)]
        for s in (step, concat):
            s.commit(keep)
    assert worst <= 1e-5
    assert step.seq_lens == concat.seq_lens and BIAS_BUCKET + 16 < max(step.seq_lens) <= 122
    for b, n in enumerate(step.seq_lens):
        np.testing.assert_allclose(step.kv[:, b, :, :n], concat.kv[:, b, :, :n], rtol=0, atol=1e-5)
    widths = {f.bias.shape[3] for f in step._feeds.values()}
    assert widths and all(w % BIAS_BUCKET == 0 for w in widths)  # the fixed-shape path ran


prompt_strategy = st.lists(st.integers(3, 60), min_size=1, max_size=8).flatmap(
    lambda motif: st.tuples(st.just(motif), st.integers(1, 3), st.lists(st.integers(3, 250), max_size=6))
).map(lambda t: (t[0] * t[1] + t[2])[:40])


# no shrink phase: a failing example is reported as drawn instead of spending minutes minimising it
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data(), drafter=st.sampled_from(DRAFTERS), tree=st.sampled_from(TREES), batch=st.sampled_from([1, 2, 3]),
       max_new=st.integers(1, 24), use_eos=st.booleans())
def test_step_session_greedy_matches_hf(llama, data, drafter, tree, batch, max_new, use_eos):
    gen = llama.gens[sig.STEP_FORM]
    prompts = [data.draw(prompt_strategy, label=f"prompt{i}") for i in range(batch)]
    eos: list[int] = []
    if use_eos:  # an EOS the model actually emits: a token of the first prompt's greedy continuation
        cont, _ = hf_greedy(llama.model, prompts[0], max_new, [])
        eos = [cont[data.draw(st.integers(0, len(cont) - 1), label="eos_index")]]
    expected = [hf_greedy(llama.model, p, max_new, eos) for p in prompts]
    assume(min(gap for _, gap in expected) > 1e-4)
    results = gen.generate_batch(prompts, max_new, drafter=drafter, tree=tree, eos_token_id=eos)
    assert [r.tokens for r in results] == [e for e, _ in expected]
    if batch == 1:
        alone = gen.generate(prompts[0], max_new, drafter=drafter, tree=tree, eos_token_id=eos)
        assert alone.tokens == expected[0][0]
        assert alone.stats["forward_passes"] == alone.stats["verify_steps"] + 1


@pytest.mark.parametrize("arch, form", [("llama", sig.VERIFY_FORM), ("qwen2", sig.STEP_FORM), ("mistral", sig.STEP_FORM),
                                        ("qwen3", sig.STEP_FORM), ("phi", sig.STEP_FORM)])
def test_fixed_prompts_match_hf(arch, form, request):
    """The concatenating form (older artifacts), Qwen2's biased packed projections, Mistral's sliding window
    (the bias masks cache rows outside it), Qwen3's per-head q/k norms and Phi's partial rotary, on repetitive
    prompts longer than the window."""
    m = request.getfixturevalue(arch)
    assert m.reports[form]["form"] == form, m.reports[form].get("step_lowering")
    gen = m.gens[form]
    prompts = [[5, 6, 7, 8, 9] * 4, [11, 12, 13] * 5 + [14], [40, 41, 42, 43] * 3]
    expected = [hf_greedy(m.model, p, 32, [])[0] for p in prompts]
    for drafter, tree in [("recycling+lookup", "dynamic"), ("lookup", "static:chain-4"), ("none", "dynamic")]:
        assert [r.tokens for r in gen.generate_batch(prompts, 32, drafter=drafter, tree=tree, eos_token_id=[])] == expected
        assert [gen.generate(p, 32, drafter=drafter, tree=tree, eos_token_id=[]).tokens for p in prompts] == expected


def test_batch_results_and_stats(llama):
    gen = llama.gens[sig.STEP_FORM]
    results = gen.generate_batch([[5, 6, 7] * 3, [9]], 10, eos_token_id=[])
    assert [r.stats["sequence"] for r in results] == [0, 1]
    assert all(r.stats["new_tokens"] == 10 and r.stats["batch_size"] == 2 for r in results)
    single = gen.generate([9], 10, eos_token_id=[], tree="static:chain-2")
    stats = single.stats
    assert set(stats["per_step_s"]) == {"draft", "verify", "accept", "loop"}
    t = stats["time_s"]
    phases = t["prefill_s"] + t["cost_curve_s"] + t["draft_s"] + t["verify_s"] + t["accept_s"] + t["loop_s"]
    assert abs(phases - t["total"]) < 1e-6  # the phases and the loop's own overhead add up to the whole call
    assert stats["tokens_per_s"] == pytest.approx(stats["new_tokens"] / t["total"])
    with pytest.raises(GenerationError, match="non-empty list of prompts"):
        gen.generate_batch([], 4)


def test_calibration_is_per_machine_not_per_call(llama, tmp_path, user_cache):
    # earlier tests of this module may have measured this artifact into the shared user cache, which load prefers:
    # start from the manifest's compile-time record alone
    shutil.rmtree(user_cache / "calibration", ignore_errors=True)
    art = llama.root / sig.STEP_FORM
    manifest = json.loads((art / "manifest.json").read_text())
    records = manifest["runtime_settings"]["generation"]["calibration"]
    assert len(records) == 1
    record = next(iter(records.values()))
    assert record["threads"] in {int(k) for k in record["step_s"]} and str(record["threads"]) in record["curves"]
    gen = OrtGenerator.load(art)  # default threads: the calibrated ones
    assert gen.threads == record["threads"]
    assert gen.generate([5, 6, 7], 8, eos_token_id=[]).stats["time_s"]["cost_curve_s"] == 0.0

    # another machine: the manifest knows nothing about it and the user cache is empty
    other = shutil.copytree(art, tmp_path / "copied")
    manifest["runtime_settings"]["generation"]["calibration"] = {}
    (other / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(user_cache / "calibration", ignore_errors=True)
    gen = OrtGenerator.load(other, threads=1)
    first = gen.generate([5, 6, 7], 8, eos_token_id=[]).stats["time_s"]
    assert first["cost_curve_s"] > 0.0  # measured once, paid by this call, and counted in its tokens/s
    assert gen.generate([5, 6, 7], 8, eos_token_id=[]).stats["time_s"]["cost_curve_s"] == 0.0
    again = OrtGenerator.load(other, threads=1)  # a new process on this machine: from the user cache
    assert again.generate([5, 6, 7], 8, eos_token_id=[]).stats["time_s"]["cost_curve_s"] == 0.0


def test_unknown_form_asks_to_recompile(llama, tmp_path):
    other = shutil.copytree(llama.root / sig.STEP_FORM, tmp_path / "future")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["runtime_settings"]["generation"]["form"] = "paged-kv-v9"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GenerationError, match="'paged-kv-v9', which this elision cannot run .* recompile"):
        OrtGenerator.load(other, threads=1)


def test_generate_target_onnxruntime_compiles_once_and_matches_torch(llama, user_cache):
    from elision.cli.main import app

    model_dir = str(llama.dir)
    args = ["generate", model_dir, "--prompt", "def load(path):", "-n", "12", "--json"]
    torch_run = CliRunner().invoke(app, args)
    assert torch_run.exit_code == 0, torch_run.output
    ort_run = CliRunner().invoke(app, args + ["--target", "onnxruntime"])
    assert ort_run.exit_code == 0, ort_run.output
    first = json.loads(ort_run.stdout)
    assert first["tokens"] == json.loads(torch_run.stdout)["tokens"]
    assert first["stats"].keys() == json.loads(torch_run.stdout)["stats"].keys()
    cached = list((user_cache / "generate").iterdir())
    assert len(cached) == 1 and (cached[0] / "step.onnx").is_file()
    stamp = (cached[0] / "step.onnx").stat().st_mtime_ns
    again = CliRunner().invoke(app, args + ["--target", "onnxruntime", "--threads", "1"])
    assert again.exit_code == 0 and json.loads(again.stdout)["tokens"] == first["tokens"]
    assert (cached[0] / "step.onnx").stat().st_mtime_ns == stamp  # reused, not recompiled
    bad = CliRunner().invoke(app, ["generate", model_dir, "--prompt", "x", "--target", "onnxruntime",
                                   "--skip-layers", "1"])
    assert bad.exit_code == 2 and "--skip-layers need --target torch" in " ".join(bad.output.split())


# ---------------------------------------------------------------------------------------------- continuous batching
_batchers: dict = {}


def _batcher(llama, form: str, drafter: str, tree: str, slots: int):
    """One ContinuousBatcher per configuration (its cost curves are measured once), reused across examples: a
    batcher left empty by one example is what the next one starts from, as in a serving replica."""
    from elision.runtime.generation.continuous import ContinuousBatcher

    key = (form, drafter, tree, slots)
    if key not in _batchers:
        gen = OrtGenerator(llama.gens[form].artifact, drafter=drafter, tree=tree)
        _batchers[key] = ContinuousBatcher(gen, slots)
    batcher = _batchers[key]
    # hypothesis aborts an example inside data.draw when its draws overrun the buffer (many join-now draws), which
    # leaves that example's requests in the batcher: cancel them, so every user starts from an empty batch
    for stale in list(batcher.lanes.values()):
        batcher.cancel(stale)
    assert not batcher.lanes and batcher.free_slots == slots
    return batcher


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data(), form=st.sampled_from([sig.STEP_FORM, sig.VERIFY_FORM]), drafter=st.sampled_from(DRAFTERS),
       tree=st.sampled_from(TREES[:2]), slots=st.sampled_from([1, 2, 3]), requests=st.integers(1, 6))
def test_continuous_batching_greedy_equals_each_request_alone(llama, data, form, drafter, tree, slots, requests):
    """Requests join a running batch at drawn steps, some sample, some are cancelled part-way: every greedy request
    that runs to its end gets exactly Hugging Face's greedy tokens (what it gets alone), whoever shared its steps."""
    from elision.runtime.generation.continuous import BatchRequest

    batcher = _batcher(llama, form, drafter, tree, slots)
    plan = []
    for i in range(requests):
        prompt = data.draw(prompt_strategy, label=f"prompt{i}")
        max_new = data.draw(st.integers(1, 16), label=f"max_new{i}")
        kind = data.draw(st.sampled_from(["greedy", "greedy", "sample", "cancel"]), label=f"kind{i}")
        plan.append((prompt, max_new, kind))
    expected, eos = {}, batcher.generator.eos_token_ids  # requests stop at the artifact's EOS ids
    for i, (prompt, max_new, kind) in enumerate(plan):
        if kind == "greedy":
            expected[i], gap = hf_greedy(llama.model, prompt, max_new, eos)
            assume(gap > 1e-4)
    waiting, lanes, results, streamed = list(range(requests)), {}, {}, {}
    for _ in range(400):  # bounded: every request is done in far fewer steps
        if not waiting and not batcher.lanes:
            break
        # a request joins now or after a drawn number of steps (at once when nothing runs: no idle rounds)
        while waiting and batcher.free_slots and (not batcher.lanes or data.draw(st.booleans(), label="join now")):
            i = waiting.pop(0)
            prompt, max_new, kind = plan[i]
            streamed[i] = []
            options = dict(do_sample=True, temperature=0.9, top_p=0.9, seed=i) if kind == "sample" else {}
            lane = batcher.add(BatchRequest(prompt, max_new, on_text=streamed[i].append, **options))
            lanes[lane.slot] = i
            if lane.result is not None:
                results[i] = lane.result
        for lane in list(batcher.lanes.values()):
            i = lanes[lane.slot]
            if plan[i][2] == "cancel" and lane.steps >= 1:
                batcher.cancel(lane)
                results[i] = None
        for lane in batcher.step():
            results[lanes[lane.slot]] = lane.result
    assert not waiting and not batcher.lanes and batcher.free_slots == slots
    for i, want in expected.items():
        got = results[i]
        assert got.tokens == want, (i, plan[i])
        assert "".join(streamed[i]) == got.text == llama.tokenizer.decode(want, skip_special_tokens=True)
        assert got.stats["new_tokens"] == len(want) and 1 <= got.stats["batch_size"] <= slots
    for i, (prompt, max_new, kind) in enumerate(plan):
        if kind == "sample":
            assert 1 <= len(results[i].tokens) <= max_new


def test_continuous_batching_refuses_a_bad_request_alone(llama):
    from elision.runtime.generation.continuous import BatchRequest

    batcher = _batcher(llama, sig.STEP_FORM, "recycling+lookup", "dynamic", 2)
    good = batcher.add(BatchRequest([5, 6, 7, 8] * 3, 12))
    vocab = batcher.generator.vocab_size
    for bad, says in [(BatchRequest([vocab + 3], 4), "outside the vocabulary"),
                      (BatchRequest([5], 0), "max_new_tokens must be"),
                      (BatchRequest([5] * 10, batcher.limit), "position limit"),
                      (BatchRequest([5], 4, do_sample=True, temperature=0.0), "temperature")]:
        with pytest.raises(GenerationError, match=says):
            batcher.add(bad)
    assert list(batcher.lanes) == [good.slot] and batcher.free_slots == 1
    while batcher.lanes:
        batcher.step()
    assert good.result.tokens == hf_greedy(llama.model, [5, 6, 7, 8] * 3, 12, batcher.generator.eos_token_ids)[0]


def test_continuous_batching_gate_switches_the_whole_batch_and_keeps_the_tokens(llama):
    """The serving batch is gated too (dynamic trees): with the gate's plain rate forced far above any real one,
    every phase after a speculative probe is plain for all rows at once, and each request still gets exactly its
    greedy tokens, with its plain steps counted in its own stats."""
    from elision.runtime.generation.continuous import BatchRequest, ContinuousBatcher

    # its own batcher: the forced gate must not leak into the batchers other tests share
    batcher = ContinuousBatcher(OrtGenerator(llama.gens[sig.STEP_FORM].artifact, drafter="lookup"), 2)
    gate = batcher.batch.gate
    assert gate is not None
    gate.rates[False] = 1e12
    prompts = [[5, 6, 7, 8] * 4, [9, 10, 11] * 5]
    lanes = [batcher.add(BatchRequest(p, 40)) for p in prompts]
    while batcher.lanes:
        batcher.step()
    eos = batcher.generator.eos_token_ids
    for lane, prompt in zip(lanes, prompts):
        assert lane.result.tokens == hf_greedy(llama.model, prompt, 40, eos)[0]
    assert any(0 < lane.result.stats["plain_steps"] < lane.result.stats["verify_steps"] for lane in lanes)
    assert gate.switches >= 1
