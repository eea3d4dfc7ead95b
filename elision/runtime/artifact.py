"""Load an elision ONNX artifact and run it with ONNX Runtime alone.

An artifact is a directory written by `elision.lowering.onnx_export.export_onnx`:

    manifest.json      format version, elision version, functions and their IO (symbolic dims),
                       the pass pipeline applied, the source model's hash, runtime settings,
                       and the sha256 of every other file (tamper detection)
    <function>.onnx    one ONNX graph per IR function (prefill, decode, draft, ...)
    weights.bin        ONNX external data shared by all functions: every weight stored once

This module is the deploy-time side, so it must never import torch: it needs numpy and onnxruntime
only (a test checks that in a fresh interpreter). Errors are `ArtifactError` subclasses whose message
says what is wrong and what to do about it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from elision.errors import ElisionError
from elision.runtime.precision import cpu_refusal

# Bumped whenever the manifest layout changes in a way an older reader would misread.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.bin"

_COMPILE_HINT = "re-create it with `elision compile MODEL --emit onnx -o DIR`"


class ArtifactError(ElisionError, RuntimeError):
    """Base class of every artifact problem. `exit_code` is what the CLI exits with."""

    exit_code = 2


class ArtifactMissingFileError(ArtifactError):
    """The directory, the manifest, or a file the manifest names does not exist."""


class ArtifactCorruptError(ArtifactError):
    """A file exists but cannot be parsed (bad JSON, not an ONNX model, ORT refuses it)."""


class ArtifactPathError(ArtifactCorruptError):
    """The manifest names a file outside the artifact directory (absolute, `..`, or a symlink leading out)."""


class ArtifactTamperedError(ArtifactError):
    """A file's sha256 differs from the one recorded in the manifest."""


class ArtifactVersionError(ArtifactError):
    """The manifest was written in a format this elision cannot read."""


class ArtifactProviderError(ArtifactError):
    """The artifact's dtype needs an execution provider this onnxruntime lacks (a bfloat16 graph without CUDA)."""


class ArtifactInputError(ArtifactError):
    """Inputs passed to `Artifact.run` do not match the function's signature."""


