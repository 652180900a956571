"""The BERT encoder behind memory search and the harm gate (all-MiniLM-L6-v2 and the gate's
fine-tuned layers): ONNX Runtime, as shipped (`backends/bert.py`), against the numpy forward
pass salon ran before and against torch (transformers), all single-threaded as served, in one
process, prompt by prompt and interleaved so each sees the same load.

    .venv/bin/python bench/bert_encoder.py            # print the markdown report (~2 min)
    .venv/bin/python bench/bert_encoder.py --write    # also write docs/benchmarks.md

Needs the dev extras (torch and sentence-transformers for the torch column) and the packaged
MiniLM. It also checks that the three agree: the largest difference in the gate's
probability over the development prompts.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from salon.backends.bert import BertLayer, BertWeights, Encoder
from salon.backends.embeddings import MiniLM, packaged_model_folder
from salon.safety.datasets import DATA, read_prompts
from salon.safety.harm import clipped, default_classifier

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
BATCH = 32  # memory search embeds stored memories in batches of this size


# --- the alternative: salon's numpy forward pass before ONNX Runtime, as it was (session 14) ---


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


def numpy_encode(bert: BertWeights, layers: Sequence[BertLayer], ids: I64, mask: F32) -> F32:
    """Token states (b, n, hidden) for padded ids and a 0/1 attention mask, through the
    model's own layers or the given stack."""
    b, n = ids.shape
    x = bert.word[ids] + bert.position[:n] + bert.token_type0
    x = _layer_norm(x, bert.ln_g, bert.ln_b, bert.eps)
    mask_add = ((np.float32(1.0) - mask) * np.float32(np.finfo(np.float32).min))[:, None, None, :]
    for layer in layers:
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


# --- torch: transformers' BertModel with the same weights --------------------------------------


