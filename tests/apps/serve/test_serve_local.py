"""`elision serve DIR` with its embedded local Ray (1 CPU, one replica): it answers like `elision run`, and Ctrl-C
stops it and every Ray process it started. Bad options fail before Ray starts, with one line and exit code 2."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("ray.serve", reason="the serve extra is not installed: pip install 'elision[serve]'")
requests = pytest.importorskip("requests")

from serve_helpers import (HOST, REQUEST_TIMEOUT_S, ServeProcess, alive, descendants, elision_run,  # noqa: E402
                           free_port)


def test_local_service_answers_and_ctrl_c_leaves_no_ray_process(served_artifact):
    port = free_port()
    proc = ServeProcess([str(served_artifact), "--port", str(port), "--host", HOST, "--ray-cpus", "1",
                         "--replica-cpus", "0.5", "--name", "coder"])
    try:
        proc.start()
        assert "on local Ray (1 CPUs)" in proc.banner
        ray_processes = descendants(proc.proc.pid)
        assert any("raylet" in cmd for cmd in ray_processes.values())
        assert any("gcs_server" in cmd for cmd in ray_processes.values())
        url = f"http://{HOST}:{port}"
        r = requests.post(f"{url}/v1/completions", json={"prompt": "def parse(", "max_tokens": 24, "temperature": 0,
                                                         "model": "coder"}, timeout=REQUEST_TIMEOUT_S)
        assert r.status_code == 200, r.text
        want = elision_run(served_artifact, "def parse(", 24)
        assert r.json()["elision"]["tokens"] == want["tokens"] and r.json()["choices"][0]["text"] == want["text"]
        ray_processes.update(descendants(proc.proc.pid))  # the replicas' workers started since
        code, out, err = proc.stop()
    finally:
        proc.kill()
    assert code == 0, err[-2000:]
    assert out.rstrip().endswith("stopped")
    assert "Traceback" not in err
    deadline = time.monotonic() + 30
    while alive(ray_processes) and time.monotonic() < deadline:  # raylet reaps its workers as it exits
        time.sleep(0.5)
    left = {pid: ray_processes[pid] for pid in alive(ray_processes)}
    assert not left, left


@pytest.mark.parametrize("args, says", [
    (["/nonexistent/artifact"], "does not exist"),
    (["{art}", "--replicas", "0"], "--replicas must be >= 1"),
    (["{art}", "--replica-cpus", "0"], "--replica-cpus must be > 0"),
    (["{art}", "--max-queued", "0"], "--max-queued must be >= 1"),
    (["{art}", "--port", "70000"], "--port must be in 1..65535"),
    (["{art}", "--proxy-location", "Moon"], "--proxy-location must be one of"),
])
def test_bad_options_fail_before_ray_starts(served_artifact, args, says):
    from typer.testing import CliRunner

    from elision.cli.main import app

    res = CliRunner().invoke(app, ["serve", *[a.format(art=served_artifact) for a in args]])
    assert res.exit_code == 2 and says in res.output, res.output
    assert "Traceback" not in res.output


def test_a_busy_port_is_a_clear_error(served_artifact):
    import socket

    from typer.testing import CliRunner

    from elision.cli.main import app

    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        res = CliRunner().invoke(app, ["serve", str(served_artifact), "--port", str(s.getsockname()[1])])
    assert res.exit_code == 2 and "the port is in use" in res.output, res.output


def test_a_directory_that_is_not_a_generation_artifact_is_refused(tmp_path):
    from typer.testing import CliRunner

    from elision.cli.main import app

    (tmp_path / "manifest.json").write_text("{not json")
    res = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert res.exit_code == 2 and "not valid JSON" in res.output, res.output
