"""Fuzzing what elision reads from disk: artifact manifests, ONNX and weight bytes, safetensors headers, IR text.

Whatever the mutation, the result is either a clear error (an ElisionError -- every artifact error is one -- or, for
IR text, an IRError, with a one-line message), or, for an artifact that still loads, exactly the original answer:
never a traceback of another type, never a hang (every load runs under a timer), never a wrong answer accepted
(tampered graph or weight bytes must be caught by the sha256 check).
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bad_input_models import TokenModel
from elision.errors import ElisionError
from elision.frontend.trace import export_to_ir
from elision.ir import IRError, parse
from elision.ir.serialize import load_module, save_module
from elision.lowering.onnx_export import export_onnx, source_hash_of
from elision.models.vecset import FIXTURE_DIR, load_latents
from elision.runtime.artifact import ArtifactTamperedError, load_artifact

IDS = np.array([[1, 7, 200], [0, 255, 3]], np.int64)
TIME_LIMIT_S = 60  # one load (+ run) of a tiny artifact takes well under a second; more is a hang
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NASTY_NAMES = ["../forward.onnx", "/etc/hostname", "..", "", ".", "forward.onnx/../../x", "a\x00b", "weights.bin",
               "manifest.json", "forward.onnx", "0" * 64, "f" * 64, "C:\\x.onnx", "\\\\server\\share"]


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in the test if the body runs longer than `seconds` (a hang becomes a failure)."""
    def expire(_signum, _frame):
        raise TimeoutError(f"no answer after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_clear(error: BaseException, allowed=(ElisionError,)) -> None:
    assert isinstance(error, allowed), f"{type(error).__name__}: {error}"
    message = str(error)
    assert message.strip() and "\n" not in message, repr(message)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[Path, np.ndarray]:
    model = TokenModel().eval()
    out = export_onnx({"forward": (model, (torch.from_numpy(IDS),), {0: {0: "batch"}})},
                      tmp_path_factory.mktemp("fuzz") / "art", pipeline="", runtime_settings={"kind": "generic"},
                      source_hash=source_hash_of(model))
    return out, load_artifact(out, threads=1).run("forward", input_ids=IDS)["output_0"]


@contextlib.contextmanager
def copy_of(art: Path):
    with tempfile.TemporaryDirectory(prefix="elision-fuzz-") as tmp:
        dst = Path(tmp) / "art"
        shutil.copytree(art, dst)
        yield dst


def outcome(call, allowed=(ElisionError,)):
    """`call()` under the time limit: its result, or None once what it raised was checked to be a clear error."""
    with time_limit(TIME_LIMIT_S):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - the point: which exceptions escape
            assert_clear(e, allowed)
            return None


def load_and_run(art: Path, want: np.ndarray | None) -> None:
    """A clear error, or the original answer (`want` None: any answer; the sha256 check was switched off)."""
    got = outcome(lambda: load_artifact(art, threads=1, verify=want is not None).run("forward", input_ids=IDS))
    if got is not None and want is not None:
        np.testing.assert_array_equal(got["output_0"], want)


# ---------------------------------------------------------------------------------------------------- manifests
def json_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from json_paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from json_paths(child, prefix + (index,))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=12)
    | st.sampled_from(NASTY_NAMES),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated_manifests(draw, manifest: dict) -> dict:
    mutated = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(json_paths(mutated))))
        if not path:
            mutated = draw(json_values)
            continue
        parent = mutated
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "delete", "rename"]))
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(NASTY_NAMES) | st.text(max_size=8))] = parent.pop(key)
    return mutated


@pytest.fixture(scope="module")
def manifest(artifact) -> dict:
    return json.loads((artifact[0] / "manifest.json").read_text())


def test_mutated_manifests(artifact, manifest):
    art, want = artifact

    @FUZZ
    @given(st.data())
    def check(data):
        mutated = data.draw(mutated_manifests(manifest))
        with copy_of(art) as dst:
            (dst / "manifest.json").write_text(json.dumps(mutated))
            load_and_run(dst, want)

    check()


