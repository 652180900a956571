"""backends/bert.py: the ONNX Runtime graph against transformers' BertModel on the same
random weights, so the graph is checked on a shape of its own (not only all-MiniLM-L6-v2's),
with padding in the batch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from salon.backends.bert import BertWeights, Encoder, load_bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, BertWeights]:
    """A small random BERT (3 layers, 4 heads, hidden 32), saved as salon loads one."""
    torch.manual_seed(7)
    config = transformers.BertConfig(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(str(folder), safe_serialization=True)
    return model, load_bert(folder / "model.safetensors", config.to_dict())


def _batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    lengths = [5, 17, 1, 12]
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    mask = np.zeros(ids.shape, dtype=np.float32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, 101, n)
        mask[i, :n] = 1.0
    return ids, mask


def test_the_graph_computes_what_bert_computes(reference: tuple[Any, BertWeights]) -> None:
    model, weights = reference
    ids, mask = _batch()
    with torch.inference_mode():
        expected = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state.numpy()
    ours = Encoder(weights)(ids, mask)
    real = mask.astype(bool)  # padded positions are never read
    assert ours.shape == expected.shape
    assert np.abs(ours[real] - expected[real]).max() < 1e-4


def test_padding_does_not_change_a_row(reference: tuple[Any, BertWeights]) -> None:
    _, weights = reference
    encoder = Encoder(weights)
    ids, mask = _batch()
    together = encoder(ids, mask)
    for i in range(len(ids)):
        n = int(mask[i].sum())
        alone = encoder(ids[i : i + 1, :n], mask[i : i + 1, :n])
        assert np.abs(alone[0] - together[i, :n]).max() < 1e-5


def test_a_given_stack_replaces_the_model_s_layers(reference: tuple[Any, BertWeights]) -> None:
    """The first layer alone is what BERT's first layer gives, not the whole model."""
    model, weights = reference
    ids, mask = _batch()
    with torch.inference_mode():
        states = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            output_hidden_states=True,
        ).hidden_states
    ours = Encoder(weights, weights.layers[:1])(ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - states[1].numpy()[real]).max() < 1e-4
    assert np.abs(ours[real] - states[-1].numpy()[real]).max() > 1e-2
