"""Incremental detokenization and stop strings for streaming.

Text is emitted only when it is stable: never a broken UTF-8 character (the
tokenizer's replacement character ``\\ufffd`` at the end means a multi-byte
character is still incomplete), and never the beginning of a stop string that
may still complete.
"""

from __future__ import annotations


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas.

    Decodes a small window ``ids[prefix:]`` each time instead of the whole
    sequence, the way streaming servers do: the text of ``ids[prefix:read]``
    was already emitted, the rest is new.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the newly stable text."""
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            delta = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""  # not stable yet (an incomplete character): held until a later token completes it

    def flush(self) -> str:
        """Whatever is left at the end (a trailing incomplete character included)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :] if after.startswith(before) else ""


class StopStringMatcher:
    """Finds stop strings in streamed text and holds back possible partial matches."""

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = [s for s in (stops or []) if s]
        self.text = ""  # all text received
        self.emitted = 0  # characters of ``text`` released so far

    def push(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was hit)."""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += delta
        if not self.stops:
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out, False
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.emitted : cut] if cut > self.emitted else ""
            self.emitted = max(self.emitted, cut)
            self.text = self.text[:cut]
            return out, True
        hold = self._partial_suffix()
        safe = len(self.text) - hold
        out = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def finish(self) -> str:
        """Release what was held back (the stream ended without a stop)."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


def detokenize(
    decoder: IncrementalDecoder, matcher: StopStringMatcher, ids: list[int], last: bool
) -> tuple[str, int | None]:
    """Feed one step's new tokens to ``decoder`` and ``matcher``; ``last``: no tokens follow (flush the decoder).

    Returns the text safe to emit and, when a stop string was hit, how many of ``ids`` it took to complete it
    (else None). With stop strings the tokens go in one at a time, so that a step of several tokens ends where
    plain decoding, one token a step, would have ended: the reply, its token ids and its token count do not
    depend on how many tokens a step accepted.
    """
    if not matcher.stops:
        return matcher.push(decoder.add(ids) + (decoder.flush() if last else ""))[0], None
    text = ""
    for i, token in enumerate(ids):
        out, hit = matcher.push(decoder.add([token]) + (decoder.flush() if last and i == len(ids) - 1 else ""))
        text += out
        if hit:
            return text, i + 1
    return text, None
