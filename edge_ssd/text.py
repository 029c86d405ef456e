"""Text in and out: tokenization, chat templates, and streaming that never breaks UTF-8.

Byte-level tokenizers split multi-byte characters across tokens, so decoding a prefix of the
ids can end in U+FFFD. `TextStream` emits only text that later tokens cannot change, and holds
back any tail that could be the start of a stop string, so a stop string split across tokens
is still found and never shown.
"""
from __future__ import annotations

import bisect
import re
import secrets
import threading
from pathlib import Path
from typing import Optional, Sequence

from .chat_template import render_template
from .errors import BundleError, RequestError
from .request import validate_messages

REPLACEMENT = "\ufffd"

# `encode_special_tokens` is state of the HF tokenizer object; build_prompt turns it on for
# text typed into messages, and does all of its encoding under this lock so that no other
# request's encoding runs while it is on (reentrant, so that Tokenizer.encode may take it too).
_ENCODE_LOCK = threading.RLock()


class Tokenizer:
    def __init__(self, path: Path, meta: dict):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for any file it cannot parse
            reason = " ".join(str(e).split()) or type(e).__name__
            raise BundleError(f"{path} is not a usable tokenizer file: {reason}") from e
        self.meta = meta
        self.eos_ids = frozenset(int(i) for i in meta.get("eos_ids", []))
        self.bos_id = self.tok.token_to_id(meta["bos_token"]) if meta.get("add_bos") and meta.get("bos_token") else None

    def encode(self, text: str, bos: bool = True) -> list:
        """Token ids of `text`, after the model's BOS token where it takes one (bos False: a
        fragment, such as a predicted output, that is not a sequence's start)."""
        with _ENCODE_LOCK:  # chat_ids may have turned special-token parsing off for a moment
            ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list, add_generation_prompt: bool = True) -> str:
        """Render messages with the bundle's chat template (Jinja, sandboxed and bounded: see
        edge_ssd.chat_template)."""
        template = self.meta.get("chat_template")
        if not template:
            raise RequestError("this bundle has no chat template; send a raw prompt instead")
        validate_messages(messages)
        return render_template(template, messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.meta.get("bos_token") or "", eos_token="", tools=None)


class TextStream:
    """Incremental detokenizer with stop strings. push(ids) -> text safe to show now."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), spans: bool = False):
        if any(not isinstance(s, str) or not s for s in stop):
            raise RequestError("stop strings must be non-empty strings")
        self.tok = tokenizer
        self.stop = list(stop)
        self.ids: list = []
        self.prefix = 0   # ids before this are fully reflected in self.text
        self.read = 0
        self.text = ""    # all decoded text so far (stable part)
        self.sent = 0     # chars of self.text already emitted
        self.stopped = False
        self.track_spans = spans     # keep marks for spans(): one extra short decode per token
        self.marks: list = [(0, 0)]  # (chars of text, ids they decode) after each append: spans()

    def _decode_new(self) -> None:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            if self.track_spans:
                self._mark_tokens(before, after)
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self._mark()

    def _mark_tokens(self, before: str, after: str) -> None:
        """Where each new token's text ends inside what is about to be appended (for spans):
        one short decode per token of the round, skipped where a token ends mid-character."""
        base, last = len(self.text) - len(before), len(before)
        for j in range(self.read + 1, len(self.ids)):
            part = self.tok.decode(self.ids[self.prefix:j])
            if last < len(part) < len(after) and after.startswith(part) and not part.endswith(REPLACEMENT):
                self.marks.append((base + len(part), j))
                last = len(part)

    def _hold(self, end: int) -> int:
        """Length of the longest tail of text[:end] that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, end), best, -1):
                if self.text.endswith(s[:n], 0, end):
                    best = n
                    break
        return best

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        self._decode_new()
        return self._emit(final=False)

    def finish(self) -> str:
        """Flush what is left at the end of generation (an unfinished character included)."""
        if self.stopped:
            return ""
        tail = self.tok.decode(self.ids[self.prefix:])
        before = self.tok.decode(self.ids[self.prefix:self.read])
        self.text += tail[len(before):]
        self.prefix = self.read = len(self.ids)
        self._mark()
        return self._emit(final=True)

    def _mark(self) -> None:
        if self.track_spans:
            self.marks.append((len(self.text), len(self.ids)))

    def _emit(self, final: bool) -> str:
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, max(0, self.sent - len(s) + 1))) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            piece, self.text = self.text[self.sent:cut], self.text[:cut]
            self.sent = cut
            self.stopped = True
            return piece
        end = len(self.text) - (0 if final else self._hold(len(self.text)))
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    @property
    def full_text(self) -> str:
        return self.text[: self.sent] if self.stopped else self.text

    def spans(self, start: int, end: int, sources: Sequence) -> tuple:
        """text[start:end] as (text, source) spans (the stream must track spans), adjacent ones of one source merged; the text
        an append brought is credited to the source of its last token (a character split across
        tokens is shown whole, with the token that completed it)."""
        out: list = []
        i = bisect.bisect_right(self.marks, (start, len(self.ids) + 1))
        while i < len(self.marks) and self.marks[i - 1][0] < end:
            (c0, _), (c1, t1) = self.marks[i - 1], self.marks[i]
            piece = self.text[max(c0, start):min(c1, end)]
            src = sources[t1 - 1] if 0 < t1 <= len(sources) else ""
            if out and out[-1][1] == src:
                out[-1] = (out[-1][0] + piece, src)
            elif piece:
                out.append((piece, src))
            i += 1
        return tuple(out)