def test_manifest_bytes(artifact):
    art, want = artifact
    text = (art / "manifest.json").read_bytes()

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, len(text) - 1), st.integers(0, 255)), min_size=1, max_size=8),
           st.integers(0, len(text)))
    def check(edits, keep):
        data = bytearray(text[:keep] if keep < len(text) // 4 else text)
        for position, value in edits:
            if position < len(data):
                data[position] = value
        with copy_of(art) as dst:
            (dst / "manifest.json").write_bytes(bytes(data))
            load_and_run(dst, want)

    check()


# ---------------------------------------------------------------------------------------------- ONNX / weights
@pytest.mark.parametrize("name", ["forward.onnx", "weights.bin"])
def test_tampered_bytes_are_caught_by_the_hash_check(artifact, name):
    art, want = artifact
    original = (art / name).read_bytes()

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(1, 255)), min_size=1, max_size=4,
                    unique_by=lambda flip: flip[0]),
           st.sampled_from(["flip", "truncate", "append"]))
    def check(flips, how):
        data = bytearray(original)
        if how == "truncate":
            data = data[: flips[0][0]]
        elif how == "append":
            data += bytes(v for _, v in flips)
        else:
            for position, mask in flips:
                data[position] ^= mask
        with copy_of(art) as dst:
            (dst / name).write_bytes(bytes(data))
            with time_limit(TIME_LIMIT_S), pytest.raises(ArtifactTamperedError, match="was modified after export"):
                load_artifact(dst, threads=1)
            load_and_run(dst, None)  # --no-verify: ONNX Runtime meets the damage, which must still be a clear error

    check()


# ------------------------------------------------------------------------------------------------ safetensors
def mutate_safetensors(raw: bytes, draw) -> bytes:
    """Rewrite the header (a length prefix + JSON): its length, its bytes, or one field of one tensor entry."""
    (length,) = struct.unpack("<Q", raw[:8])
    header, body = raw[8:8 + length], raw[8 + length:]
    how = draw(st.sampled_from(["length", "bytes", "field"]))
    if how == "length":
        return struct.pack("<Q", draw(st.integers(0, 2 ** 64 - 1))) + raw[8:]
    if how == "bytes":
        data = bytearray(header)
        for position, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                             min_size=1, max_size=6)):
            data[position] = value
        return struct.pack("<Q", len(data)) + bytes(data) + body
    entries = json.loads(header)
    name = draw(st.sampled_from(sorted(entries)))
    if name == "__metadata__":
        entries[name] = draw(json_values)
    else:
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entries[name][field] = draw(st.sampled_from(["F32", "I64", "BOOL", "F8_E4M3", "X99"]) if field == "dtype"
                                    else st.lists(st.integers(-5, 2 ** 40), max_size=4) | json_values)
    data = json.dumps(entries).encode()
    return struct.pack("<Q", len(data)) + data + body


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ir")
    save_module(export_to_ir(TokenModel().eval(), (torch.from_numpy(IDS),)), out)
    return out


def test_mutated_safetensors_headers_of_ir_params(ir_dir):
    raw = (ir_dir / "params.safetensors").read_bytes()

    @FUZZ
    @given(st.data())
    def check(data):
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp)
            shutil.copy(ir_dir / "module.ir", dst / "module.ir")
            (dst / "params.safetensors").write_bytes(mutate_safetensors(raw, data.draw))
            outcome(lambda: load_module(dst), (ElisionError, IRError))

    check()


def test_mutated_safetensors_headers_of_latents():
    raw = (FIXTURE_DIR / "thin_rods.latents.safetensors").read_bytes()

    @FUZZ
    @given(st.data())
    def check(data):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "l.safetensors"
            path.write_bytes(mutate_safetensors(raw, data.draw))
            with time_limit(TIME_LIMIT_S):
                try:
                    load_latents(path)
                except ValueError as e:  # what the CLI reports as one line (see elision.cli.shape)
                    assert str(e).strip() and "\n" not in str(e)

    check()


# ------------------------------------------------------------------------------------------------------ IR text
def test_mutated_ir_text(ir_dir):
    text = (ir_dir / "module.ir").read_text()
    tokens = text.split(" ")
    alphabet = st.sampled_from(list("%@()[]{}:,=.\"'\\#-+*/0123456789 \n\tabcxyzf") + ["i64", "f32", "->", "py.os.system",
                                                                                        "aten.", "param", "return"])

    @FUZZ
    @given(st.data())
    def check(data):
        how = data.draw(st.sampled_from(["chars", "tokens", "lines"]))
        if how == "chars":
            chars = list(text)
            for _ in range(data.draw(st.integers(1, 6))):
                position = data.draw(st.integers(0, len(chars)))
                op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
                if op == "insert" or position >= len(chars):
                    chars.insert(position, data.draw(alphabet))
                elif op == "delete":
                    del chars[position]
                else:
                    chars[position] = data.draw(alphabet)
            mutated = "".join(chars)
        elif how == "tokens":
            parts = list(tokens)
            i, j = data.draw(st.integers(0, len(parts) - 1)), data.draw(st.integers(0, len(parts) - 1))
            parts[i] = parts[j] if data.draw(st.booleans()) else data.draw(alphabet)
            mutated = " ".join(parts)
        else:
            lines = text.splitlines()
            i = data.draw(st.integers(0, len(lines) - 1))
            lines.insert(data.draw(st.integers(0, len(lines))), lines.pop(i) if data.draw(st.booleans()) else lines[i])
            mutated = "\n".join(lines)
        outcome(lambda: parse(mutated), (ElisionError, IRError))

    check()
