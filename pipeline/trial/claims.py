"""One computation per key across a Ray cluster: each sweep has a claim coordinator, a named Ray actor that grants a
key to one holder at a time and takes it back when that holder dies. No shared filesystem is needed.

:mod:`pipeline.trial.warmup` uses it for the SDT warmup: of the trials that would compute the same warmup, the one
granted the key computes it and publishes it in the sweep's storage; the others wait, then load it from there. The
coordinator keeps only the claims in progress. What is finished is in storage, and every asker looks there first
(``done``), so a new coordinator (a resumed sweep, a restarted actor) never hands out finished work again.

- A claim is a fencing token (:class:`Lease`), renewed by a heartbeat thread of its holder every ``lease_s / 4``.
- Its holder counts as dead when its Ray actor is (a Ray Train worker that was killed, or whose node was lost: the
  actor's built-in ``__ray_ready__`` fails at once) or when it has not renewed the claim for ``lease_s`` (a hung
  process). The next asker is then granted the key, and the old holder's renewals are refused: before it publishes
  it asks (:meth:`Lease.held`) and does not.
- One coordinator per sweep, named after the sweep directory, in the ``sdtune`` namespace. The first holder that
  needs it creates it, detached (it outlives that trial) and on the head node (it would die with any other); the
  sweep's driver ends it (:func:`end_coordinator`). Its state is soft: a restarted coordinator learns the claims in
  progress again from their holders' renewals.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError

from pipeline.storage.paths import StoragePath, content_hash

NAMESPACE = "sdtune"
LEASE_S = 60.0  # a holder that renews nothing for this long has lost its claim
POLL_S = 1.0  # how often a waiting holder asks again
PROBE_S = 2.0  # how long a busy holder's actor may take to answer a liveness probe (no answer: busy, not dead)


@dataclass
class Claim:
    token: str
    holder: str  # who holds it, for people: a trial name
    actor: ActorHandle | None  # the holder's Ray actor, whose death frees the claim; None: only the lease does
    expires: float  # time.monotonic() deadline of the lease
    waiting: set[str] = field(default_factory=set)  # the holders told to wait for it


class ClaimCoordinator:
    """The claims in progress of one sweep (a Ray actor: :func:`coordinator`)."""

    def __init__(self, lease_s: float = LEASE_S) -> None:
        self.lease_s = lease_s
        self.claims: dict[str, Claim] = {}

    def claim(self, key: str, holder: str, actor: ActorHandle | None) -> tuple[str, float] | None:
        """A fencing token and the lease's seconds when ``key`` is free (or its holder dead): the caller holds it.
        None while another live holder has it: ask again later."""
        current = self.claims.get(key)
        if current is not None and self._alive(current):
            current.waiting.add(holder)
            return None
        token = uuid.uuid4().hex
        self.claims[key] = Claim(token, holder, actor, time.monotonic() + self.lease_s)
        return token, self.lease_s

    def renew(self, key: str, token: str, holder: str, actor: ActorHandle | None) -> bool:
        """Extend the lease of ``token``; False when the key is someone else's now. A key with no claim at all (this
        coordinator restarted) becomes the caller's again."""
        current = self.claims.get(key)
        if current is None:
            current = self.claims[key] = Claim(token, holder, actor, 0.0)
        if current.token != token:
            return False
        current.expires = time.monotonic() + self.lease_s
        return True

    def release(self, key: str, token: str) -> None:
        """End the claim ``token`` (a claim taken over since is left alone)."""
        current = self.claims.get(key)
        if current is not None and current.token == token:
            del self.claims[key]

    def status(self) -> dict[str, dict[str, Any]]:
        """Per claimed key: who holds it and who waits for it."""
        return {key: {"holder": c.holder, "waiting": sorted(c.waiting)} for key, c in self.claims.items()}

    def _alive(self, claim: Claim) -> bool:
        if time.monotonic() > claim.expires:
            return False
        if claim.actor is None:
            return True
        try:
            ray.get(claim.actor.__ray_ready__.remote(), timeout=PROBE_S)
        except RayActorError:
            return False
        except GetTimeoutError:  # busy, not dead
            pass
        return True


def coordinator_name(sweep_dir: StoragePath) -> str:
    return f"claims-{content_hash(str(sweep_dir))}"


def sweep_coordinator(sweep_dir: StoragePath) -> ActorHandle:
    """The claim coordinator of the sweep in ``sweep_dir``, created if it is not running."""
    return (
        ray.remote(ClaimCoordinator)
        .options(
            name=coordinator_name(sweep_dir),
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
            # Not in the placement group of the Ray Train worker that creates it (Ray's default for an actor created
            # in one): it would not fit there, and would die with that trial.
            scheduling_strategy="DEFAULT",
            max_restarts=-1,
            max_task_retries=-1,
        )
        .remote()
    )


def end_coordinator(sweep_dir: StoragePath) -> None:
    """Stop the sweep's claim coordinator, if one runs (the sweep's driver does, when the sweep ends)."""
    try:
        ray.kill(ray.get_actor(coordinator_name(sweep_dir), namespace=NAMESPACE))
    except ValueError:  # none
        pass


class Lease:
    """A granted claim, renewed in the background until :meth:`end`."""

    def __init__(
        self, coordinator: ActorHandle, key: str, grant: tuple[str, float], holder: str, actor: ActorHandle | None
    ) -> None:
        self.coordinator, self.key, self.holder, self.actor = coordinator, key, holder, actor
        self.token, self.lease_s = grant
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._renew_until_stopped, name=f"lease {key}", daemon=True)
        self._heartbeat.start()

    def held(self) -> bool:
        """Whether the claim is still this holder's (renewed now)."""
        return ray.get(self.coordinator.renew.remote(self.key, self.token, self.holder, self.actor))

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.lease_s / 4) and self.held():
            pass

    def end(self) -> None:
        self._stop.set()
        self._heartbeat.join()  # no renewal in flight may bring the claim back after its release
        ray.get(self.coordinator.release.remote(self.key, self.token))


def current_actor() -> ActorHandle | None:
    """This process's Ray actor (a Ray Train worker is one), or None in a driver or a task."""
    if ray.get_runtime_context().get_actor_id() is None:
        return None
    return ray.get_runtime_context().current_actor


@contextmanager
def claimed(sweep_dir: StoragePath, key: str, holder: str, done: Callable[[], bool]) -> Iterator[Lease | None]:
    """Wait until ``done()`` (yield None: load the result) or until this process is granted ``key`` (yield its
    :class:`Lease`: check ``done()`` again, compute, publish if :meth:`Lease.held`); the claim ends with the block."""
    coordinator = sweep_coordinator(sweep_dir)
    actor = current_actor()
    grant = None
    while grant is None and not done():
        grant = ray.get(coordinator.claim.remote(key, holder, actor))
        if grant is None:
            time.sleep(POLL_S)
    if grant is None:
        yield None
        return
    lease = Lease(coordinator, key, grant, holder, actor)
    try:
        yield lease
    finally:
        lease.end()