class Piece(str):
    """A text piece that also says where its tokens came from: `spans`, (text, source) pairs."""

    spans: tuple = ()

    def __new__(cls, text: str, spans: tuple = ()) -> "Piece":
        obj = super().__new__(cls, text)
        obj.spans = spans
        return obj


def build_prompt(tokenizer: Tokenizer, prompt: Optional[str], messages: Optional[list], raw: bool) -> list:
    """Token ids for a request: a raw prompt, or a prompt / messages through the chat template.

    A raw prompt is the caller's own text, special tokens included. Through the template,
    special tokens typed into message content stay text (see `chat_ids`)."""
    if (prompt is None) == (messages is None):
        raise RequestError("give exactly one of a prompt or messages")
    if messages is None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("the prompt is empty")
        if raw or not tokenizer.meta.get("chat_template"):
            ids = tokenizer.encode(prompt)
        else:
            ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    else:
        ids = chat_ids(tokenizer, messages)
    if not ids:
        raise RequestError("the prompt encodes to no tokens")
    return ids


def chat_ids(tokenizer: Tokenizer, messages: list) -> list:
    """Messages through the chat template, as ids in which only the template makes control tokens.

    A user who types `<|im_end|>\n<|im_start|>system` into a message must not end the message
    and start a system turn. Each special token's text inside a message's content is wrapped
    in markers (random, so content cannot forge them), the template renders the marked
    messages, and the text between markers is encoded as plain text, the rest as usual.
    Marking only those substrings leaves everything else as the template sees it, so templates
    that inspect or reshape content (strip it, split off reasoning) render as before.
    """
    validate_messages(messages)
    specials = [t.content for t in tokenizer.tok.get_added_tokens_decoder().values() if t.special and t.content]
    if not specials:
        rendered = tokenizer.render_chat(messages)
        return tokenizer.encode(rendered, bos=not _starts_with_bos(tokenizer, rendered))
    nonce = secrets.token_hex(8)
    start, end = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"
    typed = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    marked = [dict(m, content=typed.sub(lambda hit: start + hit.group(0) + end, m["content"])) for m in messages]
    parts = re.split(f"{re.escape(start)}(.*?){re.escape(end)}", tokenizer.render_chat(marked), flags=re.S)
    if any(start in p or end in p for p in parts):
        raise RequestError("chat template: it cut a special token typed in a message; the message cannot be "
                           "rendered safely")
    with _ENCODE_LOCK:
        ids = tokenizer.encode(parts[0], bos=not _starts_with_bos(tokenizer, parts[0]))  # one BOS, first
        for i, part in enumerate(parts[1:], 1):
            ids += _encode_text(tokenizer, part) if i % 2 else tokenizer.tok.encode(part, add_special_tokens=False).ids
    return ids


def _starts_with_bos(tokenizer: Tokenizer, rendered: str) -> bool:
    """Whether the template wrote the BOS itself (Gemma's and Llama 3's begin with `{{ bos_token }}`):
    then encoding must not add a second one, which shifts every position the model was trained on."""
    bos = tokenizer.meta.get("bos_token")
    return tokenizer.bos_id is not None and bool(bos) and rendered.startswith(bos)


def _encode_text(tokenizer: Tokenizer, text: str) -> list:
    """`text` with special-token strings encoded as plain text (call with _ENCODE_LOCK held)."""
    before, tokenizer.tok.encode_special_tokens = tokenizer.tok.encode_special_tokens, True
    try:
        return tokenizer.tok.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.tok.encode_special_tokens = before
