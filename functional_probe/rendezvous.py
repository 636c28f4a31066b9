"""Ranks meet on the process group's key-value store before the sharded path's first collective.

A collective that only some ranks enter waits forever (gloo and NCCL time out after 10-30
minutes, if at all): the usual ``if trainer.is_world_process_zero(): fp.probe(...,
distributed=True)`` would hang. :func:`rendezvous` is a barrier on the group's store with a
short timeout, before any collective: when a rank does not arrive in time, every rank that
did call raises ValueError naming the missing ranks, and since no collective was started the
group stays usable. A store round trip is milliseconds.

Protocol (one counter for all calls, so a failed call leaves no rank out of step): the
counter holds the arrivals ``n`` and the set of ranks seen in the current generation; a
caller adds itself (compare-and-set with a fresh token, so each update is unambiguous), which
gives its generation ``gen = (n − 1) // W``, writes ``<gen>/<rank> = what`` and polls until
``n`` reaches ``(gen + 1)·W``. On timeout it withdraws (n − 1, only if the generation did not
complete meanwhile: then it passes) and names the ranks not seen. After passing, every rank
reads the W keys: ranks that met from different functions raise ValueError together.

The timeout is the argument, else ``$FUNCTIONAL_PROBE_RENDEZVOUS_TIMEOUT`` (seconds), else 10 s.
The store: torch has no public accessor of the default group's store (torch 2.13), so this
uses ``distributed_c10d._get_default_store()``; it is the store every backend was set up with.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable

import torch.distributed as dist
from torch.distributed import distributed_c10d

__all__ = ["ENV_TIMEOUT", "DEFAULT_TIMEOUT", "rendezvous", "rendezvous_timeout"]

ENV_TIMEOUT = "FUNCTIONAL_PROBE_RENDEZVOUS_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
PREFIX = "functional_probe/rdv"
COUNTER = f"{PREFIX}/count"
POLL = 0.005  # seconds between counter reads while waiting


def rendezvous_timeout(timeout: float | None = None) -> float:
    """Seconds to wait: `timeout`, else $FUNCTIONAL_PROBE_RENDEZVOUS_TIMEOUT, else 10."""
    source, value = "timeout", timeout
    if value is None:
        source, value = f"${ENV_TIMEOUT}", os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{source}={value!r}; expected a finite number of seconds > 0")
    return seconds


def rendezvous(what: str, timeout: float | None = None) -> None:
    """Wait until every rank of the default group has called ``rendezvous`` too.

    Raises ValueError ``"<what>: rank(s) [..] of W did not call it within T s ..."`` on every
    rank that called, when some did not within `timeout` (see the module docstring), and a
    ValueError on every rank when they met from different functions. A no-op without a process
    group or with one rank.
    """
    seconds = rendezvous_timeout(timeout)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    store = distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    _, (count, _) = update(store, lambda n, seen: (n + 1, {rank} | (seen if n % world else set())))
    gen = (count - 1) // world
    keys = [f"{PREFIX}/{gen}/{r}" for r in range(world)]
    store.set(keys[rank], what)  # readers (multi_get below) wait until it is there
    target = (gen + 1) * world
    if not wait_for(store, target, seconds):
        (n, seen), _ = update(store, lambda n, seen: (n - 1, seen if n - 1 > gen * world else set()) if n < target
                              else (n, seen))  # fmt: skip
        if n < target:
            raise ValueError(
                f"{what}: rank(s) {sorted(set(range(world)) - seen)} of {world} did not call it within "
                f"{seconds:g} s, but with distributed=True every rank must (each with its shard). To run "
                f"on this process's batch alone pass distributed=False; for a slower rank raise the "
                f"timeout (${ENV_TIMEOUT})"
            )
    called = [v.decode() for v in store.multi_get(keys)]
    if len(set(called)) > 1:
        raise ValueError(f"the ranks met from different functions (rank: function {dict(enumerate(called))}); "
                         "every rank must make the same sharded calls in the same order")  # fmt: skip


def wait_for(store: dist.Store, target: int, seconds: float) -> bool:
    """Poll the counter until it reaches `target` (True) or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while read(store)[0] < target:
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


State = tuple[int, set[int]]  # (arrivals counted, ranks that arrived in the current generation)


def read(store: dist.Store, raw: str | None = None) -> State:
    """The counter's state from its value "n|r,r,..|token" (absent: no arrivals yet)."""
    if raw is None:
        raw = store.get(COUNTER).decode() if store.check([COUNTER]) else ""
    if not raw:
        return 0, set()
    n, seen, _ = raw.split("|")
    return int(n), {int(r) for r in seen.split(",") if r}


def update(store: dist.Store, change: Callable[[int, set[int]], State]) -> tuple[State, State]:
    """Atomically replace the counter's state by change(state): (old, new). Each write carries a
    fresh token, so compare-and-set's answer says unambiguously whether this write won."""
    while True:
        raw = store.get(COUNTER).decode() if store.check([COUNTER]) else ""
        old = read(store, raw)
        n, seen = change(*old)
        new = f"{n}|{','.join(map(str, sorted(seen)))}|{uuid.uuid4().hex}"
        if store.compare_set(COUNTER, raw, new).decode() == new:
            return old, (n, seen)
