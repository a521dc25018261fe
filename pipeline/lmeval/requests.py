"""Pure helpers of the lm-eval adapter: request seeds, tokenization, batching, stop sequences.

Nothing here touches the network; :mod:`pipeline.lmeval.adapter` composes these pieces.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Hashable, Sequence


def request_seed(seed: int, *parts) -> int:
    """A 63-bit seed for one request from the run's ``seed`` and what identifies the request (its
    kind, its text, its generation settings, its repeat number). It depends on nothing else, so a
    request draws the same randomness whatever batch, order, shard or task list it comes in."""
    blob = json.dumps([int(seed), *parts], sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


def occurrences(keys: Sequence[Hashable]) -> list[int]:
    """For each key, how many equal keys came before it: lm-eval repeats a request ``repeats`` times
    with the same arguments, and each repeat must draw its own randomness.

    ``occurrences(["a", "b", "a"]) == [0, 0, 1]``."""
    seen: dict[Hashable, int] = defaultdict(int)
    out = []
    for key in keys:
        out.append(seen[key])
        seen[key] += 1
    return out


def encode_pair(tok, context: str, continuation: str, bos: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a loglikelihood request.

    The pair is tokenized as one string and split where the context's own tokens end, so the
    continuation's ids are those the model sees after that context (a subword tokenizer may merge
    across the boundary otherwise); spaces at the end of the context move to the continuation first.
    With ``bos`` the tokenizer's begin-of-sequence id leads the context (training documents start
    with it), which also gives an empty context one token to condition on."""
    moved = len(context) - len(context.rstrip(" "))
    if moved:
        context, continuation = context[:-moved], context[-moved:] + continuation
    head = [tok.bos_id] if bos and tok.bos_id is not None and tok.bos_id >= 0 else []
    ctx = tok.encode(context) if context else []
    whole = tok.encode(context + continuation)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else tok.encode(continuation)
    return head + ctx, cont


def fit_left(ids: list[int], room: int) -> list[int]:
    """The last ``room`` ids (the prompt's start is dropped first, as lm-eval's models do)."""
    return ids[-room:] if len(ids) > room else ids


def batches(keys: Sequence[Hashable], size: int) -> list[list[int]]:
    """Indices into ``keys`` in batches of at most ``size``, each batch of one key (rows of one
    length), keys in sorted order and indices ascending within a key, so the split depends only on
    the requests and ``size``."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    out = []
    for key in sorted(groups):
        idx = groups[key]
        out += [idx[s:s + size] for s in range(0, len(idx), size)]
    return out


def stop_sequences(until) -> list[str]:
    """lm-eval's ``until`` (a string, a list of strings or None) as a list of non-empty strings."""
    if until is None:
        return []
    if isinstance(until, str):
        until = [until]
    return [s for s in until if isinstance(s, str) and s]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop sequence (the stop itself excluded)."""
    end = len(text)
    for stop in stops:
        at = text.find(stop)
        if 0 <= at < end:
            end = at
    return text[:end]


def until_eos(ids: list[int], ends: set[int]) -> list[int]:
    """``ids`` up to (not including) the first id in ``ends`` (EOS, pad)."""
    for i, t in enumerate(ids):
        if t in ends:
            return ids[:i]
    return ids
