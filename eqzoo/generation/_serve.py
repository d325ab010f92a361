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
    - `key`, `temperature`, `top_k`, `top_p`, `min_p`, `eos_token`, `stop_sequences`: as
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
    stop_sequences: Sequence[Sequence[int]] | None = None


class ServeEvent(NamedTuple):
    """New tokens of one request, as [`eqzoo.generation.serve`][] yields them.

    - `id`: the request's `id`.
    - `tokens`: int32 NumPy `(n,)`, its tokens decoded since its last event (an eos id it
      stopped at included); `n` may be 0 in a request's last event.
    - `done`: whether the request has ended (at an eos id, a stop sequence or its
      `max_new_tokens`); `serve` has given its slot to a new request already, or does before
      the next step call it launches.
    """

    id: Hashable
    tokens: np.ndarray
    done: bool


@no_type_check  # validated here, with messages that say how to fix the call
def serve(engine: DecodeEngine, requests: Iterable[Request], *, steps: int | None = None) -> Iterator[ServeEvent]:
    """Serve `requests` with continuous batching on `engine`: free slots take the next
    requests (prefilled together, one `engine.insert` program per prompt bucket), every
    `engine.step` decodes up to `steps` tokens of every active slot in one compiled call, and
    a request that ends frees its slot for the next one.

    `requests` is read lazily, one request per free slot, so it may be a generator of requests
    as they arrive. Each request's arguments are checked when it is admitted. The host never
    waits per token, and overlaps the device: it launches step call k + 1 before it reads call
    k's tokens back, so the device decodes while the host hands tokens over and admits
    requests. A request whose budget runs out within call k frees its slot for call k + 1
    (the host counts the steps); one that ends earlier, at an eos id or a stop sequence, is
    seen when call k is read, so its slot idles through call k + 1 (emitting nothing) and
    takes its next request after it.

    **Arguments:**

    - `engine`: a [`eqzoo.generation.DecodeEngine`][].
    - `requests`: an iterable of [`eqzoo.generation.Request`][]s.
    - `steps`: decode steps per call (default the engine's `steps_per_call`).

    **Returns:** an iterator of [`eqzoo.generation.ServeEvent`][]s, one per request that made
    progress in a step call, in slot order; each request's last event has `done=True`.
    """
    if not isinstance(engine, DecodeEngine):
        raise ConfigError(f"serve needs an eqzoo.generation.DecodeEngine, got {type(engine).__name__}.")
    steps = engine.steps_per_call if steps is None else steps
    pending = enumerate(iter(requests))
    state = engine.init_state()
    book = _Slots(engine.slots)
    held = None  # the call launched but not yet read: its tokens, active flags and slot holders
    exhausted = False
    while True:
        if not exhausted and book.free():
            state, exhausted = _admit(engine, state, book, pending)
        launched = None
        if book.may_run():
            state, tokens, active = engine._step(state, steps)
            launched = (tokens, active, book.launch(steps))
        if held is None and launched is None:
            return
        if held is not None:
            yield from book.read(*held)
        held = launched


class _Slots:
    """The host's book of slots: which request each holds (by admission number), how many
    tokens it may still produce beyond the calls launched, and which requests are still open
    (not yet seen to end). A slot takes a new request once its request is seen to end, or
    once a launched call must end it (its budget runs out within the calls launched)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.holder: dict[int, tuple] = {}  # slot -> (number, id) of its latest request
        self.left: dict[int, int] = {}  # slot -> budget left after the calls launched (<= 0: ends in one)
        self.open: set = set()  # numbers of requests not yet seen to end

    def free(self) -> list[int]:
        return [s for s in range(self.slots) if s not in self.holder or self.left[s] <= 0]

    def take(self, slot: int, number: int, rid, budget: int) -> None:
        self.holder[slot], self.left[slot] = (number, rid), budget
        self.open.add(number)

    def may_run(self) -> bool:
        """Whether a slot may still be decoding after the calls launched."""
        return any(left > 0 for left in self.left.values())

    def launch(self, steps: int) -> dict:
        """Count a launched call of `steps` steps; the holders it decodes for."""
        for slot in self.left:
            self.left[slot] -= steps
        return {s: h for s, h in self.holder.items() if h[0] in self.open}

    def read(self, tokens, active, holders) -> list[ServeEvent]:
        """The events of one call (the one wait of it): each open holder's tokens. A request
        seen to end in an earlier call emitted nothing in this one, and gives no event."""
        tokens, active = jax.device_get((tokens, active))
        events = []
        for slot, (number, rid) in sorted(holders.items()):
            if number not in self.open:
                continue
            done = not bool(active[slot])
            events.append(ServeEvent(rid, tokens[slot][tokens[slot] >= 0], done))
            if done:
                self.open.discard(number)
                if self.holder[slot][0] == number:  # not yet given to a new request
                    del self.holder[slot], self.left[slot]
        return events


def _admit(engine, state, book, pending) -> tuple:
    """Prefill the next requests into the free slots (one program per prompt bucket):
    `(state, whether none is left)`."""
    slots, taken, exhausted = [], [], False
    for slot in book.free():
        try:
            index, request = next(pending)
        except StopIteration:
            exhausted = True
            break
        if not isinstance(request, Request):
            raise ConfigError(f"serve: requests must be eqzoo.generation.Request objects; request {index} is a "
                              f"{type(request).__name__}.")
        taken.append(engine._request(
            request.prompt, max_new_tokens=request.max_new_tokens, key=request.key, temperature=request.temperature,
            top_k=request.top_k, top_p=request.top_p, min_p=request.min_p, eos_token=request.eos_token,
            stop_sequences=request.stop_sequences,
        ))
        slots.append(slot)
        book.take(slot, index, index if request.id is None else request.id, int(request.max_new_tokens))
    if taken:
        state = engine._insert_batch(state, slots, taken)
    return state, exhausted
