"""A BERT encoder's forward pass, run by ONNX Runtime on weights held as numpy arrays.

Why ONNX Runtime and not numpy (what salon used before) or torch: the harm gate embeds every
user turn once, one prompt at a time, and has a 20 ms p95 budget. numpy spent it on OpenBLAS
matmuls sized for large batches and on one pass over memory per elementwise step; ONNX
Runtime's kernels, with the weights pre-packed once and bias and GELU fused, run the same
float32 arithmetic 1.15-1.5 times as fast for such a prompt, and agree with it to ~3e-6
(docs/benchmarks.md, "BERT encoder: numpy against ONNX Runtime"). torch stays out: pip
resolves it to a multi-GB CUDA build for most users.

The graph is built here from the weights already in memory, for any stack of layers (the
model's own, or its first layers then fine-tuned ones: the harm classifier's tuned head). So
no exported model file has to ship or be kept in step with the weights. The weights reach
ONNX Runtime as external initializers, not serialised into the model; the session still keeps
a copy of its own (40-50 MB for MiniLM's six layers, pre-packed). The word-embedding table
(47 MB) stays out of it: looking rows up is numpy's work, before the graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

# The ONNX opset the graph is written for: 20 has Gelu and LayerNormalization as plain ops.
OPSET = 20
# The model's IR version, stamped rather than left to the installed onnx package (1.23 stamps
# 14): 9 is the oldest that carries opset 20, so any onnxruntime from 1.17 reads the graph
# whichever onnx built it.
IR_VERSION = 9


@dataclass(frozen=True, slots=True)
class BertLayer:
    """One transformer layer's weights, laid out as `x @ W` (input features first)."""

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
class BertWeights:
    word: F32
    position: F32
    token_type0: F32
    ln_g: F32
    ln_b: F32
    layers: tuple[BertLayer, ...]
    heads: int
    eps: float


def load_bert(path: Path, config: Mapping[str, Any]) -> BertWeights:
    """The weights of a BERT checkpoint (`model.safetensors`) with its `config.json`."""
    from safetensors.numpy import load_file

    raw = load_file(str(path))
    # Checkpoints saved from BertForX carry a "bert." prefix; the encoder is the same.
    w = {k.removeprefix("bert."): v.astype(np.float32, copy=False) for k, v in raw.items()}
    return BertWeights(
        word=w["embeddings.word_embeddings.weight"],
        position=w["embeddings.position_embeddings.weight"],
        token_type0=w["embeddings.token_type_embeddings.weight"][0],
        ln_g=w["embeddings.LayerNorm.weight"],
        ln_b=w["embeddings.LayerNorm.bias"],
        layers=bert_layers(w, range(int(config["num_hidden_layers"]))),
        heads=int(config["num_attention_heads"]),
        eps=float(config.get("layer_norm_eps", 1e-12)),
    )


def bert_layers(w: Mapping[str, F32], indices: Iterable[int]) -> tuple[BertLayer, ...]:
    """Layers `indices` of a BERT encoder from its weights as torch names them
    (`encoder.layer.{i}.…`, float32)."""

    def linear(prefix: str) -> tuple[F32, F32]:
        # torch stores (out, in); transpose once here so the graph computes x @ W.
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


class Encoder:
    """Token states (b, n, hidden) of padded token ids through a BERT's embeddings and a
    stack of layers (the model's own unless given). Thread-safe to call; one thread per call,
    as the gate runs beside the chat model's own threads on small machines."""

    def __init__(self, weights: BertWeights, layers: Sequence[BertLayer] | None = None) -> None:
        import onnxruntime as ort

        self._weights = weights
        graph = _Graph(weights.heads, weights.eps, int(weights.word.shape[1]))
        model = graph.build(weights, weights.layers if layers is None else layers)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        # Without the arena a 32 × 256 batch returns its ~0.5 GB of scratch after the call;
        # with it the process would keep that for good. One prompt runs as fast either way.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        # Kept alive with the session, as ONNX Runtime requires of external initializers: it
        # may read them in place (the matmul weights it copies, pre-packed).
        self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in graph.external.values()]
        options.add_external_initializers(list(graph.external), self._values)
        self._session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, ids: I64, mask: F32) -> F32:
        """`ids` (b, n) int64 and `mask` (b, n) float32, 1 for a token and 0 for padding."""
        w = self._weights
        embedded = w.word[ids] + w.position[: ids.shape[1]] + w.token_type0
        feed = {"embedded": embedded.astype(np.float32, copy=False), "mask": mask}
        out: F32 = self._session.run(["states"], feed)[0]
        return out


