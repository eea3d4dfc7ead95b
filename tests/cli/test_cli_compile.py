"""`elision compile`: artifacts, --verify, --dump-ir, --json, exit codes and one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

from elision.cli.main import main
from elision.ir.serialize import load_module
from elision.ir import interpret


def test_compile_emit_ir_verify_and_reload(tmp_path, capsys):
    out = tmp_path / "ir"
    code = main(["compile", "builtin:tiny-llama", "--passes", "canonicalize,cse,dce", "-o", str(out), "--verify",
                 "--dump-ir", str(tmp_path / "dump"), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify"]["ok"] and report["verify"]["max_abs_error"] == 0.0
    assert [p["name"] for p in report["passes"]] == ["canonicalize", "cse", "dce"]
    assert report["nodes_after"] < report["nodes_before"]
    assert (tmp_path / "dump" / "00-canonicalize.before.ir").exists()
    mod = load_module(out)
    assert mod.attrs["pipeline"] == "canonicalize,cse,dce"
    ids = torch.randint(0, 256, (2, 5))
    from elision.models import get_builtin

    model = get_builtin("tiny-llama").build()
    with torch.no_grad():
        assert torch.equal(interpret(mod, "forward", ids)[0], model(ids, use_cache=False).logits)


def test_compile_emit_fx(tmp_path):
    assert main(["compile", "builtin:tiny-vit", "--emit", "fx", "-o", str(tmp_path)]) == 0
    code = (tmp_path / "forward.py").read_text()
    assert "torch.ops.aten" in code and "def forward" in code


@pytest.mark.parametrize("argv,code,msg", [
    (["compile", "builtin:nope"], 2, "unknown builtin model 'nope'"),
    (["compile", "builtin:tiny-llama", "--passes", "cse,frobnicate"], 2, "unknown pass 'frobnicate'"),
    (["compile", "builtin:tiny-llama", "--emit", "exe"], 2, "--emit must be one of"),
    (["compile", "/no/such/dir"], 2, "no such directory"),
])
def test_compile_bad_input_exit_codes(argv, code, msg, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert msg in " ".join(err.split())
    assert "Traceback" not in err


def test_console_script_runs_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "elision.cli.main", "compile", "builtin:missing"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown builtin model" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "elision.cli.main", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "compile" in proc.stdout
