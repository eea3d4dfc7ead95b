"""Hugging Face Hub ids (org/name) as MODEL, resolved from a Hugging Face cache this test writes itself.

The cache has the Hub's layout (models--org--name/snapshots/<revision>/ + refs/main) and holds builtin:tiny-code-lm
under the id `elision-test/tiny-code-lm`; every command runs in a subprocess with HF_HUB_CACHE pointing at it
and HF_HUB_OFFLINE=1 (huggingface_hub reads both when it is imported; nothing reaches the network). Loading by id
must give exactly what loading the directory gives.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from elision.frontend.hub import looks_like_hub_id
from elision.models import code_lm

REPO = Path(__file__).resolve().parents[2]
HUB_ID = "elision-test/tiny-code-lm"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(code_lm.builtin_dir("builtin:tiny-code-lm"), repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


def _elision(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "elision.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_inspect_and_compile_a_hub_id_from_the_cache(hub_cache, tmp_path):
    inspected = _elision(hub_cache, "inspect", HUB_ID, "--json")
    assert inspected.returncode == 0, inspected.stderr
    by_dir = _elision(hub_cache, "inspect", str(code_lm.builtin_dir("builtin:tiny-code-lm")), "--json")
    got, want = json.loads(inspected.stdout), json.loads(by_dir.stdout)
    assert got["model"] == HUB_ID
    assert got["name"] == HUB_ID  # the id names it; everything the model holds is the directory's
    assert {k: v for k, v in got.items() if k not in ("model", "name")} == \
        {k: v for k, v in want.items() if k not in ("model", "name")}
    compiled = _elision(hub_cache, "compile", HUB_ID, "--emit", "onnx", "-o", str(tmp_path / "art"), "--verify",
                        "--json")
    assert compiled.returncode == 0, compiled.stderr
    assert json.loads(compiled.stdout)["verify"]["ok"]


def test_generate_by_hub_id_matches_the_directory(hub_cache):
    args = ("--prompt", "def parse(", "--max-new-tokens", "24", "--json")
    by_id = _elision(hub_cache, "generate", HUB_ID, *args)
    assert by_id.returncode == 0, by_id.stderr
    by_builtin = _elision(hub_cache, "generate", "builtin:tiny-code-lm", *args)
    assert json.loads(by_id.stdout)["tokens"] == json.loads(by_builtin.stdout)["tokens"]


def test_a_missing_hub_id_names_the_cache_and_how_to_download(hub_cache):
    result = _elision(hub_cache, "compile", "elision-test/not-downloaded")
    assert result.returncode == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: model 'elision-test/not-downloaded' is not in the Hugging Face cache {hub_cache} and "
                      "HF_HUB_OFFLINE is set; download it first with `hf download elision-test/not-downloaded` (or "
                      "set HF_HOME / HF_HUB_CACHE to a cache that holds it), or pass a local model directory"]


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B") and looks_like_hub_id("org/name_with.dots-1")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    assert not looks_like_hub_id("org/local")  # an existing directory of that name is a directory
    for spec in ("a/b/c", "/abs/path", "./x/y", "org/..", "builtin:tiny-llama", "pkg.mod:factory", "no[/]such"):
        assert not looks_like_hub_id(spec), spec
