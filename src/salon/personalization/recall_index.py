"""In-memory hybrid (BM25 + embedding) retrieval over one user's memories and messages.

Layout, chosen for the latency budget (p95 ≤ 50 ms at 10k items, ≤ 100 ms at 100k):

* vectors live in one contiguous (capacity, dim) matrix that grows geometrically, so the
  semantic pass is a single BLAS mat-vec; float32 by default (`vector_dtype=np.float16` halves
  memory at some speed cost — numpy has no float16 BLAS, so it is upcast chunk by chunk);
* per-row metadata (created-at, kind, live flag, token count) sit in parallel numpy arrays;
* the lexical side is BM25 over an inverted index: term -> (array('i') rows, array('f') tf),
  read zero-copy with np.frombuffer and scattered into a dense score array;
* removal (and upsert, which is remove + append) only tombstones a row; once a quarter of the
  rows are dead the matrix and postings are compacted. Until then document frequencies still
  count dead rows, a small, temporary skew in idf.

Scoring. Candidates are the top `CANDIDATES` rows of each signal (plus the best rows inside
a time window the query names). They are fused, then priors are added:

* fusion "weighted" (default): W_SEM·cosine + W_LEX·bm25_norm, where bm25_norm divides BM25 by
  the score of an average-length document containing every query term once (≈ Σ idf), so it
  is roughly "share of the query's rare words matched" and comparable across queries;
  fusion "rrf": reciprocal-rank fusion Σ 1/(RRF_K + rank), rescaled so 1.0 = first in both.
  Both were measured on the labelled set in tests/unit/test_recall_index.py (recall@5 with
  MiniLM): see bench/memory_search.py's output and docs/benchmarks.md.
* time window: + WINDOW_BOOST when the query names a period (timeparse) containing the item;
* recency: + RECENCY_WEIGHT · 0.5^(age / HALF_LIFE_DAYS) — mild, so that among near-equal
  matches the newer wins (an updated fact outranks the old one) but a clearly better match
  still beats a newer weak one;
* kind: + MEMORY_PRIOR for "memory" items, which are distilled and so denser than messages.

Tokenisation (both documents and queries): lowercase, unicode word characters (\\w+), function
words of en/fr/es/de/it/pt/nl dropped, then stemming chosen per text by `guess_language` (the
language whose function words the text uses most): Snowball for fr/es/de/it/pt/nl
("corro"/"correre" -> "corr"), and for English (also the default) light suffix stripping
(plural -s/-es/-ies, -ing, -ed, final -e, doubled final consonant), crude but symmetric, so
"moved"/"moving"/"move" all meet at "mov". Stems are cached (an LRU of 65,536 words), so a
text costs ~10-20 µs once its words have been seen. Scripts without spaces (CJK) become one
token per run; the embedding carries those. A text also gets a term per concept of a
person's life that its words name (`concepts`: "Beruf", "arbeite", "trabajo" -> "@occupation"),
so that a question meets the fact it asks about across wording and language.

Thread safety: one lock around every public method; searches of different users' indexes do
not contend.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from array import array
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from salon.personalization.concepts import concept_terms
from salon.personalization.timeparse import find_time_cue, strip_time_phrase

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Fusion = Literal["weighted", "rrf"]

# BM25
K1 = 1.2
B = 0.75
# Fusion and priors (score units: cosine-like, ~0..1)
W_SEM = 0.75
W_LEX = 0.35
RRF_K = 60
CANDIDATES = 100
WINDOW_BOOST = 0.15
RECENCY_WEIGHT = 0.03
HALF_LIFE_DAYS = 30.0
MEMORY_PRIOR = 0.02
# Storage
INITIAL_CAPACITY = 256
COMPACT_FRACTION = 0.25
COMPACT_MIN_DEAD = 64
_CHUNK = 16384  # rows per float16 -> float32 upcast in the semantic pass

# Function words only (NLTK-style, trimmed): content words, names and numbers all stay.
_STOPWORD_TEXT = (
    "a about above after again against all am an and any are as at be because been before "
    "being below between both but by can could did do does doing don down during each few "
    "for from further had has have having he her here hers herself him himself his how i if "
    "in into is it its itself just me more most my myself no nor not now of off on once only "
    "or other our ours ourselves out over own same she should so some such than that the "
    "their theirs them themselves then there these they this those through to too under "
    "until up very was we were what when where which while who whom why will with would you "
    "your yours yourself yourselves s t ll re ve d m"
)
# The same for the other languages salon's memory is tested in: without them "qué", "mi",
# "je", "ich" count as terms and make any question match any question of the same shape.
_STOPWORDS_FR = (
    "au aux avec ce ces c ça cette comment dans de des du elle en est et étais était eu il ils "
    "je j l la le les leur lui ma mais me m mes moi mon ne n nos notre nous on ou où par pas "
    "pour qu que quel quelle quels quelles qui sa se s ses son sur ta te t tes toi ton tu un une "
    "vos votre vous y suis es sont être ai as a avons avez ont fait est-ce quoi"
)
_STOPWORDS_ES = (
    "a al algo como cómo con cual cuál cuales cuándo cuando de del donde dónde el él ella en "
    "es esta está este esto estoy fue ha he la las le les lo los me mi mis muy nos o para pero "
    "por que qué quien quién se ser si sí sin sobre soy su sus te tengo tu tú un una uno y ya yo"
)
_STOPWORDS_DE = (
    "aber als am an auch auf aus bei bin bist bis da das dass dem den der des die dir doch du "
    "ein eine einem einen einer es für hab habe hat ich ihr im in ist ja kann mein meine meinem "
    "meinen meiner mich mir mit nach nicht noch oder sein sich sie sind so um und uns von war "
    "was welche welcher welches wer wie wir wo zu zum zur"
)
_STOPWORDS_IT = (
    "a ad agli ai al all alla alle allo anche c che chi ci come con cosa cui da dai dal dalla "
    "degli dei del della delle dello di dove e è ed fra gli ha hai hanno ho i il in io la le "
    "lei lo loro lui ma me mi mia mie miei mio ne negli nei nel nella nelle nello noi non o "
    "per perché più può posso puoi qual quale quali quando quanto quella quelle quelli quello "
    "questa queste questi questo se sei si sia siamo siete sono su sua sue sul sulla suo suoi "
    "ti tra tu tua tue tuo tuoi un una uno vi voi"
)
# Portuguese and Dutch: not in the shipped cases, common enough to expect.
_STOPWORDS_PT = (
    "a ao aos as à às com como da das de do dos e é ela elas ele eles em era essa esse esta "
    "estas este estes eu foi há isso isto já lhe mas me meu meus minha minhas na nas não no "
    "nos nós num numa o os ou para por qual quais que quem se sem seu seus sou sua suas são "
    "também te tem tenho teu tua um uma umas uns você vocês"
)
_STOPWORDS_NL = (
    "aan al als bij dat de die dit een en er had heb hebt heeft het hij hoe hun ik in is je "
    "jij kan maar me met mij mijn na naar niet nog of om ons onze ook op te tot uit van voor "
    "waar wanneer waarom wat we welke wie wij zij zijn"
)
_FUNCTION_WORDS: dict[str, frozenset[str]] = {
    lang: frozenset(text.split())
    for lang, text in (
        ("en", _STOPWORD_TEXT),  # first: English wins ties, and so keeps its own stemmer
        ("fr", _STOPWORDS_FR),
        ("es", _STOPWORDS_ES),
        ("de", _STOPWORDS_DE),
        ("it", _STOPWORDS_IT),
        ("pt", _STOPWORDS_PT),
        ("nl", _STOPWORDS_NL),
    )
}
STOPWORDS = frozenset().union(*_FUNCTION_WORDS.values())
# Snowball stemmers by language; English keeps the light stemmer below, which the labelled
# English set was measured with.
SNOWBALL = {
    "fr": "french",
    "es": "spanish",
    "de": "german",
    "it": "italian",
    "pt": "portuguese",
    "nl": "dutch",
}
_WORD = re.compile(r"\w+")
_stemmers = threading.local()  # snowball stemmers keep per-call state: one set per thread


def _by_word(vocabularies: dict[str, frozenset[str]]) -> dict[str, tuple[str, ...]]:
    """function word -> the languages that use it, in `vocabularies`' order."""
    out: dict[str, tuple[str, ...]] = {}
    for lang, vocabulary in vocabularies.items():
        for word in vocabulary:
            out[word] = (*out.get(word, ()), lang)
    return out


