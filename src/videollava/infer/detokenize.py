"""Incremental detokenization: each new token costs a decode of a few recent ids, not of the whole answer."""

from __future__ import annotations

from videollava.infer.request import Detokenizer

INCOMPLETE_CHARACTER = "\ufffd"  # what a decoder shows for the bytes of a character not yet complete


class IncrementalDecoder:
    """Text of a growing list of ids, decoded through a short window of recent ids.

    The window keeps the last emitted ids as left context: decoding a suffix alone can lose or gain a
    leading space (SentencePiece's word-start marker) or split a multi-byte character, so the new text
    is the window's decode minus its left context's decode. Text that ends in an incomplete character
    or in what may be a run of byte tokens waits in `pending` until the run ends.
    `text + pending` equals `decode(ids)`.
    """

    def __init__(self, detokenizer: Detokenizer):
        self.detokenizer = detokenizer
        self.ids: list[int] = []
        self.text = ""  # settled: never changes once here
        self.pending = ""  # what the decode of all ids shows after `text` now; may change with later ids
        self._prefix_offset = 0  # window start: left context for the ids after the read offset
        self._read_offset = 0  # ids before this are in `text`
        self._context_text: str | None = ""  # decode(ids[prefix_offset:read_offset]), once computed

    def push(self, token: int) -> str:
        """Add one id; return the text it settled (often empty while a character is incomplete)."""
        self.ids.append(token)
        if self._context_text is None:
            self._context_text = self.detokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
        known = self._context_text
        window = self.detokenizer.decode(self.ids[self._prefix_offset :])
        # SentencePiece's byte fallback decodes a run of byte tokens as a whole (one replacement character
        # per byte when the run is not UTF-8, its ASCII bytes included), so text settles only after a token
        # that cannot be a byte: one that alone shows more than one byte of text.
        alone = self.detokenizer.decode([token])
        in_byte_run = INCOMPLETE_CHARACTER in alone or len(alone.encode()) <= 1
        if in_byte_run or window.endswith(INCOMPLETE_CHARACTER) or len(window) <= len(known):
            self.pending = window[len(known) :]
            return ""
        new = window[len(known) :]
        self.text += new
        self.pending = ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self._context_text = None
        return new
