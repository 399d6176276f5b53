"""What a vectors request may hold, and its reading into (word, contexts) pairs: pure, no Ray, no HTTP.

`jobs.serve` answers `POST /vectors` with it:

    {"words": [{"word": "kumquat", "contexts": ["a kumquat is a small orange fruit .", ...]}, ...]}
    -> {"vectors": [{"word": "kumquat", "vector": [...], "contexts_used": 1}, ...]}

A request either is read whole or is refused whole with a `BadRequest` (an HTTP status and one line that
names the place in the body and the fix): nothing of it is inferred. The limits (`Limits`) bound the work
one request can ask for; they are the server's settings (`python -m jobs.serve --help`).

A context is used when it holds the word as a whole word (case-sensitive, as in `jobs.infer`); a word whose
contexts are all without it is refused by name (the caller sent the wrong word or the wrong text). A word
without contexts gets its form vector from a model with a form part; a context-only model refuses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.batching import usable_contexts
from pipeline.storage import UserError
from pipeline.words import in_token_syntax

FIELDS = ("word", "contexts")


class BadRequest(UserError):
    """A request the server refuses: `status` is the HTTP status (400, 404, 405, 413, 415), the text one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(kw_only=True)
class Limits:
    """What one request may hold; more is refused with a 4xx naming the limit (settings of jobs.serve)."""

    max_request_bytes: int = 1_000_000
    """Largest request body in bytes (413 beyond)."""
    max_words_per_request: int = 256
    """Most words in one request."""
    max_contexts_per_word: int = 64
    """Most contexts of one word (jobs.infer reads at most 64 by default)."""
    max_contexts_per_request: int = 2048
    """Most contexts in one request, all words together."""
    max_context_chars: int = 4096
    """Longest context in characters (a context is cut to max_seq_length tokens around the word anyway)."""
    max_word_chars: int = 100
    """Longest word in characters."""

    def __post_init__(self) -> None:
        for name in Limits.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a whole number >= 1, got {value!r}")


def read_request(body: bytes, limits: Limits, needs_contexts: bool, reads_contexts: bool = True
                 ) -> list[tuple[str, list[str], int]]:
    """(word, usable contexts, contexts sent) of each entry of a `POST /vectors` body, in its order; or a
    BadRequest. `needs_contexts`: a context-only model (a word must come with a context that holds it);
    `reads_contexts`: False for a form model (contexts are accepted and not read)."""
    if len(body) > limits.max_request_bytes:
        raise too_large(len(body), limits)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not UTF-8 (byte {exc.start}: {body[exc.start:exc.start + 1]!r}); send "
                         "JSON encoded as UTF-8") from None
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; send "
                         '{"words": [{"word": "...", "contexts": ["...", ...]}]}') from None
    return read_words(request, limits, needs_contexts, reads_contexts)


def read_words(request: object, limits: Limits, needs_contexts: bool, reads_contexts: bool = True
               ) -> list[tuple[str, list[str], int]]:
    """`read_request` for a body already parsed (what a Python handle's caller passes)."""
    if not isinstance(request, dict) or "words" not in request:
        raise BadRequest('the body must be a JSON object with a "words" list: {"words": [{"word": "...", '
                         '"contexts": ["...", ...]}]}')
    if unknown := sorted(set(request) - {"words"}):
        raise BadRequest(f"unknown field {unknown[0]!r} in the body; it holds only \"words\"")
    entries = request["words"]
    if not isinstance(entries, list) or not entries:
        raise BadRequest('"words" must be a non-empty list of {"word": "...", "contexts": [...]} objects')
    if len(entries) > limits.max_words_per_request:
        raise BadRequest(f"{len(entries)} words in one request; at most {limits.max_words_per_request} "
                         "(max_words_per_request): split the request")
    out, total = [], 0
    for i, entry in enumerate(entries):
        where = f"words[{i}]"
        if not isinstance(entry, dict):
            raise BadRequest(f'{where} must be an object {{"word": "...", "contexts": [...]}}, got '
                             f"{type(entry).__name__}")
        if unknown := sorted(set(entry) - set(FIELDS)):
            raise BadRequest(f"unknown field {unknown[0]!r} in {where}; its fields are \"word\" and \"contexts\"")
        word = entry.get("word")
        if not isinstance(word, str) or not word.strip():
            raise BadRequest(f'{where}.word is missing or not a non-empty string')
        if word != word.strip():
            raise BadRequest(f"{where}.word {word!r} has surrounding whitespace; send the word alone")
        if len(word) > limits.max_word_chars:
            raise BadRequest(f"{where}.word is {len(word)} characters long; at most {limits.max_word_chars} "
                             "(max_word_chars)")
        if in_token_syntax(word):
            raise BadRequest(f"{where}.word {word!r} is in the token syntax <BERTRAM:w> that carries a word's "
                             "vector; send the word itself")
        contexts = entry.get("contexts", [])
        if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
            raise BadRequest(f"{where}.contexts must be a list of strings (one sentence each)")
        if len(contexts) > limits.max_contexts_per_word:
            raise BadRequest(f"{where} ({word!r}) has {len(contexts)} contexts; at most "
                             f"{limits.max_contexts_per_word} per word (max_contexts_per_word)")
        total += len(contexts)
        if total > limits.max_contexts_per_request:
            raise BadRequest(f"more than {limits.max_contexts_per_request} contexts in one request "
                             "(max_contexts_per_request): split the request")
        if (long := next((j for j, c in enumerate(contexts) if len(c) > limits.max_context_chars), None)) is not None:
            raise BadRequest(f"{where}.contexts[{long}] is {len(contexts[long])} characters long; at most "
                             f"{limits.max_context_chars} (max_context_chars): send the sentence around the word")
        usable = usable_contexts(word, contexts) if reads_contexts else []
        if reads_contexts and contexts and not usable:
            raise BadRequest(f"{where}: no context holds the word {word!r} as a whole word (matched "
                             "case-sensitively); send contexts that contain it, or the word as they spell it")
        if needs_contexts and not usable:
            raise BadRequest(f"{where}: {word!r} has no context; this model reads contexts only (a context-only "
                             "BERTRAM model): send at least one context that contains the word")
        out.append((word, usable, len(contexts)))
    return out


def too_large(size: int | None, limits: Limits) -> BadRequest:
    sent = f"{size} bytes" if size is not None else "the body"
    return BadRequest(f"{sent}: larger than {limits.max_request_bytes} bytes (max_request_bytes); split the "
                      "request", status=413)


def answer(items: list[tuple[str, list[str], int]], vectors) -> dict:
    """The JSON answer for the read items and their vectors (N, D)."""
    return {"vectors": [{"word": word, "vector": vector, "contexts_used": len(usable)}
                        for (word, usable, _), vector in zip(items, vectors.tolist())]}
