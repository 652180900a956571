"""Log-probabilities in OpenAI's chunk shape (`choices[].logprobs.content`), which both the
HTTP backend's upstreams and llama.cpp (the embedded backend) send."""

from __future__ import annotations

from typing import Any

from salon.domain import TokenLogprobs


def openai_logprobs(value: Any) -> tuple[TokenLogprobs, ...]:
    """Per token, its `top_logprobs`. Entries that are not of that shape are skipped (they
    only ever refine a probability)."""
    content = value.get("content") if isinstance(value, dict) else None
    entries = content if isinstance(content, list) else []
    return tuple(TokenLogprobs(_top(entry)) for entry in entries if isinstance(entry, dict))


def _top(entry: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    top = entry.get("top_logprobs")
    candidates = top if isinstance(top, list) else []
    return tuple(
        (str(t["token"]), float(t["logprob"]))
        for t in candidates
        if isinstance(t, dict) and "token" in t and isinstance(t.get("logprob"), int | float)
    )
