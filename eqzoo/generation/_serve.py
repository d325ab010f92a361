"""The host loop of continuous batching: admit queued requests into free slots, step, stream
each request's tokens, free a slot when its request ends."""

import asyncio
import dataclasses
import itertools
import queue
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, no_type_check

import jax
import numpy as np

from .._errors import ConfigError, ShapeError, as_flag
from ._engine import DecodeEngine
from ._generate import check_count
from ._prefix import Prefix


@dataclasses.dataclass(frozen=True)
class Request:
    """One request for [`eqzoo.generation.serve`][]: a prompt and its decoding settings.

    - `prompt`: token ids, 1-D (a list or array), at least one.
    - `max_new_tokens`: its token budget (prompt + budget at most the engine's `max_len`).
    - `id`: any hashable name its events carry (default: its index in the requests);
      `serve` refuses a request whose id is not hashable (a list, a dict), or is the id of a
      request still in flight (their events could not be told apart; an id is free again once
      its request's `done` event has come).
    - `key`, `temperature`, `top_k`, `top_p`, `min_p`, `eos_token`, `stop_sequences`,
      `repetition_penalty`, `logit_bias`, `return_logprobs`: as
      [`eqzoo.generation.DecodeEngine.insert`][] takes them. With `return_logprobs=True` the
      request's events carry its tokens' log-probabilities (`ServeEvent.logprobs`).
    - `prefix`: a [`eqzoo.generation.Prefix`][] from the engine's `prefill_prefix` that the
      prompt follows (`prompt` is then the tokens after it; prefix + prompt + budget at most
      `max_len`): the slot starts with the prefix's keys and values, only `prompt` is
      prefilled. Requests with and without prefixes, or with different ones, mix freely.
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
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    return_logprobs: bool = False
    prefix: Prefix | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class ServeEvent:
    """New tokens of one request, or its refusal, as [`eqzoo.generation.serve`][] yields them.

    - `id`: the request's `id` (its index in the requests when it has none, is not a
      `Request`, or is refused for an id that is not hashable or already in flight). For a
      queue, the index counts the items taken from it in this `serve` call, from 0.
    - `tokens`: int32 NumPy `(n,)`, its tokens decoded since its last event (an eos id it
      stopped at included); `n` may be 0 in a request's last event, and is 0 in a refusal.
    - `done`: whether the request has ended (at an eos id, a stop sequence or its
      `max_new_tokens`, or refused); `serve` has given its slot to a new request already, or
      does before the next step call it launches.
    - `logprobs`: float32 NumPy `(n,)`, the log-probability of each of `tokens` as
      [`eqzoo.generate`][] returns them (`return_logprobs`), for a request with
      `return_logprobs=True`; `None` for the others.
    - `error`: `None`, or for a request `serve` refused (it never took a slot) the message
      saying why, starting `"serve: "`; its one event, `done` with no tokens.

    It unpacks as the triple `id, tokens, done = event` (and `event[0]` .. `event[2]` index
    it); `logprobs` and `error` are read by name.
    """

    id: Hashable
    tokens: np.ndarray
    done: bool
    logprobs: np.ndarray | None = None
    error: str | None = None

    def __iter__(self):
        return iter((self.id, self.tokens, self.done))

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index):
        return (self.id, self.tokens, self.done)[index]


@no_type_check  # validated here, with messages that say how to fix the call
def serve(
    engine: DecodeEngine, requests: Iterable[Request] | queue.Queue | queue.SimpleQueue, *, steps: int | None = None, on_error: str = "event",
    pipeline: bool = True,
) -> Iterator[ServeEvent]:
    """Serve `requests` with continuous batching on `engine`: free slots take the next
    requests (prefilled together, one `engine.insert` program per prompt bucket), every
    `engine.step` decodes up to `steps` tokens of every active slot in one compiled call, and
    a request that ends frees its slot for the next one.

    `requests` is read lazily, one request per free slot. For requests that arrive while
    others decode, pass a `queue.Queue` (or `queue.SimpleQueue`) that other threads `put` them
    on: `serve` polls it without waiting while any request is in flight (each free slot takes
    what the queue holds at that moment, and the slots in flight keep decoding), waits on it
    only when nothing is in flight, and ends, once the requests in flight are done, when it
    takes `None` from it (the requests put after the `None` stay in the queue). A plain
    iterable (a list, a generator) is read with `next` whenever a slot is free, before `serve`
    yields the tokens already decoded, so a generator that blocks until the next request
    arrives holds back the requests in flight meanwhile: use a queue for that. Each request is
    checked when it is admitted. A bad one (not a `Request`, an id that is not hashable or is
    that of a request still decoding, a prompt no bucket holds, a budget past `max_len`, a
    bad setting: whatever `DecodeEngine.insert` would refuse, each a `ConfigError` or
    `ShapeError`) is by default refused on its own: `serve` yields one event for it, `done`
    with no tokens and the reason in `error`, and goes on serving the others, the requests in
    flight included; its slot takes the next request. Any other exception is no request's
    fault and propagates.

    With `pipeline=True` (default) the host never waits per token, and overlaps the device:
    it launches step call k + 1 before it reads call k's tokens back, so the device decodes
    while the host hands tokens over and admits requests. A request whose budget runs out
    within call k frees its slot for call k + 1 (the host counts the steps); one that ends
    earlier, at an eos id or a stop sequence, is seen when call k is read, so its slot idles
    through call k + 1 (emitting nothing) and takes its next request after it. With
    `pipeline=False` the host reads each call before it launches the next: the device waits
    for the host between calls, but a slot freed at an eos id takes its next request in the
    very next call, and each event comes one call earlier (for latency-bound serving of few
    requests).

    **Arguments:**

    - `engine`: a [`eqzoo.generation.DecodeEngine`][].
    - `requests`: an iterable of [`eqzoo.generation.Request`][]s, or a `queue.Queue` /
      `queue.SimpleQueue` of them ended by a `None` (as above).
    - `steps`: decode steps per call (default the engine's `steps_per_call`).
    - `on_error`: `"event"` (default) refuses a bad request with an event, as above;
      `"raise"` raises its error at once (ending the loop, and with it the requests in
      flight).
    - `pipeline`: whether call k + 1 is launched before call k is read (default `True`).

    Raised at once, whatever `on_error`: an `engine` that is not a `DecodeEngine`, a bad
    `steps`, `on_error` or `pipeline`, an `asyncio.Queue` (`serve` is a blocking generator: run
    it in a thread with a `queue.Queue`) (all at the first `next`: `serve` is a generator), and
    whatever the `requests` iterable itself raises or the device raises.

    **Returns:** an iterator of [`eqzoo.generation.ServeEvent`][]s, one per request that made
    progress in a step call, in slot order, and one per refused request (before the events of
    the call read next); each request's last event has `done=True`.
    """
    _check_serve(engine, steps, on_error, pipeline)
    steps = engine.steps_per_call if steps is None else int(steps)
    read = _reader(requests)
    state = engine.init_state()
    book = _Slots(engine.slots)
    held = None  # the call launched but not yet read: its tokens, log-probabilities, active flags and slot holders
    exhausted = False
    while True:
        refused = []
        if not exhausted and book.free():
            idle = held is None and not book.may_run()  # only then may a queue be waited on
            state, exhausted, refused = _admit(engine, state, book, read, raising=on_error == "raise", idle=idle)
        launched = None
        if book.may_run():
            state, tokens, logprobs, active = engine._step(state, steps)
            launched = (tokens, logprobs, active, book.launch(steps))
        yield from refused
        ready, held = (held, launched) if pipeline else (launched, None)
        if ready is not None:
            yield from book.read(*ready)
        elif held is None and exhausted:  # (an iterable has ended here; a queue may have refused requests only)
            return


def _check_serve(engine, steps, on_error, pipeline) -> None:
    """The checks of `serve`'s own arguments, which raise whatever `on_error`."""
    if not isinstance(engine, DecodeEngine):
        raise ConfigError(f"serve needs an eqzoo.generation.DecodeEngine, got {type(engine).__name__}.")
    if steps is not None:
        check_count(steps, "steps", "serve")
    if on_error not in ("event", "raise"):
        raise ConfigError(f"serve: on_error must be 'event' (refuse a bad request with an event) or 'raise', got {on_error!r}.")
    if as_flag(pipeline) is None:
        raise ConfigError(f"serve: pipeline must be True or False, got {pipeline!r}.")


def _reader(requests) -> Callable[[bool], tuple[int, Any] | None]:
    """`read(wait)`: the next `(number, request)` of `requests`, or `None` where a queue holds
    none now (waited on only with `wait`); raises `StopIteration` at the end (an iterable's, or
    a `None` taken from a queue)."""
    if isinstance(requests, asyncio.Queue):
        raise ConfigError(
            "serve: requests is an asyncio.Queue, but serve is a blocking generator; run it in a thread "
            "(asyncio.to_thread, or a threading.Thread) over a queue.Queue, which the event loop fills with "
            "put_nowait (thread-safe)."
        )
    if isinstance(requests, queue.Queue | queue.SimpleQueue):
        numbers = itertools.count()

        def read(wait: bool):
            try:
                request = requests.get(block=wait)
            except queue.Empty:
                return None
            if request is None:
                raise StopIteration
            return next(numbers), request

        return read
    pending = enumerate(iter(requests))
    return lambda wait: next(pending)


class _Slots:
    """The host's book of slots: which request each holds (by admission number), how many
    tokens it may still produce beyond the calls launched, and which requests are still open
    (not yet seen to end). A slot takes a new request once its request is seen to end, or
    once a launched call must end it (its budget runs out within the calls launched)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.holder: dict[int, tuple] = {}  # slot -> (number, id, return_logprobs) of its latest request
        self.left: dict[int, int] = {}  # slot -> budget left after the calls launched (<= 0: ends in one)
        self.open: set = set()  # numbers of requests not yet seen to end

    def free(self) -> list[int]:
        return [s for s in range(self.slots) if s not in self.holder or self.left[s] <= 0]

    def take(self, slot: int, number: int, rid, budget: int, logprobs: bool) -> None:
        self.holder[slot], self.left[slot] = (number, rid, logprobs), budget
        self.open.add(number)

    def in_flight(self, rid) -> bool:
        """Whether a request with the id `rid` may still produce tokens after the calls
        launched. One whose budget runs out within them has none left: its last event comes
        before the first of a request admitted now, so its id is free again."""
        return any(h[1] == rid and h[0] in self.open and self.left[s] > 0 for s, h in self.holder.items())

    def may_run(self) -> bool:
        """Whether a slot may still be decoding after the calls launched."""
        return any(left > 0 for left in self.left.values())

    def launch(self, steps: int) -> dict:
        """Count a launched call of `steps` steps; the holders it decodes for."""
        for slot in self.left:
            self.left[slot] -= steps
        return {s: h for s, h in self.holder.items() if h[0] in self.open}

    def read(self, tokens, logprobs, active, holders) -> list[ServeEvent]:
        """The events of one call (the one wait of it): each open holder's tokens (and their
        log-probabilities, read back only when a holder asks for them). A request seen to end
        in an earlier call emitted nothing in this one, and gives no event."""
        want = any(h[2] for h in holders.values())
        tokens, active, logprobs = jax.device_get((tokens, active, logprobs if want else None))
        events = []
        for slot, (number, rid, with_logprobs) in sorted(holders.items()):
            if number not in self.open:
                continue
            done, emitted = not bool(active[slot]), tokens[slot] >= 0
            logp = logprobs[slot][emitted] if with_logprobs else None
            events.append(ServeEvent(rid, tokens[slot][emitted], done, logp))
            if done:
                self.open.discard(number)
                if self.holder[slot][0] == number:  # not yet given to a new request
                    del self.holder[slot], self.left[slot]
        return events


def _admit(engine, state, book, read, *, raising: bool, idle: bool) -> tuple:
    """Prefill the next requests into the free slots (one program per prompt bucket):
    `(state, whether none is left, the events of the requests refused)`. A refused request
    leaves its slot to the next one (with `raising`, its error is raised instead). A queue is
    waited on only while `idle` (nothing in flight) and nothing has been taken from it yet."""
    slots, taken, refused, exhausted = [], [], [], False
    free = iter(book.free())
    slot = next(free, None)
    while slot is not None:
        try:
            item = read(idle and not slots and not refused)
        except StopIteration:
            exhausted = True
            break
        if item is None:  # a queue holding no request now
            break
        index, request = item
        rid = _request_id(index, request)
        try:
            checked = _checked(engine, index, request)
            if book.in_flight(rid):
                whose = (
                    f"request {index} has no id, so its events would carry its index {index}, the id of a request "
                    "still decoding" if getattr(request, "id", None) is None else
                    f"request {index}'s id {rid!r} is that of a request still decoding"
                )
                raise ConfigError(
                    f"serve: {whose}, so their events could not be told apart; give each request in flight its own "
                    "id (a counter or a uuid; ints of your own can collide with the indices of requests without one)."
                )
            taken.append(checked)
        except (ConfigError, ShapeError) as error:  # a bad request; anything else is a bug and propagates
            if raising:
                raise
            refused.append(_refusal(index if book.in_flight(rid) else rid, error))
            continue
        slots.append(slot)
        book.take(slot, index, rid, int(request.max_new_tokens), bool(request.return_logprobs))
        slot = next(free, None)
    if taken:
        state = engine._insert_batch(state, slots, taken)
    return state, exhausted, refused


def _refusal(rid, error: ConfigError | ShapeError) -> ServeEvent:
    """The one event of a request refused for `error` (its message starts `"serve: "`, as
    `_checked`'s do)."""
    return ServeEvent(rid, np.zeros((0,), np.int32), True, error=str(error))


def _unhashable(x) -> str | None:
    """Why `x` is not hashable (`hash`'s message), or `None` where it is. A tuple holding a
    list passes `isinstance(x, Hashable)` and the `Hashable` annotation, but not `hash`."""
    try:
        hash(x)
    except TypeError as error:
        return str(error)
    return None


def _request_id(index: int, request) -> Hashable:
    """The id `request`'s events carry: its own, or `index` where it has none (or one that is
    not hashable, for its refusal)."""
    if isinstance(request, Request) and request.id is not None and _unhashable(request.id) is None:
        return request.id
    return index


def _checked(engine, index, request) -> tuple:
    """`request` (number `index`) as the engine's insert takes it, after checking it: a bad
    one raises `ConfigError` or `ShapeError`, its message starting `"serve: "`."""
    if not isinstance(request, Request):
        raise ConfigError(f"serve: requests must be eqzoo.generation.Request objects; request {index} is a "
                          f"{type(request).__name__}.")
    why = _unhashable(request.id)
    if why is not None:
        raise ConfigError(
            f"serve: request {index}'s id {request.id!r} is not hashable ({why}); its events "
            "carry the id for you to key each request's tokens by: give a str, an int or a tuple of them, or None "
            "(its index)."
        )
    return engine._request(
        request.prompt, max_new_tokens=request.max_new_tokens, key=request.key, temperature=request.temperature,
        top_k=request.top_k, top_p=request.top_p, min_p=request.min_p, eos_token=request.eos_token,
        stop_sequences=request.stop_sequences, repetition_penalty=request.repetition_penalty,
        logit_bias=request.logit_bias, return_logprobs=request.return_logprobs, prefix=request.prefix, who="serve",
    )
