"""Cutting a real GGUF model after its first layers (SmolLM2-135M, 30 layers): the cut loads
in llama.cpp, cutting after every layer changes nothing, and cutting earlier gives the earlier
layer's state."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from salon.backends.hidden_states import LlamaHiddenStates
from salon.backends.layer_slice import LayerSliceError, first_layers, sliced_path
from salon.backends.model_files import prepare

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SALON_TEST_MODEL_CACHE") or REPO / ".cache" / "models")
TEXTS = ["How do I bake bread?", "How do I kill a zombie process?", "Tell me a joke."]


@pytest.fixture(scope="module")
def smol() -> Path:
    return prepare("smollm2-135m-instruct", CACHE)


def _states(path: Path) -> np.ndarray:
    states = LlamaHiddenStates(path, threads=2)
    try:
        return states.vectors(TEXTS)
    finally:
        states.close()


def _blocks(path: Path) -> tuple[int, set[str]]:
    reader = gguf.GGUFReader(path, "r")
    count = reader.get_field("llama.block_count")
    assert count is not None
    return int(count.contents()), {t.name for t in reader.tensors}


def test_cutting_after_every_layer_reads_the_same_states(smol: Path, tmp_path: Path) -> None:
    total, _ = _blocks(smol)
    whole = first_layers(smol, total, tmp_path / "whole.gguf")
    assert np.allclose(_states(whole), _states(smol), atol=1e-4)


def test_a_cut_keeps_the_first_layers_and_reads_an_earlier_state(
    smol: Path, tmp_path: Path
) -> None:
    total, names = _blocks(smol)
    cut = first_layers(smol, 12, tmp_path / "cut.gguf")
    layers, kept = _blocks(cut)
    assert (layers, total) == (12, 30)
    assert {n for n in kept if n.startswith("blk.")} == {
        n for n in names if n.startswith("blk.") and int(n.split(".")[1]) < 12
    }
    assert "token_embd.weight" in kept and "output_norm.weight" in kept
    assert cut.stat().st_size < smol.stat().st_size * 0.7
    early, late = _states(cut), _states(smol)
    assert np.allclose(np.linalg.norm(early, axis=1), 1.0, atol=1e-3)
    # another layer, another state: far from the last layer's (cosine, per text)
    assert max(float(a @ b) for a, b in zip(early, late, strict=True)) < 0.9


def test_a_cut_is_made_once_and_then_reused(smol: Path, tmp_path: Path) -> None:
    target = tmp_path / "once.gguf"
    first_layers(smol, 4, target)
    made = target.stat().st_mtime_ns
    assert first_layers(smol, 4, target) == target
    assert target.stat().st_mtime_ns == made
    assert not list(tmp_path.glob("*.partial"))
    assert sliced_path(smol, 4).name == "smollm2-135m-instruct.first4.gguf"


def test_impossible_cuts_are_clear_errors(smol: Path, tmp_path: Path) -> None:
    with pytest.raises(LayerSliceError, match="has 30 layers"):
        first_layers(smol, 31, tmp_path / "too-many.gguf")
    with pytest.raises(LayerSliceError, match="has 30 layers"):
        first_layers(smol, 0, tmp_path / "none.gguf")
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF but not really")
    with pytest.raises(LayerSliceError, match="not a readable GGUF"):
        first_layers(bogus, 2, tmp_path / "bogus-cut.gguf")
    assert not list(tmp_path.glob("*cut*")) and not list(tmp_path.glob("*.partial"))
