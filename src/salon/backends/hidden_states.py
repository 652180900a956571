"""A chat model's reading of a text: its final hidden states, pooled.

The harm gate's probe (`safety/probe.py`) reads what the embedded chat model itself makes of a
request, just before it would answer: llama.cpp (through xllamacpp) in embedding mode gives
the state at the last token ("last") or the mean over the text's tokens ("mean"),
L2-normalised. Each pooling is a llama.cpp context of its own on the same GGUF file (its
OpenAI-style endpoint pools one way per context); the weights are memory-mapped, so the
contexts share their pages and each costs one small context (~30 MB for Qwen2.5-Coder-1.5B)
and one prompt evaluation.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import xllamacpp

from salon.backends.embedded import private_listener
from salon.errors import BackendError

F32 = npt.NDArray[np.float32]
# Long enough for any turn the probe reads (it reads a clipped turn); one sequence at a time.
_CONTEXT_TOKENS = 1024


class HiddenStates(Protocol):
    """Texts in, one vector per text out (blocking: call it from a worker thread)."""

    def vectors(self, texts: Sequence[str]) -> F32: ...

    def close(self) -> None: ...


POOLINGS = {
    "last": xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_LAST,
    "mean": xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN,
}


class LlamaHiddenStates:
    """Final hidden states of a GGUF model, pooled each way `poolings` names and the pooled
    vectors concatenated in that order; loaded on first use."""

    def __init__(self, path: Path, threads: int, poolings: Sequence[str] = ("last",)) -> None:
        unknown = [p for p in poolings if p not in POOLINGS]
        if unknown or not poolings:
            raise BackendError(f"unknown pooling {unknown or poolings}; known: {sorted(POOLINGS)}")
        self._path = path
        self._threads = threads
        self._poolings = tuple(poolings)
        self._servers: list[Any] = []  # xllamacpp.Server each; the package ships no stubs
        self._socket_dirs: list[Path] = []
        self._lock = threading.Lock()

    def vectors(self, texts: Sequence[str]) -> F32:
        with self._lock:  # one request at a time: each context holds one sequence
            servers = self._servers or self._load()
            parts = []
            for server in servers:
                try:
                    reply = server.handle_embeddings({"input": list(texts), "model": "probe"})
                except Exception as exc:
                    name = self._path.name
                    raise BackendError(f"hidden states of {name} failed: {exc}") from exc
                parts.append(_parse(reply, len(texts), self._path.name))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        # Dropping the last reference runs the C++ destructor, which stops llama.cpp's loop.
        self._servers = []
        for folder in self._socket_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._socket_dirs = []

    def _load(self) -> list[Any]:
        try:
            self._servers = [self._start(pooling) for pooling in self._poolings]
        except BackendError:
            self._drop()
            raise
        return self._servers

    def _start(self, pooling: str) -> Any:
        params = xllamacpp.CommonParams()
        params.model.path = str(self._path)
        params.embedding = True
        params.pooling_type = POOLINGS[pooling]
        params.n_parallel = 1
        params.n_ctx = _CONTEXT_TOKENS
        params.n_batch = _CONTEXT_TOKENS
        params.n_ubatch = _CONTEXT_TOKENS
        params.cpuparams.n_threads = self._threads
        params.cpuparams_batch.n_threads = self._threads
        params.verbosity = 0
        folder = Path(tempfile.mkdtemp(prefix="salon-probe-"))
        self._socket_dirs.append(folder)
        private_listener(params, folder)
        try:
            return xllamacpp.Server(params)
        except Exception as exc:
            raise BackendError(f"could not load {self._path} for hidden states: {exc}") from exc


def _parse(reply: Mapping[str, Any], expected: int, name: str) -> F32:
    data = reply.get("data") if isinstance(reply, Mapping) else None
    if not isinstance(data, list) or len(data) != expected:
        error = reply.get("error", reply) if isinstance(reply, Mapping) else reply
        raise BackendError(f"hidden states of {name} failed: {str(error)[:200]}")
    ordered = sorted(data, key=lambda item: int(item.get("index", 0)))
    return np.asarray([item["embedding"] for item in ordered], dtype=np.float32)