def torch_encoders(tuned_path: str) -> tuple[Callable[[I64, F32], F32], Callable[[I64, F32], F32]]:
    """The plain model and the gate's stack (its own layers with the tuned ones loaded over)."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    model = SentenceTransformer(str(packaged_model_folder()), device="cpu")[0].auto_model.eval()
    tuned = model.__class__(model.config, add_pooling_layer=False).eval()
    tuned.load_state_dict(model.state_dict(), strict=False)
    with np.load(tuned_path) as data:
        state = {k: torch.tensor(data[k]) for k in data.files if k.startswith("encoder.")}
    tuned.load_state_dict(state, strict=False)

    def run(net: Any) -> Callable[[I64, F32], F32]:
        def encode(ids: I64, mask: F32) -> F32:
            with torch.inference_mode():
                out = net(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            states: F32 = out.last_hidden_state.numpy()
            return states

        return encode

    return run(model), run(tuned)


# --- the measurement --------------------------------------------------------------------------


def pooled(states: F32, mask: F32) -> F32:
    summed = np.einsum("bnh,bn->bh", states, mask)
    v = summed / mask.sum(axis=1, keepdims=True)
    out: F32 = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def batch_of(rows: Sequence[list[int]]) -> tuple[I64, F32]:
    n = max(len(r) for r in rows)
    ids = np.zeros((len(rows), n), dtype=np.int64)
    mask = np.zeros((len(rows), n), dtype=np.float32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1.0
    return ids, mask


def ms(samples: Sequence[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    return f"{statistics.median(ordered) * 1e3:.2f} / {p95 * 1e3:.2f}"


def run() -> str:
    classifier = default_classifier()
    tuned, model = classifier.tuned, classifier.embedder
    assert tuned is not None and isinstance(model, MiniLM), "needs the packaged MiniLM"
    bert = model.load_weights()._bert
    assert bert is not None
    stacks = {
        "gate": (*bert.layers[: tuned.start], *tuned.layers),
        "memory": bert.layers,
    }
    built: dict[str, Encoder] = {}
    build_s: dict[str, float] = {}
    for name, layers in stacks.items():
        start = time.perf_counter()
        built[name] = Encoder(bert, layers)
        build_s[name] = time.perf_counter() - start
    torch_memory, torch_gate = torch_encoders(str(DATA / "harm_tuned.npz"))
    engines: dict[str, dict[str, Callable[[I64, F32], F32]]] = {
        "gate": {
            "onnxruntime": built["gate"],
            "numpy": lambda i, m: numpy_encode(bert, stacks["gate"], i, m),
            "torch": torch_gate,
        },
        "memory": {
            "onnxruntime": built["memory"],
            "numpy": lambda i, m: numpy_encode(bert, stacks["memory"], i, m),
            "torch": torch_memory,
        },
    }
    tokenizer = model._tokenizer
    dev = [clipped(r.prompt, tuned.max_words).strip() for r in read_prompts(DATA / "dev.csv")]
    everyday = [r.prompt.strip() for r in read_prompts(DATA / "everyday.csv")]
    rows = [
        ("gate", "development prompts, as the gate reads them", dev),
        ("gate", "everyday requests, as the gate reads them", everyday),
    ]
    lines = [
        "| prompts | stack | n | tokens p50 / max | onnxruntime ms p50 / p95 | numpy | torch "
        "| numpy / onnxruntime (median of per-prompt ratios) | torch / onnxruntime |",
        "|---|---|---:|---|---|---|---|---:|---:|",
    ]
    agreement = []
    for stack, label, texts in rows:
        ids = [e.ids for e in tokenizer.encode_batch(texts)]
        for row in ids[:10]:  # warm-up
            for engine in engines[stack].values():
                engine(*batch_of([row]))
        times: dict[str, list[float]] = {name: [] for name in engines[stack]}
        worst = 0.0
        for row in ids:
            outputs = {}
            for name, engine in engines[stack].items():
                ids_, mask = batch_of([row])
                start = time.perf_counter()
                outputs[name] = engine(ids_, mask)
                times[name].append(time.perf_counter() - start)
            p = {
                name: 1 / (1 + math.exp(-(float(pooled(s, mask)[0] @ tuned.weights) + tuned.bias)))
                for name, s in outputs.items()
            }
            worst = max(
                worst, abs(p["onnxruntime"] - p["numpy"]), abs(p["onnxruntime"] - p["torch"])
            )
        agreement.append((label, worst))
        ratios = {
            name: statistics.median(
                t / o for t, o in zip(times[name], times["onnxruntime"], strict=True)
            )
            for name in ("numpy", "torch")
        }
        lengths = sorted(len(r) for r in ids)
        lines.append(
            f"| {label} | {stack} | {len(ids)} | "
            f"{statistics.median(lengths):.0f} / {lengths[-1]} | "
            f"{ms(times['onnxruntime'])} | {ms(times['numpy'])} | {ms(times['torch'])} | "
            f"{ratios['numpy']:.2f} | {ratios['torch']:.2f} |"
        )
    # Memory search: stored memories embedded BATCH at a time (whole texts, up to 256 tokens).
    texts = everyday * 2
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    batches = [batch_of(ids[i : i + BATCH]) for i in range(0, len(ids), BATCH)]
    seconds = {name: 0.0 for name in engines["memory"]}
    for ids_, mask in batches:
        for name, engine in engines["memory"].items():
            start = time.perf_counter()
            engine(ids_, mask)
            seconds[name] += time.perf_counter() - start
    rates = " | ".join(f"{len(texts) / s:.0f}" for s in seconds.values())
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return "\n".join(
        [
            "## BERT encoder: numpy against ONNX Runtime (memory search, harm gate)",
            "",
            f"Command: `.venv/bin/python bench/bert_encoder.py --write` ({when}, "
            f"{platform.machine()}, Python {platform.python_version()}, "
            f"{os.cpu_count()} cores). One thread each, as served (the chat model has the "
            "others). The same weights in all three: onnxruntime runs the graph "
            "`backends/bert.py` builds (shipped); numpy is salon's forward pass before it; "
            "torch is transformers' BertModel. One prompt per call, the three interleaved "
            "prompt by prompt; the gate's stack is MiniLM's first "
            f"{tuned.start} layers and its fine-tuned ones, reading at most "
            f"{tuned.max_words} words.",
            "",
            *lines,
            "",
            f"Memory search's batches ({len(texts)} everyday requests, {BATCH} a batch), texts "
            "a second, onnxruntime | numpy | torch: " + rates + ".",
            "",
            "Agreement, the gate's tuned-head probability, largest difference from onnxruntime "
            "to either other: "
            + "; ".join(f"{label} {worst:.1e}" for label, worst in agreement)
            + ". Building an encoder (graph and session, weights pre-packed) took "
            f"{build_s['gate'] * 1e3:.0f} ms for the gate's stack and "
            f"{build_s['memory'] * 1e3:.0f} ms for the plain model's, once per process; "
            f"peak RSS of this process (all three engines loaded): {rss:.0f} MB.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    bench_report.publish("bert-encoder", run(), args.write)


if __name__ == "__main__":
    main()