class _Graph:
    """Writes the ONNX graph, node by node. Small constants go inline; weights are named
    here and handed over as external initializers (`external`)."""

    def __init__(self, heads: int, eps: float, hidden: int) -> None:
        from onnx import TensorProto, helper

        self._helper = helper
        self._tensor = TensorProto
        self.heads, self.eps, self.hidden = heads, eps, hidden
        self.nodes: list[Any] = []
        self.inline: list[Any] = []
        self.external: dict[str, F32] = {}

    def build(self, weights: BertWeights, layers: Sequence[BertLayer]) -> Any:
        h = self._helper
        x = self._embeddings(weights)
        # (1 - mask) * float32 min on the key axis: padded keys get a logit that loses to all.
        lowest = self._constant("lowest", np.array(np.finfo(np.float32).min, dtype=np.float32))
        one = self._constant("one", np.array(1.0, dtype=np.float32))
        key_axes = self._constant("key_axes", np.array([1, 2], dtype=np.int64))
        free = self._op("Mul", [self._op("Sub", [one, "mask"]), lowest])
        mask_add = self._op("Unsqueeze", [free, key_axes])
        for i, layer in enumerate(layers):
            x = self._layer(f"layer{i}", x, layer, mask_add)
        self.nodes.append(h.make_node("Identity", [x], ["states"]))
        graph = h.make_graph(
            self.nodes,
            "bert",
            [
                h.make_tensor_value_info("embedded", self._tensor.FLOAT, ["b", "n", self.hidden]),
                h.make_tensor_value_info("mask", self._tensor.FLOAT, ["b", "n"]),
            ],
            [h.make_tensor_value_info("states", self._tensor.FLOAT, ["b", "n", self.hidden])],
            initializer=[*self.inline, *map(self._declared, self.external)],
        )
        return h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], ir_version=IR_VERSION)

    def _embeddings(self, weights: BertWeights) -> str:
        """The input is the sum of a token's word, position and token-type rows (`Encoder`)."""
        return self._norm("embedded", "embeddings", weights.ln_g, weights.ln_b)

    def _layer(self, name: str, x: str, layer: BertLayer, mask_add: str) -> str:
        hd = self.hidden // self.heads
        qkv = self._linear(f"{name}.qkv", x, layer.w_qkv, layer.b_qkv)
        # (b, n, 3, heads, hd) -> (3, b, heads, n, hd), then Q, K and V apart
        split = self._constant(f"{name}.split", np.array([0, 0, 3, self.heads, hd], np.int64))
        parts = self._op("Transpose", [self._op("Reshape", [qkv, split])], perm=[2, 0, 3, 1, 4])
        q, k, v = (
            self._op("Gather", [parts, self._constant(f"{name}.{i}", np.array(i, np.int64))])
            for i in range(3)
        )
        scale = self._constant(f"{name}.scale", np.array(1 / math.sqrt(hd), dtype=np.float32))
        scores = self._op("MatMul", [q, self._op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = self._op("Add", [self._op("Mul", [scores, scale]), mask_add])
        ctx = self._op("MatMul", [self._op("Softmax", [scores], axis=-1), v])
        joined = self._constant(f"{name}.join", np.array([0, 0, self.hidden], np.int64))
        ctx = self._op("Reshape", [self._op("Transpose", [ctx], perm=[0, 2, 1, 3]), joined])
        attended = self._linear(f"{name}.out", ctx, layer.w_out, layer.b_out)
        x = self._norm(self._op("Add", [x, attended]), f"{name}.ln1", layer.ln1_g, layer.ln1_b)
        inner = self._op("Gelu", [self._linear(f"{name}.in", x, layer.w_in, layer.b_in)])
        ffn = self._linear(f"{name}.ffn", inner, layer.w_ffn_out, layer.b_ffn_out)
        return self._norm(self._op("Add", [x, ffn]), f"{name}.ln2", layer.ln2_g, layer.ln2_b)

    def _linear(self, name: str, x: str, w: F32, b: F32) -> str:
        product = self._op("MatMul", [x, self._weight(f"{name}.w", w)])
        return self._op("Add", [product, self._weight(f"{name}.b", b)])

    def _norm(self, x: str, name: str, gamma: F32, beta: F32) -> str:
        return self._op(
            "LayerNormalization",
            [x, self._weight(f"{name}.g", gamma), self._weight(f"{name}.b", beta)],
            axis=-1,
            epsilon=self.eps,
        )

    def _op(self, op: str, inputs: list[str], **attributes: Any) -> str:
        out = f"t{len(self.nodes)}"
        self.nodes.append(self._helper.make_node(op, inputs, [out], **attributes))
        return out

    def _constant(self, name: str, value: npt.NDArray[Any]) -> str:
        from onnx import numpy_helper

        self.inline.append(numpy_helper.from_array(value, name))
        return name

    def _weight(self, name: str, value: F32) -> str:
        self.external[name] = np.ascontiguousarray(value, dtype=np.float32)
        return name

    def _declared(self, name: str) -> Any:
        """A weight's declaration in the model: shape and type, its data left outside."""
        tensor = self._tensor()
        tensor.name = name
        tensor.data_type = self._tensor.FLOAT
        tensor.dims.extend(self.external[name].shape)
        tensor.data_location = self._tensor.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", "given-at-session-start"
        return tensor
