"""The host loop of continuous batching: admit queued requests into free slots, step, stream
each request's tokens, free a slot when its request ends."""

import dataclasses
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, no_type_check

import jax
import numpy as np

from .._errors import ConfigError
from ._engine import DecodeEngine


@dataclasses.dataclass(frozen=True)
class Request:
    """One request for [`eqzoo.generation.serve`][]: a prompt and its decoding settings.

    - `prompt`: token ids, 1-D (a list or array), at least one.
    - `max_new_tokens`: its token budget (prompt + budget at most the engine's `max_len`).
    - `id`: any hashable name its events carry (default: its index in the requests).
    - `key`, `temperature`, `top_k`, `top_p`, `min_p`, `eos_token`: as
      [`eqzoo.generation.DecodeEngine.insert`][] takes them.
    """

    prompt: Any
    max_new_tokens: int
    id: Hashable | None = None
    key: Any = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    eos_token: int | Sequence[int] | None = None


class ServeEvent(NamedTuple):
    """New tokens of one request, as [`eqzoo.generation.serve`][] yields them.

    - `id`: the request's `id`.
    - `tokens`: int32 NumPy `(n,)`, its tokens decoded since its last event (an eos id it
      stopped at included); `n` may be 0 in a request's last event.
    - `done`: whether the request has ended (at an eos id or its `max_new_tokens`); its
      slot is free from the next step on.
    """

    id: Hashable
    tokens: np.ndarray
    done: bool


@no_type_check  # validated here, with messages that say how to fix the call
def serve(engine: DecodeEngine, requests: Iterable[Request], *, steps: int | None = None) -> Iterator[ServeEvent]:
    """Serve `requests` with continuous batching on `engine`: each free slot takes the next
    request (prefilled by `engine.insert`), every `engine.step` decodes up to `steps` tokens of
    every active slot in one compiled call, and a request that ends frees its slot for the next
    one at once.

    `requests` is read lazily, one request per free slot, so it may be a generator of requests
    as they arrive. Each request's arguments are checked when it is admitted. The host waits
    once per step call (to read the new tokens back), never per token.

    **Arguments:**

    - `engine`: a [`eqzoo.generation.DecodeEngine`][].
    - `requests`: an iterable of [`eqzoo.generation.Request`][]s.
    - `steps`: decode steps per call (default the engine's `steps_per_call`).

    **Returns:** an iterator of [`eqzoo.generation.ServeEvent`][]s, one per request that made
    progress in a step call, in slot order; each request's last event has `done=True`.
    """
    if not isinstance(engine, DecodeEngine):
        raise ConfigError(f"serve needs an eqzoo.generation.DecodeEngine, got {type(engine).__name__}.")
    pending = enumerate(iter(requests))
    state = engine.init_state()
    owners: dict[int, Hashable] = {}  # slot -> request id
    exhausted = False
    while True:
        for slot in range(engine.slots):
            if slot in owners or exhausted:
                continue
            state, owner, exhausted = _admit(engine, state, slot, pending)
            if owner is not None:
                owners[slot] = owner[0]
        if not owners:
            return
        state, tokens = engine.step(state, steps)
        tokens, active = jax.device_get((tokens, state.active))  # the one wait of the call
        for slot in sorted(owners):
            done = not bool(active[slot])
            yield ServeEvent(owners[slot], tokens[slot][tokens[slot] >= 0], done)
            if done:
                del owners[slot]


def _admit(engine, state, slot, pending) -> tuple:
    """Insert the next request into `slot`: `(state, (its id,) or None, whether none is left)`."""
    try:
        index, request = next(pending)
    except StopIteration:
        return state, None, True
    if not isinstance(request, Request):
        raise ConfigError(f"serve: requests must be eqzoo.generation.Request objects; request {index} is a "
                          f"{type(request).__name__}.")
    state = engine._insert(
        state, slot, request.prompt, max_new_tokens=request.max_new_tokens, key=request.key,
        temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, min_p=request.min_p,
        eos_token=request.eos_token,
    )
    return state, (index if request.id is None else request.id,), False
