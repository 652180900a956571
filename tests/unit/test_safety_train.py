"""Honest evaluation on the training prompts: each is judged by a fold model that never saw it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from salon.safety.datasets import read_prompts, resolve_split, training_prompts
from salon.safety.harm import EmbeddedHarmClassifier
from salon.safety.train import cross_validated_classifier, folds, gate_oof, save_oof


def test_folds_cover_every_prompt_once_and_keep_contrast_twins_together() -> None:
    rows = training_prompts()
    split = folds(rows)
    tested = sorted(i for _, te in split for i in te)
    assert tested == list(range(len(rows)))
    fold_of = {i: k for k, (_, te) in enumerate(split) for i in te}
    by_group: dict[str, set[int]] = {}
    for i, row in enumerate(rows):
        by_group.setdefault(row.group, set()).add(fold_of[i])
    assert all(len(f) == 1 for f in by_group.values())


def test_cross_validated_scores_differ_from_the_shipped_model_on_seen_prompts() -> None:
    full = EmbeddedHarmClassifier.load()  # the TF-IDF head alone keeps this test fast
    rows = training_prompts()
    cv = cross_validated_classifier(full, rows)
    seen = rows[:60]
    shipped = [full.assess(r.prompt).harmful_probability for r in seen]
    honest = [cv.assess(r.prompt).harmful_probability for r in seen]
    # a model that saw a prompt is more confident about its label than one that did not
    margin = sum(abs(p - 0.5) for p in shipped) - sum(abs(p - 0.5) for p in honest)
    assert margin > 0
    # text the training set does not hold goes to the full model
    other = "How do I make a sourdough starter from scratch?"
    assert cv.assess(other) == full.assess(other)


def test_out_of_fold_scores_are_kept_for_the_same_rows_only(tmp_path: Path) -> None:
    rows = training_prompts()[:6]
    cache = tmp_path / "oof.npz"
    scores = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7]
    save_oof(cache, rows, scores)
    assert gate_oof(rows, cache) == scores  # no fine-tuning: the kept scores answer
    relabelled = [replace(rows[0], label="unsafe" if rows[0].label == "safe" else "safe")]
    with np.load(cache) as saved:
        kept = str(saved["key"])
    save_oof(cache, [*relabelled, *rows[1:]], scores)
    with np.load(cache) as saved:
        assert str(saved["key"]) != kept  # a relabelled prompt is other data


def test_fold_fine_tunings_are_kept_for_the_same_rows_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sentence_transformers")
    from salon.backends.embeddings import MiniLM
    from salon.safety import train

    everything = training_prompts()
    rows = [r for r in everything if r.unsafe][:12] + [r for r in everything if not r.unsafe][:12]
    data = train.tuned_data(rows, MiniLM.load())
    tr = list(range(0, len(rows), 2))
    fitted = train.fold_tuned(rows, data, 0, tr, tmp_path)
    assert (tmp_path / "tuned_fold0.npz").exists()
    texts = [r.prompt for r in rows[1::2]]

    def no_fitting(*_: object) -> object:
        raise AssertionError("fine-tuned again")

    monkeypatch.setattr(train, "fit_tuned", no_fitting)
    kept = train.fold_tuned(rows, data, 0, tr, tmp_path)
    assert kept.probabilities(texts, data.embedder) == fitted.probabilities(texts, data.embedder)
    with pytest.raises(AssertionError, match="fine-tuned again"):
        train.fold_tuned(rows, data, 1, tr, tmp_path)  # another fold
    relabelled = [replace(rows[0], label="safe"), *rows[1:]]
    with pytest.raises(AssertionError, match="fine-tuned again"):
        train.fold_tuned(relabelled, data, 0, tr, tmp_path)  # other data


@pytest.mark.parametrize("split", ["heldout", "multilingual"])
def test_the_held_out_prompts_stay_out_of_training(split: str) -> None:
    held = read_prompts(resolve_split(split))
    assert len(held) >= 150 and {r.label for r in held} == {"safe", "unsafe"}
    trained = {" ".join(r.prompt.lower().split()) for r in training_prompts()}
    assert not [r.uid for r in held if " ".join(r.prompt.lower().split()) in trained]


def test_the_refusal_detector_alone_is_what_the_shipped_one_is(tmp_path: Path) -> None:
    """`train --refusal` on the shipped replies gives the shipped detector back, and replaces
    only the refusal section of the report."""
    from salon.safety.refusal import RefusalDetector
    from salon.safety.train import REFUSAL_HEADING, read_replies, refusal_only

    report = tmp_path / "report.md"
    report.write_text(
        f"## Harm\n\nkept\n\n{REFUSAL_HEADING}\n\nstale numbers\n\n## Compared\n\nkept too\n"
    )
    artefact = tmp_path / "refusal.json.gz"
    assert refusal_only(read_replies(), False, artefact, report) == 0
    text = report.read_text()
    assert "stale numbers" not in text and "| whole reply |" in text
    assert text.startswith("## Harm\n\nkept\n") and text.endswith("## Compared\n\nkept too\n")
    ours, shipped = RefusalDetector.load(artefact), RefusalDetector.load()
    replies = ["I'm sorry, but I can't help with that.", "Sure! Run `kill -9 1234` to stop it."]
    for reply in replies:
        assert ours.score(reply).probability == pytest.approx(shipped.score(reply).probability)
    assert ours.score(replies[0]).is_refusal() and not ours.score(replies[1]).is_refusal()


def test_the_fine_tuned_head_is_the_average_of_its_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    """One fine-tuning's seed moves the gate's operating point (docs/benchmarks.md, session
    15), so the shipped head averages the weights of one fine-tuning per seed."""
    pytest.importorskip("sentence_transformers")
    from salon.backends.embeddings import MiniLM
    from salon.safety import train

    everything = training_prompts()
    rows = [r for r in everything if r.unsafe][:8] + [r for r in everything if not r.unsafe][:8]
    data = train.tuned_data(rows, MiniLM.load())
    idx = list(range(0, len(rows), 2))
    fitted = {}
    for seeds in ((1,), (2,), (1, 2)):
        monkeypatch.setattr(train, "TUNED_SEEDS", seeds)
        fitted[seeds] = train.fit_tuned(data, idx)[1]
    one, two, both = fitted[(1,)], fitted[(2,)], fitted[(1, 2)]
    assert set(both) == set(one)
    assert not np.allclose(one["head.weight"], two["head.weight"])
    np.testing.assert_allclose(both["head.weight"], (one["head.weight"] + two["head.weight"]) / 2)
    np.testing.assert_allclose(both["head.bias"], (one["head.bias"] + two["head.bias"]) / 2)
    layer = "encoder.layer.5.output.dense.weight"
    mean = (one[layer].astype(np.float32) + two[layer].astype(np.float32)) / 2
    np.testing.assert_allclose(both[layer].astype(np.float32), mean, atol=1e-3)


def test_the_topic_heads_pairs_stay_out_of_the_other_sets() -> None:
    """minors.csv trains the topic head alone: not the harm classifier, and none of its
    prompts is one of the held-out set's, which measures the head."""
    from salon.safety.train import TOPIC_FILE, topic_data

    own = read_prompts(TOPIC_FILE)
    assert len(own) == 300 and sum(r.unsafe for r in own) == 150
    norm = {" ".join(r.prompt.lower().split()) for r in own}
    others = [*training_prompts(), *read_prompts(resolve_split("heldout"))]
    assert not [r.uid for r in others if " ".join(r.prompt.lower().split()) in norm]
    texts, labels, _ = topic_data(training_prompts())
    on_topic = {t for t, on in zip(texts, labels, strict=True) if on}
    assert on_topic == {r.prompt for r in own if r.unsafe}
    # training prompts that may be about the topic (child safety, sexual content) teach neither side
    assert not [
        r.uid for r in training_prompts() if r.category == "child_safety" and r.prompt in texts
    ]


def test_the_topic_head_retrained_is_the_shipped_one(tmp_path: Path) -> None:
    from salon.safety.harm import TOPIC_ARTEFACT, TUNED_ARTEFACT, TopicHead
    from salon.safety.train import TOPIC_HEADING, topic_only

    report = tmp_path / "report.md"
    report.write_text(f"## Harm\n\nkept\n\n{TOPIC_HEADING}\n\nstale numbers\n")
    artefact = tmp_path / "topic.json"
    assert topic_only(False, artefact, report) == 0
    text = report.read_text()
    assert text.startswith("## Harm\n\nkept\n") and "stale numbers" not in text
    assert "| minors.csv, harmful | 150 |" in text
    ours, shipped = (
        TopicHead.load(artefact, TUNED_ARTEFACT),
        TopicHead.load(TOPIC_ARTEFACT, TUNED_ARTEFACT),
    )
    assert ours is not None and shipped is not None
    assert np.allclose(ours.weights, shipped.weights, atol=1e-3)
    assert ours.bias == pytest.approx(shipped.bias, abs=1e-3)
