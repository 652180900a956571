"""A chat model's reading of a text: the final hidden state at its last token.

The harm gate's probe (`safety/probe.py`) reads what the embedded chat model itself makes of a
request, just before it would answer: llama.cpp (through xllamacpp) in embedding mode with
last-token pooling gives that state, L2-normalised. It is a second llama.cpp context on the
same GGUF file; the weights are memory-mapped, so the two share their pages and the extra
memory is one small context (~30 MB for Qwen2.5-Coder-1.5B).
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


class LlamaHiddenStates:
    """Last-token final hidden states of a GGUF model, loaded on first use."""

    def __init__(self, path: Path, threads: int) -> None:
        self._path = path
        self._threads = threads
        self._server: Any = None  # xllamacpp.Server; the package ships no stubs
        self._socket_dir: Path | None = None
        self._lock = threading.Lock()

    def vectors(self, texts: Sequence[str]) -> F32:
        with self._lock:  # one request at a time: the context holds one sequence
            server = self._server or self._load()
            try:
                reply = server.handle_embeddings({"input": list(texts), "model": "probe"})
            except Exception as exc:
                raise BackendError(f"hidden states of {self._path.name} failed: {exc}") from exc
        return _parse(reply, len(texts), self._path.name)

    def close(self) -> None:
        with self._lock:
            # Dropping the last reference runs the C++ destructor, which stops llama.cpp's loop.
            self._server = None
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = None

    def _load(self) -> Any:
        params = xllamacpp.CommonParams()
        params.model.path = str(self._path)
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_LAST
        params.n_parallel = 1
        params.n_ctx = _CONTEXT_TOKENS
        params.n_batch = _CONTEXT_TOKENS
        params.n_ubatch = _CONTEXT_TOKENS
        params.cpuparams.n_threads = self._threads
        params.cpuparams_batch.n_threads = self._threads
        params.verbosity = 0
        self._socket_dir = Path(tempfile.mkdtemp(prefix="salon-probe-"))
        private_listener(params, self._socket_dir)
        try:
            self._server = xllamacpp.Server(params)
        except Exception as exc:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
            raise BackendError(f"could not load {self._path} for hidden states: {exc}") from exc
        return self._server


def _parse(reply: Mapping[str, Any], expected: int, name: str) -> F32:
    data = reply.get("data") if isinstance(reply, Mapping) else None
    if not isinstance(data, list) or len(data) != expected:
        error = reply.get("error", reply) if isinstance(reply, Mapping) else reply
        raise BackendError(f"hidden states of {name} failed: {str(error)[:200]}")
    ordered = sorted(data, key=lambda item: int(item.get("index", 0)))
    return np.asarray([item["embedding"] for item in ordered], dtype=np.float32)
