"""Token ids -> text deltas for streaming, with stop strings.

A token can end inside a multi-byte character (the decoder then yields U+FFFD) and a stop string can span tokens, so
text is released only once it is final: not ending in U+FFFD, and not a possible start of a stop string.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.text = ""
        self.stopped = False

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that could begin a stop string."""
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def add(self, token: int) -> str:
        """Append a token; returns the newly final text (sets `stopped` when a stop string appears)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = text[: min(hits)]
            return self._release(len(self.text))
        self.text = text
        if text.endswith("\ufffd"):
            return ""
        return self._release(len(text) - self._held_back(text))

    def flush(self) -> str:
        """The rest of the text at the end of the sequence (held-back stop prefixes that never completed)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent : upto]
        self.sent = upto
        return out
