"""The chat model's own reading of a request, as a second opinion for the harm gate.

A linear probe on the embedded chat model's final hidden state at the end of the user turn
(the position from which it would start answering): a logistic regression trained by
``python -m salon.safety.train_probe`` on the same prompts as the embedded classifier. A 1.5B
chat model knows far more about what a request means than the 22M-parameter sentence model the
embedded classifier reads, and the probe asks it nothing, so no prompt wording is involved
(the chat model as judge, guard.py, asks and reads one token). It costs one prompt evaluation
(~0.2-0.5 s on two cores for a typical turn, nothing generated), so the gate asks it only about
turns the embedded classifier does not clearly clear (`Probe.wanted`), and averages the two in
log-odds. The numbers are in `safety/data/probe_report.md`.

The probe belongs to one model file (the artefact records its catalog name and SHA-256): it is
used only when that file is present, whatever model the user chats with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from time import perf_counter

import numpy as np
import numpy.typing as npt

from salon.backends.hidden_states import HiddenStates
from salon.observability.metrics import GuardMetrics
from salon.safety.datasets import DATA
from salon.safety.harm import CATEGORY_FROM, CONTEXT_TURNS, Assessment, mixed

F32 = npt.NDArray[np.float32]
PROBE_ARTEFACT = DATA / "harm_probe.npz"
# The gate asks the probe about every turn the embedded classifier scores from PROBE_FROM up,
# those it would refuse included (the probe clears some of them). Only latency and what is
# refused up front depend on it: a turn it skips is read once the model refuses it, and
# recovery follows that reading (chat/safety.py). Session 18 (bench/probe_from.py: salon's gate
# with the policy's category thresholds, cross-validated): from 0.15 rather than 0.1 it reads
# 23 % of everyday requests instead of 34 %, with the same development-split decisions (8 safe
# refused, 25 harmful through), one everyday request fewer refused (9 of 661), the same
# held-out decisions, and the same answers on the 29 development prompts scored in [0.1, 0.15)
# through the whole pipeline. From 0.2: 26 through; from 0.3: 29.
PROBE_FROM = 0.15


@dataclass(frozen=True, slots=True)
class LinearHead:
    """Logistic regression(s) on standardised vectors: `weight` is (classes, dim); a binary
    head has one row and gives the probability of its positive class."""

    mean: F32
    scale: F32
    weight: F32
    bias: F32

    def logits(self, vectors: F32) -> F32:
        z = (vectors - self.mean) / self.scale
        return np.asarray(z @ self.weight.T + self.bias, dtype=np.float32)

    def probability(self, vector: F32) -> float:
        return float(1.0 / (1.0 + np.exp(-self.logits(vector[None, :])[0, 0])))

    def distribution(self, vector: F32) -> F32:
        z = self.logits(vector[None, :])[0]
        e = np.exp(z - z.max())
        return np.asarray(e / e.sum(), dtype=np.float32)


@dataclass(frozen=True, slots=True)
class ProbeModel:
    """The shipped probe: its model, how a turn is put to it, and its heads (the full ones,
    and each cross-validation fold's, for honest evaluation on the training prompts)."""

    model: str  # the embedded catalog name whose file it was trained on
    sha256: str
    template: str  # the chat template around one user turn; "{turn}" marks the turn
    max_chars: int
    # the probe reads the state after this many of the model's layers (the model file cut
    # there, backends/layer_slice.py); None: after all of them
    layers: int | None
    # how the state is pooled over the turn's tokens, the vectors concatenated in this order
    # (backends/hidden_states.py)
    poolings: tuple[str, ...]
    weight: float  # the probe's share of the log-odds average with the embedded classifier
    # added to the average's log-odds so that the policy's thresholds, chosen for the embedded
    # classifier alone, fall where the average should refuse (the trainer's choice)
    shift: float
    harm: LinearHead
    category: LinearHead
    categories: tuple[str, ...]
    folds: tuple[tuple[LinearHead, LinearHead], ...] = ()

    def combined(self, embedded: float, probe: float) -> float:
        """The two readings averaged in log-odds, shifted onto the policy's scale."""
        average = mixed([embedded], [probe], 1.0 - self.weight)[0]
        return shifted(average, self.shift)

    def prompt(self, turn: str) -> str:
        return self.template.replace("{turn}", turn.strip()[: self.max_chars])

    @classmethod
    def load(cls, path: Path = PROBE_ARTEFACT) -> ProbeModel:
        with np.load(path) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
        meta = arrays.pop("meta").item()
        if not isinstance(meta, str):
            raise ValueError(f"{path}: no metadata")
        info = json.loads(meta)

        def head(prefix: str) -> LinearHead:
            return LinearHead(*(arrays[f"{prefix}_{part}"].astype(np.float32) for part in _PARTS))

        folds = tuple(
            (head(f"fold{i}_harm"), head(f"fold{i}_category")) for i in range(info["folds"])
        )
        return cls(
            model=info["model"],
            sha256=info["sha256"],
            template=info["template"],
            max_chars=int(info["max_chars"]),
            layers=int(info["layers"]) if info.get("layers") else None,
            poolings=tuple(info.get("poolings", ["last"])),
            weight=float(info["weight"]),
            shift=float(info["shift"]),
            harm=head("harm"),
            category=head("category"),
            categories=tuple(info["categories"]),
            folds=folds,
        )


_PARTS = ("mean", "scale", "weight", "bias")


def shifted(p: float, shift: float) -> float:
    q = min(max(p, 1e-6), 1.0 - 1e-6)
    return float(1.0 / (1.0 + np.exp(-(np.log(q / (1.0 - q)) + shift))))


def head_arrays(prefix: str, head: LinearHead) -> dict[str, F32]:
    """A head's arrays under the names `ProbeModel.load` reads (for the trainer)."""
    return {f"{prefix}_{part}": getattr(head, part) for part in _PARTS}


@dataclass(frozen=True, slots=True)
class Probe:
    """The gate's second opinion. `by_prompt` maps training prompts to the fold heads that
    never saw them (evaluation only); every other turn is read by the full heads."""

    states: HiddenStates
    model: ProbeModel
    by_prompt: Mapping[str, tuple[LinearHead, LinearHead]] = field(default_factory=dict)
    name: str = "embedded+probe"
    # consultations (outcome safe / unsafe / error) and their time, under the guard metrics'
    # names with model "probe:<model>"
    metrics: GuardMetrics | None = None
    # the embedded classifier's score from which the probe reads a turn before it is answered
    start: float = PROBE_FROM

    def wanted(self, embedded: Assessment) -> bool:
        return embedded.harmful_probability >= self.start

    def alone(self) -> Probe:
        """This probe with its own reading deciding, the classifier's left out (shifted onto the
        policy's scale all the same): for turns the classifier cannot read, such as another
        language than the English it learnt from."""
        return replace(self, model=replace(self.model, weight=1.0))

    def assess(self, turn: str, embedded: Assessment, context: Sequence[str] = ()) -> Assessment:
        """Blocking (a prompt evaluation): call it from a worker thread. When the embedded
        verdict read the turn with the earlier user turns (a short follow-up), so does the
        probe: "ok, how much would be enough?" alone is harmless."""
        text = turn
        if embedded.used_context:
            recent = [c for c in context[-CONTEXT_TURNS:] if c.strip()]
            text = "\n".join([*recent, turn])
        start = perf_counter()
        try:
            vector = self.states.vectors([self.model.prompt(text)])[0]
        except Exception:
            self._observe("error", start)
            raise
        harm, category = self.by_prompt.get(turn.strip(), (self.model.harm, self.model.category))
        p = self.model.combined(embedded.harmful_probability, harm.probability(vector))
        self._observe("unsafe" if p >= CATEGORY_FROM else "safe", start)
        used, topic, p_topic = embedded.used_context, embedded.topic, embedded.topic_probability
        if p < CATEGORY_FROM:
            return Assessment(p, None, 0.0, used, self.name, topic, p_topic)
        if topic is not None:  # the classifier's topic head named the subject
            return Assessment(p, topic, p_topic, used, self.name, topic, p_topic)
        # the embedded classifier's category where it gave one with conviction, else the
        # probe's own. Session 18, cross-validated on the development split's and everyday
        # harmful prompts: the probe's head names the right category for 59 % (262 of 443),
        # the classifier's for 56 % of those it gives one (232 of 411; the probe's, 59 %):
        # no reason to prefer either, so the order stays.
        if embedded.category is not None and embedded.harmful_probability >= CATEGORY_FROM:
            return Assessment(p, embedded.category, embedded.category_probability, used, self.name)
        dist = category.distribution(vector)
        best = int(np.argmax(dist))
        return Assessment(p, self.model.categories[best], float(dist[best]), used, self.name)

    def _observe(self, outcome: str, start: float) -> None:
        if self.metrics is not None:
            self.metrics.consulted(outcome, perf_counter() - start)


def cross_validated(probe: Probe, fold_of: Sequence[tuple[str, int]]) -> Probe:
    """`probe` with each training prompt read by the fold heads that never saw it."""
    by_prompt = {prompt.strip(): probe.model.folds[i] for prompt, i in fold_of}
    return replace(probe, by_prompt=by_prompt, name="embedded+probe-cv")