def elision_version() -> str:
    """The installed elision version, read from package metadata (no import of elision internals)."""
    try:
        return version("elision")
    except PackageNotFoundError:  # running from a source tree that was never pip-installed
        return "0.0.0+unknown"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a function: numpy dtype name and shape (ints, or strings for symbolic dims).

    value_range: for integer inputs used as indices into a table (token ids into an embedding), the half-open range
    [low, high) of valid values; `Artifact.run` refuses values outside it (ONNX Runtime would read out of bounds or,
    for negative ids, silently wrap around).
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    value_range: tuple[int, int] | None = None

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> "TensorSpec":
        if not isinstance(obj, Mapping):
            raise TypeError("a tensor entry is not an object")
        shape = obj["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, str) or _is_int(d) and d >= 0 for d in shape):
            raise TypeError(f"shape {shape!r} of {obj.get('name')!r} is not a list of sizes and dim names")
        value_range = obj.get("range")
        if value_range is not None:
            if not (isinstance(value_range, list) and len(value_range) == 2 and all(map(_is_int, value_range))
                    and value_range[0] < value_range[1]):
                raise TypeError(f"range {value_range!r} of {obj.get('name')!r} is not [low, high) with low < high")
            value_range = (int(value_range[0]), int(value_range[1]))
        if not isinstance(obj["name"], str) or not isinstance(obj["dtype"], str):
            raise TypeError("tensor name and dtype must be strings")
        return TensorSpec(obj["name"], obj["dtype"], tuple(shape), value_range)

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.value_range is not None:
            entry["range"] = list(self.value_range)
        return entry


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def select_providers(preferred: Iterable[str] | None = None, order: Any = None) -> list[str]:
    """Execution providers to use: `preferred` (all installed, else ArtifactError), else the automatic choice:
    `order` (an artifact manifest's `execution_providers`) filtered to what is installed, or CUDA when present,
    then CPU. The CPU provider stands in when none of `order` is installed, so a CUDA-only artifact fails to load
    with `cpu_refusal`'s message.

    `ELISION_ORT_PROVIDERS` (comma separated) overrides the automatic choice.
    """
    import onnxruntime as ort  # not at top: `elision --help` imports this module and must not load onnxruntime

    available = ort.get_available_providers()
    if preferred is None and os.environ.get("ELISION_ORT_PROVIDERS"):
        preferred = [p.strip() for p in os.environ["ELISION_ORT_PROVIDERS"].split(",") if p.strip()]
    if preferred is not None:
        preferred = list(preferred)
        missing = [p for p in preferred if p not in available]
        if missing:
            raise ArtifactError(
                f"execution provider(s) {', '.join(missing)} not available in this onnxruntime; "
                f"available: {', '.join(available)} (install onnxruntime-gpu for CUDA)"
            )
        return preferred
    if isinstance(order, list) and order and all(isinstance(p, str) for p in order):
        return [p for p in order if p in available] or ["CPUExecutionProvider"]
    chosen = [p for p in ("CUDAExecutionProvider",) if p in available]
    return chosen + ["CPUExecutionProvider"]


def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.exists():
        raise ArtifactMissingFileError(f"artifact directory {root} does not exist; {_COMPILE_HINT}")
    if not root.is_dir():
        raise ArtifactMissingFileError(f"{root} is a file, not an artifact directory; {_COMPILE_HINT}")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactMissingFileError(f"{root} is not an elision artifact: it has no {MANIFEST_NAME}; {_COMPILE_HINT}")
    confined_path(root, MANIFEST_NAME)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        reason = str(e) if not isinstance(e, RecursionError) else "nested too deeply"
        raise ArtifactCorruptError(f"{manifest_path} is not valid JSON ({reason}); {_COMPILE_HINT}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise ArtifactCorruptError(f"{manifest_path} has no format_version; it was not written by elision. {_COMPILE_HINT}")
    found = manifest["format_version"]
    if found != FORMAT_VERSION:
        writer = manifest.get("elision_version", "an unknown version")
        raise ArtifactVersionError(
            f"{manifest_path} has format version {found!r} (written by elision {writer}); this elision "
            f"{elision_version()} reads format version {FORMAT_VERSION}. Re-export the model with this elision "
            f"(`elision compile MODEL --emit onnx -o DIR`) or run it with elision {writer}."
        )
    for key in ("functions", "files"):
        if not isinstance(manifest.get(key), dict):
            raise ArtifactCorruptError(f"{manifest_path} lacks the {key!r} table; {_COMPILE_HINT}")
    if not isinstance(manifest.get("runtime_settings", {}), dict):
        raise ArtifactCorruptError(f"{manifest_path}: runtime_settings is not an object; {_COMPILE_HINT}")
    for rel, digest in manifest["files"].items():
        if not isinstance(digest, str) or len(digest) != 64:
            raise ArtifactCorruptError(f"{manifest_path}: the sha256 recorded for {rel!r} is not a 64-digit hex "
                                       f"string; {_COMPILE_HINT}")
        confined_path(root, rel)
    return manifest


def confined_path(root: Path, rel: Any) -> Path:
    """`root / rel` for a file name read from a manifest, refusing anything that leads outside `root`: absolute
    paths, `..` steps, and symlinks (followed) whose target lies elsewhere."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ArtifactCorruptError(f"{MANIFEST_NAME} names a file {rel!r} that is not a file name; {_COMPILE_HINT}")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or rel.startswith(("/", "\\")):
        raise ArtifactPathError(f"{MANIFEST_NAME} names {rel!r}, which lies outside the artifact directory {root}; "
                                f"an artifact reads only its own files (refusing to load it)")
    path = root / rel
    base = root.resolve()
    try:
        inside = path.resolve().is_relative_to(base)
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise ArtifactPathError(f"{MANIFEST_NAME} names {rel!r}, which leads outside the artifact directory {root} "
                                f"(a symlink); an artifact reads only its own files (refusing to load it)")
    return path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of the artifact directory `path`, without loading any graph (ArtifactError when the
    directory is not a readable artifact of this format version)."""
    return _read_manifest(Path(path))


def _verify_files(root: Path, manifest: Mapping[str, Any], check_hashes: bool) -> None:
    for rel, expected in manifest["files"].items():
        path = confined_path(root, rel)
        if not path.is_file():
            raise ArtifactMissingFileError(f"artifact file {path} named in {MANIFEST_NAME} is missing; {_COMPILE_HINT}")
        if check_hashes:
            actual = sha256_file(path)
            if actual != expected:
                raise ArtifactTamperedError(
                    f"{path} was modified after export: sha256 {actual[:12]}... does not match "
                    f"{expected[:12]}... recorded in {MANIFEST_NAME}; {_COMPILE_HINT}"
                )


def _parse_functions(manifest: Mapping[str, Any]) -> dict[str, FunctionSpec]:
    functions = {}
    try:
        for name, entry in manifest["functions"].items():
            file = entry["file"]
            if file not in manifest["files"]:
                raise ArtifactCorruptError(f"{MANIFEST_NAME}: function {name!r} reads {file!r}, which is not among "
                                           f"the artifact's hashed files; {_COMPILE_HINT}")
            functions[name] = FunctionSpec(
                name=name,
                file=file,
                inputs=tuple(TensorSpec.from_json(t) for t in entry["inputs"]),
                outputs=tuple(TensorSpec.from_json(t) for t in entry["outputs"]),
            )
    except (KeyError, TypeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise ArtifactCorruptError(f"{MANIFEST_NAME} function table is malformed ({what}); {_COMPILE_HINT}") from None
    return functions


def _session_options(threads: int | None, optimization: str, config: Mapping[str, str] | None = None):
    import onnxruntime as ort  # not at top: see select_providers

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ArtifactError(f"unknown graph optimization level {optimization!r}; use one of {', '.join(levels)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(str(key), str(value))
    return options


@dataclass
class Artifact:
    """A loaded artifact: one ORT session per function, all reading the shared weights file."""

    path: Path
    manifest: dict[str, Any]
    functions: dict[str, FunctionSpec]
    providers: list[str]
    threads: int | None = None  # intra-op threads of every session (None: onnxruntime's default)
    _sessions: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def runtime_settings(self) -> dict[str, Any]:
        return dict(self.manifest.get("runtime_settings", {}))

    @property
    def pipeline(self) -> str:
        return str(self.manifest.get("pipeline", ""))

    @property
    def source_hash(self) -> str:
        return str(self.manifest.get("source_hash", ""))

    @property
    def device_type(self) -> str:
        return "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def spec(self, fn: str) -> FunctionSpec:
        if fn not in self.functions:
            raise ArtifactInputError(f"artifact has no function {fn!r}; functions: {', '.join(self.functions)}")
        return self.functions[fn]

    def session(self, fn: str):
        """The `onnxruntime.InferenceSession` of function `fn`."""
        self.spec(fn)
        return self._sessions[fn]

    def check_inputs(self, fn: str, inputs: Mapping[str, Any]) -> None:
        """Raise ArtifactInputError naming the problem when `inputs` do not fit function `fn`."""
        spec = self.spec(fn)
        missing = [t.name for t in spec.inputs if t.name not in inputs]
        extra = [k for k in inputs if k not in spec.input_names]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected {', '.join(extra)}")
            raise ArtifactInputError(
                f"function {fn!r}: {'; '.join(parts)}; it takes "
                + ", ".join(f"{t.name}: {t.dtype}{list(t.shape)}" for t in spec.inputs)
            )
        for t in spec.inputs:
            value = inputs[t.name]
            if not isinstance(value, np.ndarray):
                continue  # OrtValues are checked by ORT itself
            if str(value.dtype) != t.dtype:
                raise ArtifactInputError(
                    f"function {fn!r}: input {t.name!r} has dtype {value.dtype}, expected {t.dtype} "
                    f"(convert it with .astype(np.{t.dtype}))"
                )
            if value.ndim != len(t.shape):
                raise ArtifactInputError(
                    f"function {fn!r}: input {t.name!r} has {value.ndim} dims {list(value.shape)}, expected {len(t.shape)} {list(t.shape)}"
                )
            for axis, (got, want) in enumerate(zip(value.shape, t.shape)):
                if isinstance(want, int) and got != want:
                    raise ArtifactInputError(
                        f"function {fn!r}: input {t.name!r} dim {axis} is {got}, expected {want} (shape {list(t.shape)})"
                    )
            if t.value_range is not None and value.size and value.dtype.kind in "iu":
                _check_range(fn, t, value)

    def file(self, name: str) -> Path:
        """The path of the artifact file `name` (a name from the manifest or its runtime settings), refusing names
        that lead outside the artifact directory and files the manifest does not hash."""
        path = confined_path(self.path, name)
        if name not in self.manifest["files"]:
            raise ArtifactCorruptError(f"{self.path}: {name!r} is not among the artifact's hashed files in "
                                       f"{MANIFEST_NAME}; {_COMPILE_HINT}")
        return path

    def run(self, fn: str, /, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run function `fn` on numpy inputs given by name; returns outputs by name."""
        self.check_inputs(fn, inputs)
        spec = self.spec(fn)
        try:
            values = self._sessions[fn].run(spec.output_names, inputs)
        except Exception as e:  # ORT's own exception types: inputs the graph cannot take (shapes that disagree, ...)
            raise ArtifactInputError(f"function {fn!r}: onnxruntime cannot run it on these inputs: {_first_line(e)}") from None
        return dict(zip(spec.output_names, values))

    def run_with_binding(
        self, fn: str, inputs: Mapping[str, Any], *, keep_on_device: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Run `fn` through an IO binding. Inputs may be numpy arrays or `onnxruntime.OrtValue`s.

        Outputs named in `keep_on_device` come back as OrtValues left where the provider put them, so
        a KV cache can be fed into the next step without a host round trip; the others are numpy.
        """
        import onnxruntime as ort  # not at top: see select_providers

        self.check_inputs(fn, inputs)

        spec = self.spec(fn)
        keep = set(keep_on_device)
        unknown = keep - set(spec.output_names)
        if unknown:
            raise ArtifactInputError(f"function {fn!r} has no output(s) {', '.join(sorted(unknown))}; outputs: {', '.join(spec.output_names)}")
        binding = self._sessions[fn].io_binding()
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in spec.output_names:
            binding.bind_output(name, self.device_type if name in keep else "cpu")
        try:
            self._sessions[fn].run_with_iobinding(binding)
        except Exception as e:  # as in `run`
            raise ArtifactInputError(f"function {fn!r}: onnxruntime cannot run it on these inputs: {_first_line(e)}") from None
        results = {}
        for name, value in zip(spec.output_names, binding.get_outputs()):
            results[name] = value if name in keep else value.numpy()
        return results

    def describe(self) -> str:
        lines = [f"artifact {self.path} (elision {self.manifest.get('elision_version')}, providers {', '.join(self.providers)})"]
        for spec in self.functions.values():
            ins = ", ".join(f"{t.name}: {t.dtype}{list(t.shape)}" for t in spec.inputs)
            outs = ", ".join(f"{t.name}: {t.dtype}{list(t.shape)}" for t in spec.outputs)
            lines.append(f"  {spec.name}({ins}) -> ({outs})")
        return "\n".join(lines)


def _check_range(fn: str, spec: TensorSpec, value: np.ndarray) -> None:
    low, high = spec.value_range
    smallest, largest = int(value.min()), int(value.max())
    if smallest < low or largest >= high:
        bad = smallest if smallest < low else largest
        raise ArtifactInputError(
            f"function {fn!r}: input {spec.name!r} holds {bad}, outside the valid range [{low}, {high}) "
            f"(it indexes a table of {high} rows, e.g. token ids of a {high}-token vocabulary)"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _ort_dtype(ort_type: str) -> str:
    """ORT's 'tensor(float)' as the manifest's numpy name 'float32'."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(name, name)


def _check_signature(spec: FunctionSpec, session) -> None:
    """The manifest's inputs and outputs of a function must be the graph's: names, dtypes, ranks and fixed sizes."""
    for kind, declared, actual in (("inputs", spec.inputs, session.get_inputs()),
                                   ("outputs", spec.outputs, session.get_outputs())):
        graph = {a.name: a for a in actual}
        mismatch = sorted({t.name for t in declared} ^ set(graph))
        for t in declared:
            if t.name not in graph:
                continue
            a = graph[t.name]
            fixed_differ = any(isinstance(d, int) and isinstance(g, int) and d != g for d, g in zip(t.shape, a.shape))
            if _ort_dtype(a.type) != t.dtype or len(a.shape) != len(t.shape) or fixed_differ:
                mismatch.append(t.name)
        if mismatch:
            raise ArtifactCorruptError(
                f"{MANIFEST_NAME} describes the {kind} of function {spec.name!r} differently from {spec.file} "
                f"({', '.join(mismatch)}); {_COMPILE_HINT}"
            )


def _check_links(root: Path) -> None:
    """No symlink inside the artifact may lead outside it: ONNX Runtime reads external data by name from the
    directory, so an unlisted link (say `w.bin -> /etc/shadow`) would otherwise be followed."""
    base = root.resolve()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                try:
                    inside = path.resolve().is_relative_to(base)
                except (OSError, RuntimeError):
                    inside = False
                if not inside:
                    raise ArtifactPathError(f"{path} is a symlink leading outside the artifact directory {root}; "
                                            f"an artifact reads only its own files (refusing to load it)")


def load_artifact(
    path: str | os.PathLike,
    *,
    providers: Iterable[str] | None = None,
    verify: bool = True,
    threads: int | None = None,
    optimization: str = "all",
    session_config: Mapping[str, str] | None = None,
) -> Artifact:
    """Load the artifact directory `path` and create one ORT session per function.

    verify: check every file's sha256 against the manifest (tamper detection) before loading.
    providers: execution providers in priority order; default the manifest's `execution_providers` that are
    installed (CUDA first unless the artifact was compiled with --device cpu), else CPU.
    threads: ORT intra-op threads (default: ORT's choice). optimization: ORT graph optimization level.
    session_config: extra ORT session config entries (e.g. {"session.disable_prepacking": "1"}).
    """
    import onnxruntime as ort  # not at top: see select_providers

    root = Path(path)
    manifest = _read_manifest(root)
    _check_links(root)
    _verify_files(root, manifest, check_hashes=verify)
    functions = _parse_functions(manifest)
    chosen = select_providers(providers, order=manifest.get("execution_providers"))
    options = _session_options(threads, optimization, session_config)
    artifact = Artifact(path=root, manifest=manifest, functions=functions, providers=chosen, threads=threads)
    for name, spec in functions.items():
        model_path = confined_path(root, spec.file)
        if not model_path.is_file():
            raise ArtifactMissingFileError(f"function {name!r}: {model_path} is missing; {_COMPILE_HINT}")
        try:
            session = ort.InferenceSession(str(model_path), sess_options=options, providers=chosen)
        except Exception as e:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            refusal = cpu_refusal(str(manifest.get("dtype", "float32")), chosen, _first_line(e))
            if refusal is not None:
                raise ArtifactProviderError(f"function {name!r}: {refusal}") from None
            raise ArtifactCorruptError(
                f"function {name!r}: onnxruntime cannot load {model_path}: {_first_line(e)}; {_COMPILE_HINT}"
            ) from None
        _check_signature(spec, session)
        artifact._sessions[name] = session
    return artifact
