"""The shipped test doubles: the text seam's, deterministic and scripted by model name (below),
and the hidden-states seam's (`FakeHiddenStates`).

- `echo`: replies "You said: <last user message>" word by word.
- `slow`: streams "w1 w2 … wN" with a delay per word (N = max_tokens, default 400) —
  long enough to stop, refresh or re-attach mid-stream; continuing an answer goes on
  from the word after the last one.
- `fail`: streams a few words, then fails as a backend dying mid-stream does.
- `down`: fails before the first token, as an unreachable backend does.
- `markdown`: a fixed reply with a heading, a list and a fenced code block.
- `prompt`: replies with everything it was sent, one `[role] content` block per message,
  exactly — what tests read to see what a model really receives.
- `loop`: starts an answer, then falls into a loop, writing one sentence again and again
  (300 times, ~13,000 characters) as a small model sometimes does.
- `styled`: a cheerful fixed reply with emoji, a heading and a list, in English — one that
  many style settings reject, to exercise their enforcement.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from salon.domain import CompletionRequest, Finished, FinishReason, StreamEvent, TextDelta, Usage
from salon.errors import BackendError, BackendUnavailable, UnknownModel

MARKDOWN_REPLY = "## Result\n\nHere is a list:\n\n- one\n- two\n\n```python\nprint('hello')\n```\n"
STYLED_REPLY = (
    "## Great question! 🎉\n\nHere are the steps 😀:\n\n- Open the settings\n"
    "- Pick what you like\n- Save it ✅\n\nThat is all there is to it."
)
LOOP_SENTENCE = "All work and no play makes Jack a dull boy."
CHUNK = 16


class FakeBackend:
    def __init__(self, delay_s: float = 0.03) -> None:
        self._delay_s = delay_s

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]:
        if request.model in ("prompt", "styled"):
            async for event in _chunks(_fixed(request), request):
                yield event
            return
        words, delay = self._script(request)
        if request.model == "down":
            raise BackendUnavailable("fake backend 'down' is unreachable")
        limit = request.params.max_tokens
        # Continuing an answer (the last message is the assistant's): go on after it.
        continuing = bool(request.messages) and request.messages[-1].role == "assistant"
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        produced = 0
        for index, word in enumerate(words):
            if limit is not None and produced >= limit:
                yield Finished(FinishReason.LENGTH, Usage(prompt_tokens, produced))
                return
            if request.model == "fail" and index == 3:
                raise BackendUnavailable("fake backend 'fail' died mid-stream")
            if delay:
                await asyncio.sleep(delay)
            produced += 1
            yield TextDelta(word if index == 0 and not continuing else " " + word)
        yield Finished(FinishReason.STOP, Usage(prompt_tokens, produced))

    def _script(self, request: CompletionRequest) -> tuple[list[str], float]:
        model = request.model
        if model in ("echo", "fail", "down"):
            last_user = next(
                (m.content for m in reversed(request.messages) if m.role == "user"), ""
            )
            words = ["You", "said:", *last_user.split()]
            return (words if model == "echo" else [*words, "and", "more", "words"]), 0.0
        if model == "slow":
            count = request.params.max_tokens or 400
            last = request.messages[-1] if request.messages else None
            done = len(last.content.split()) if last and last.role == "assistant" else 0
            return [f"w{i}" for i in range(done + 1, count + 1)], self._delay_s
        if model == "markdown":
            return MARKDOWN_REPLY.split(" "), 0.0
        if model == "loop":
            return ["Here", "is", "my", "answer:", *LOOP_SENTENCE.split() * 300], 0.0
        raise UnknownModel(f"the fake backend has no model {model!r}")

    async def close(self) -> None:
        return None


def _fixed(request: CompletionRequest) -> str:
    if request.model == "styled":
        return STYLED_REPLY
    return "\n".join(f"[{m.role}] {m.content}" for m in request.messages)


async def _chunks(text: str, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]:
    """`text` in fixed-size pieces: every character arrives as it was (no re-spacing)."""
    pieces = [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]
    limit = request.params.max_tokens
    prompt_tokens = sum(len(m.content.split()) for m in request.messages)
    for produced, piece in enumerate(pieces):
        if limit is not None and produced >= limit:
            yield Finished(FinishReason.LENGTH, Usage(prompt_tokens, produced))
            return
        await asyncio.sleep(0)
        yield TextDelta(piece)
    yield Finished(FinishReason.STOP, Usage(prompt_tokens, len(pieces)))


class FakeHiddenStates:
    """The hidden-states seam's double: a text containing a key of `script` gets that vector
    (the first key found, case-insensitive), any other text zeros of `dim`; with `fail`, every
    call fails as a model that cannot load does. `texts` records what was read."""

    def __init__(
        self, script: Mapping[str, Sequence[float]], dim: int, *, fail: bool = False
    ) -> None:
        self._script = {k.lower(): np.asarray(v, dtype=np.float32) for k, v in script.items()}
        self._dim = dim
        self._fail = fail
        self.texts: list[str] = []

    def vectors(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if self._fail:
            raise BackendError("the fake hidden states were told to fail")
        self.texts.extend(texts)
        return np.stack([self._vector(t.lower()) for t in texts])

    def _vector(self, text: str) -> npt.NDArray[np.float32]:
        for key, vector in self._script.items():
            if key in text:
                return vector
        return np.zeros(self._dim, dtype=np.float32)

    def close(self) -> None:
        pass
