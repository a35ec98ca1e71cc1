"""One request's text as its tokens come: incremental decoding (a character split across tokens
waits for its last byte) and stop strings (text that could still be the start of a stop string
is held back; a completed stop string ends the request and is not sent)."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0            # characters handed to the client so far
        self.stopped = False     # a stop string was completed
        self.text = ""           # everything decoded (cut at the stop string once stopped)

    def push(self, token: int) -> str:
        """Add a token; returns the text that became final with it (maybe empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, text = True, text[:cut]
            self.text = text
            return self._release(text)
        self.text = text
        return self._release(text[:len(text) - _held_back(text, self.stops)])

    def finish(self) -> str:
        """The rest of the text once generation ended without a stop string."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(self.text)

    def _release(self, final: str) -> str:
        piece = final[self.sent:] if len(final) > self.sent else ""
        self.sent = max(self.sent, len(final))
        return piece


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that a stop string starts with (not yet final)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