_LANGUAGES_OF = _by_word(_FUNCTION_WORDS)


def guess_language(words: Sequence[str]) -> str | None:
    """The language whose function words `words` (lower-cased) use most; None when they use
    none (a name, a keyword, a number). Ties go to the language listed first, English first.

    Stemming is chosen per text with it. Short texts are the norm here ("Was ist mein
    Beruf?") and function words are what they have, so this counts them rather than asking
    a character-n-gram identifier; it costs a dict lookup a word and loads nothing."""
    hits: dict[str, int] = {}
    for word in words:
        for lang in _LANGUAGES_OF.get(word, ()):
            hits[lang] = hits.get(lang, 0) + 1
    if not hits:
        return None
    return max(_FUNCTION_WORDS, key=lambda lang: hits.get(lang, 0))  # first of the best


def _stem(word: str) -> str:
    """Light English stemming (see the module doc)."""
    if len(word) <= 3 or not word.isalpha():
        return word  # short words, numbers, codes: keep exact ("4521", "b12")
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith(("sses", "ches", "shes", "xes", "zes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if word.endswith("ing") and len(word) > 5:
        word = word[:-3]
    elif word.endswith("ed") and len(word) > 4:
        word = word[:-2]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsz":
        word = word[:-1]  # running -> runn -> run
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]  # move/moved/moving all become "mov"
    return word


@functools.lru_cache(maxsize=1 << 16)
def _snowball(lang: str, word: str) -> str:
    if len(word) <= 3 or not word.isalpha():
        return word
    stemmers: dict[str, Any] | None = getattr(_stemmers, "by_lang", None)
    if stemmers is None:
        stemmers = _stemmers.by_lang = {}
    stemmer = stemmers.get(lang)
    if stemmer is None:
        import snowballstemmer  # type: ignore[import-untyped]

        stemmer = stemmers[lang] = snowballstemmer.stemmer(SNOWBALL[lang])
    return str(stemmer.stemWord(word))


def analyse(text: str, default: str = "en") -> tuple[str | None, list[str]]:
    """The language `text`'s function words tell (None when it has none: "Pistache",
    "violoncello", "4471") and its terms, stemmed for that language or else for `default`."""
    return _stemmed(_WORD.findall(text.lower()), default)


def index_terms(text: str, default: str = "en") -> tuple[str | None, list[str]]:
    """`analyse`, plus the concept terms of the text's words: what the index stores and
    searches with."""
    words = _WORD.findall(text.lower())
    guessed, terms = _stemmed(words, default)
    return guessed, terms + concept_terms(words)


def _stemmed(words: list[str], default: str) -> tuple[str | None, list[str]]:
    guessed = guess_language(words)
    lang = guessed or default
    stem = functools.partial(_snowball, lang) if lang in SNOWBALL else _stem
    return guessed, [stem(w) for w in words if w not in STOPWORDS]


def tokenize(text: str, default: str = "en") -> list[str]:
    return analyse(text, default)[1]


@dataclass(frozen=True, slots=True)
class Item:
    key: str  # e.g. "memory:12" or "message:345"
    kind: str  # "memory" | "message"
    text: str
    created_at: datetime  # timezone-aware UTC
    vector: npt.NDArray[np.float32] = field(compare=False)  # (dim,) float32, L2-normalised


@dataclass(frozen=True, slots=True)
class Hit:
    key: str
    kind: str
    score: float
    lexical: float  # BM25 normalised to ~0..1 (see module doc)
    semantic: float  # cosine similarity


class _Postings:
    __slots__ = ("rows", "tf")

    def __init__(self) -> None:
        self.rows = array("i")
        self.tf = array("f")


class RecallIndex:
    def __init__(
        self,
        dim: int,
        *,
        fusion: Fusion = "weighted",
        vector_dtype: type[np.floating[Any]] = np.float32,
    ) -> None:
        self.dim = dim
        self.fusion: Fusion = fusion
        self._lock = threading.RLock()
        self._n = 0  # rows in use, dead ones included
        self._dead = 0
        self._vecs: npt.NDArray[np.floating[Any]] = np.zeros(
            (INITIAL_CAPACITY, dim), dtype=vector_dtype
        )
        self._created = np.zeros(INITIAL_CAPACITY, dtype=np.float64)  # unix seconds
        self._kind = np.zeros(INITIAL_CAPACITY, dtype=np.int16)
        self._alive = np.zeros(INITIAL_CAPACITY, dtype=bool)
        self._doclen = np.zeros(INITIAL_CAPACITY, dtype=np.float32)
        self._keys: list[str] = []
        self._row_of: dict[str, int] = {}
        self._kind_names: list[str] = []
        self._kind_codes: dict[str, int] = {}
        self._postings: dict[str, _Postings] = {}
        self._total_len = 0.0  # tokens in live rows, for BM25's average document length
        # Items per language their function words tell (added, never decremented: a majority
        # is all it is for). A text with none ("Pistache", "violoncello") is stemmed like
        # most of the items, query or item, so that a bare keyword meets its documents' stem.
        self._languages: Counter[str] = Counter()

    # ---------------------------------------------------------------------------- writes

    def __len__(self) -> int:
        return self._n - self._dead

    def add(self, items: Sequence[Item]) -> None:
        """Insert or replace (by key)."""
        if not items:
            return
        vectors = np.stack([np.asarray(it.vector, dtype=np.float32) for it in items])
        if vectors.shape != (len(items), self.dim):
            raise ValueError(f"item vectors must have shape ({self.dim},)")
        with self._lock:
            self._reserve(self._n + len(items))
            for item, vector in zip(items, vectors, strict=True):
                self._append(item, vector)

    def remove(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                row = self._row_of.pop(key, None)
                if row is not None:
                    self._tombstone(row)
            self._maybe_compact()

    def _append(self, item: Item, vector: F32) -> None:
        old = self._row_of.get(item.key)
        if old is not None:
            self._tombstone(old)
        if item.created_at.tzinfo is None:
            raise ValueError("Item.created_at must be timezone-aware")
        row = self._n
        self._n += 1
        lang, tokens = index_terms(item.text, self._main_language())
        if lang is not None:
            self._languages[lang] += 1
        self._vecs[row] = vector
        self._created[row] = item.created_at.timestamp()
        self._kind[row] = self._kind_code(item.kind)
        self._alive[row] = True
        self._doclen[row] = len(tokens)
        self._total_len += len(tokens)
        self._keys.append(item.key)
        self._row_of[item.key] = row
        for term, tf in Counter(tokens).items():
            postings = self._postings.get(term)
            if postings is None:
                postings = self._postings[term] = _Postings()
            postings.rows.append(row)
            postings.tf.append(tf)

    def _tombstone(self, row: int) -> None:
        if self._alive[row]:
            self._alive[row] = False
            self._dead += 1
            self._total_len -= float(self._doclen[row])

    def _main_language(self) -> str:
        return self._languages.most_common(1)[0][0] if self._languages else "en"

    def _kind_code(self, kind: str) -> int:
        code = self._kind_codes.get(kind)
        if code is None:
            code = self._kind_codes[kind] = len(self._kind_names)
            self._kind_names.append(kind)
        return code

    def _reserve(self, rows: int) -> None:
        capacity = self._vecs.shape[0]
        if rows <= capacity:
            return
        while capacity < rows:
            capacity *= 2  # geometric growth: amortised O(1) appends
        self._resize(capacity)

    def _resize(self, capacity: int) -> None:
        n = self._n

        def grow(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            out = np.zeros((capacity, *a.shape[1:]), dtype=a.dtype)
            out[:n] = a[:n]
            return out

        self._vecs = grow(self._vecs)
        self._created = grow(self._created)
        self._kind = grow(self._kind)
        self._alive = grow(self._alive)
        self._doclen = grow(self._doclen)

    def _maybe_compact(self) -> None:
        if self._dead >= max(COMPACT_MIN_DEAD, COMPACT_FRACTION * self._n):
            self.compact()

    def compact(self) -> None:
        """Drop tombstoned rows from the matrix and the postings (O(rows + postings))."""
        with self._lock:
            n = self._n
            keep = np.flatnonzero(self._alive[:n])
            new_row = np.full(n, -1, dtype=np.int64)
            new_row[keep] = np.arange(len(keep))
            for name in ("_vecs", "_created", "_kind", "_alive", "_doclen"):
                arr = getattr(self, name)
                arr[: len(keep)] = arr[keep]
                arr[len(keep) : n] = 0
            self._keys = [self._keys[i] for i in keep.tolist()]
            self._row_of = {key: i for i, key in enumerate(self._keys)}
            self._n, self._dead = len(keep), 0
            for term in list(self._postings):
                self._remap_postings(term, new_row)

    def _remap_postings(self, term: str, new_row: I64) -> None:
        old = self._postings[term]
        rows = np.frombuffer(old.rows, dtype=np.int32)
        mapped = new_row[rows]
        live = mapped >= 0
        if not live.any():
            del self._postings[term]
            return
        fresh = _Postings()
        fresh.rows.frombytes(mapped[live].astype(np.int32).tobytes())
        fresh.tf.frombytes(np.frombuffer(old.tf, dtype=np.float32)[live].tobytes())
        self._postings[term] = fresh

    # ---------------------------------------------------------------------------- search

    def search(
        self,
        query: str,
        query_vector: np.ndarray[Any, Any],
        k: int,
        *,
        now: datetime,
        kinds: Collection[str] | None = None,
    ) -> list[Hit]:
        """Top `k` items for the query, best first."""
        qv = np.asarray(query_vector, dtype=np.float32).reshape(-1)
        if qv.shape != (self.dim,):
            raise ValueError(f"query vector must have shape ({self.dim},)")
        with self._lock:
            if k <= 0 or len(self) == 0:
                return []
            return self._search(query, qv, k, now, kinds)

    def _search(
        self, query: str, qv: F32, k: int, now: datetime, kinds: Collection[str] | None
    ) -> list[Hit]:
        n = self._n
        allowed = self._allowed(n, kinds)
        cue = find_time_cue(query, now)
        sem = self._semantic(qv, n)
        terms = index_terms(strip_time_phrase(query, cue), self._main_language())[1]
        lex = self._bm25(terms, n)
        in_window = None
        if cue is not None:
            created = self._created[:n]
            in_window = (created >= cue.start.timestamp()) & (created < cue.end.timestamp())
        cands, sem_rank, lex_rank = self._candidates(sem, lex, allowed, in_window)
        if len(cands) == 0:
            return []
        if self.fusion == "rrf":
            base = self._rrf(cands, sem_rank, lex_rank)
        else:
            base = (np.float32(W_SEM) * sem[cands] + np.float32(W_LEX) * lex[cands]).astype(
                np.float32
            )
        score = base + self._priors(cands, now, in_window)
        order = np.argsort(-score, kind="stable")[:k]
        return [
            Hit(
                key=self._keys[row],
                kind=self._kind_names[self._kind[row]],
                score=float(score[i]),
                lexical=float(lex[row]),
                semantic=float(sem[row]),
            )
            for i, row in ((int(i), int(cands[i])) for i in order)
        ]

    def _allowed(self, n: int, kinds: Collection[str] | None) -> npt.NDArray[np.bool_]:
        allowed = self._alive[:n]
        if kinds is None:
            return allowed
        codes = [self._kind_codes[x] for x in kinds if x in self._kind_codes]
        return allowed & np.isin(self._kind[:n], codes)

    def _semantic(self, qv: F32, n: int) -> F32:
        if self._vecs.dtype == np.float32:
            return np.asarray(self._vecs[:n] @ qv, dtype=np.float32)  # no copy: already f32
        out = np.empty(n, dtype=np.float32)
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            out[start:stop] = self._vecs[start:stop].astype(np.float32) @ qv
        return out

    def _bm25(self, terms: list[str], n: int) -> F32:
        """BM25 of every row, divided by the score of an average-length row holding each
        query term once (Σ idf), and capped at 1."""
        scores = np.zeros(n, dtype=np.float32)
        live = len(self)
        if not terms or live == 0:
            return scores
        avgdl = max(self._total_len / live, 1.0)
        ideal = 0.0
        for term in dict.fromkeys(terms):  # unique, in order
            postings = self._postings.get(term)
            df = 0 if postings is None else len(postings.rows)
            idf = math.log(1.0 + (live - df + 0.5) / (df + 0.5))
            ideal += idf
            if postings is None:
                continue
            rows = np.frombuffer(postings.rows, dtype=np.int32)
            tf = np.frombuffer(postings.tf, dtype=np.float32)
            norm = K1 * (1 - B + B * self._doclen[rows] / avgdl)
            # rows are unique within one term's postings, so fancy += is safe
            scores[rows] += np.float32(idf) * tf * (K1 + 1) / (tf + norm)
        if ideal > 0:
            np.minimum(scores / np.float32(ideal), np.float32(1.0), out=scores)
        return scores

    def _candidates(
        self,
        sem: F32,
        lex: F32,
        allowed: npt.NDArray[np.bool_],
        in_window: npt.NDArray[np.bool_] | None,
    ) -> tuple[I64, dict[int, int], dict[int, int]]:
        """Union of the top rows by each signal, with 1-based ranks per list (for RRF)."""
        sem_top = _top(np.where(allowed, sem, -np.inf), CANDIDATES)
        lex_top = _top(np.where(allowed & (lex > 0), lex, -np.inf), CANDIDATES)
        parts = [sem_top, lex_top]
        if in_window is not None:
            parts.append(_top(np.where(allowed & in_window, sem, -np.inf), CANDIDATES))
        cands = np.unique(np.concatenate(parts))
        sem_rank = {int(r): i + 1 for i, r in enumerate(sem_top)}
        lex_rank = {int(r): i + 1 for i, r in enumerate(lex_top)}
        return cands, sem_rank, lex_rank

    def _rrf(self, cands: I64, sem_rank: dict[int, int], lex_rank: dict[int, int]) -> F32:
        def part(ranks: dict[int, int]) -> F32:
            r = np.array([ranks.get(int(c), 0) for c in cands], dtype=np.float32)
            return np.where(r > 0, 1.0 / (RRF_K + r), 0.0).astype(np.float32)

        out: F32 = (part(sem_rank) + part(lex_rank)) * np.float32((RRF_K + 1) / 2)
        return out

    def _priors(self, cands: I64, now: datetime, in_window: npt.NDArray[np.bool_] | None) -> F32:
        age_days = np.maximum(now.timestamp() - self._created[cands], 0.0) / 86400.0
        prior = RECENCY_WEIGHT * np.exp2(-age_days / HALF_LIFE_DAYS)
        memory_code = self._kind_codes.get("memory")
        if memory_code is not None:
            prior += MEMORY_PRIOR * (self._kind[cands] == memory_code)
        if in_window is not None:
            prior += WINDOW_BOOST * in_window[cands]
        out: F32 = prior.astype(np.float32)
        return out


def _top(values: F32, m: int) -> I64:
    """Indices of the m largest finite values, best first."""
    idx = np.argpartition(-values, m - 1)[:m] if len(values) > m else np.arange(len(values))
    idx = idx[np.isfinite(values[idx])]
    out: I64 = idx[np.argsort(-values[idx], kind="stable")].astype(np.int64)
    return out
