"""`elision.runtime.outputs`: an output appears whole or not at all; a previous output survives every failure."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from elision.errors import OutputPathError
from elision.runtime.outputs import atomic_directory, atomic_file, check_output_dir, check_output_file


def _previous_output(path: Path) -> dict[str, bytes]:
    path.mkdir()
    files = {"manifest.json": b'{"old": true}', "weights.bin": os.urandom(1000)}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def _contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_success_replaces_a_previous_output_as_a_whole(tmp_path):
    out = tmp_path / "art"
    _previous_output(out)
    with atomic_directory(out, marker="manifest.json") as tmp:
        assert tmp.parent == tmp_path and tmp != out and not any(tmp.iterdir())
        (tmp / "manifest.json").write_text("new")
        (tmp / "forward.onnx").write_bytes(b"graph")
    assert _contents(out) == {"manifest.json": b"new", "forward.onnx": b"graph"}  # stale weights.bin is gone
    assert _leftovers(tmp_path) == []
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode == 0o777 & ~_umask()  # not the private 0700 of a temporary directory


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("failure", [RuntimeError("export failed"), KeyboardInterrupt()])
def test_failure_or_ctrl_c_leaves_the_previous_output_untouched(tmp_path, failure):
    out = tmp_path / "art"
    before = _previous_output(out)
    with pytest.raises(type(failure)):
        with atomic_directory(out, marker="manifest.json") as tmp:
            (tmp / "weights.bin").write_bytes(b"")  # what the old exporter left behind: a 0-byte weights file
            raise failure
    assert _contents(out) == before
    assert _leftovers(tmp_path) == []


def test_a_failed_first_export_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "new", marker="manifest.json") as tmp:
            (tmp / "manifest.json").write_text("half")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_directories_holding_other_files_are_refused_not_deleted(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputPathError, match=r"already holds files that are not a previous elision output "
                                              r"\(thesis.tex\); give a new or empty directory"):
        with atomic_directory(home, marker="manifest.json"):
            pytest.fail("the writer must not start")
    assert (home / "thesis.tex").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty, marker="manifest.json") as tmp:  # an empty directory is fine
        (tmp / "manifest.json").write_text("{}")
    assert (empty / "manifest.json").exists()


def test_the_current_directory_is_never_replaced(tmp_path, monkeypatch):
    _previous_output(tmp_path / "art")
    monkeypatch.chdir(tmp_path / "art")
    with pytest.raises(OutputPathError, match="is the current directory"):
        check_output_dir(".", marker="manifest.json")
    with pytest.raises(OutputPathError, match="is the current directory"):
        check_output_dir(tmp_path, marker="manifest.json")


def test_files_and_paths_under_files_are_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match=r"output directory .*/f is an existing file; give a directory path"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(OutputPathError, match=r"cannot create the output directory .*f/sub/deeper: .*/f is a file"):
        check_output_dir(tmp_path / "f" / "sub" / "deeper")
    with pytest.raises(OutputPathError, match=r"cannot create the mesh .*/f/m.glb: .*/f is a file, not a directory"):
        check_output_file(tmp_path / "f" / "m.glb", "mesh")
    with pytest.raises(OutputPathError, match=r"the output file .* is a directory; give a file name"):
        check_output_file(tmp_path)
    assert (tmp_path / "f").read_text() == "x"


def test_a_symlinked_output_directory_is_written_where_it_points(tmp_path):
    real = tmp_path / "disk" / "art"
    real.parent.mkdir()
    _previous_output(real)
    (tmp_path / "link").symlink_to(real)
    with atomic_directory(tmp_path / "link", marker="manifest.json") as tmp:
        (tmp / "manifest.json").write_text("new")
    assert (tmp_path / "link").is_symlink() and (real / "manifest.json").read_text() == "new"


def test_atomic_file_keeps_the_suffix_and_the_old_file_on_failure(tmp_path):
    mesh = tmp_path / "deep" / "m.glb"
    with atomic_file(mesh) as tmp:
        assert tmp.suffix == ".glb" and tmp.parent == mesh.parent  # writers that pick the format by suffix work
        tmp.write_bytes(b"v1")
    assert mesh.read_bytes() == b"v1"
    assert stat.S_IMODE(mesh.stat().st_mode) == 0o666 & ~_umask()
    for failure in (ValueError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(failure)):
            with atomic_file(mesh) as tmp:
                tmp.write_bytes(b"half")
                raise failure
        assert mesh.read_bytes() == b"v1"
    assert sorted(p.name for p in mesh.parent.iterdir()) == ["m.glb"]
