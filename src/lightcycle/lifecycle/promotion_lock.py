"""The promotion lock: one `promote` at a time reads, compares and moves a model's aliases.

The lock is a registered model of its own, `<name>--promotion-lock`. Creating a registered model
is the one atomic compare-and-set the registry offers (the name is unique in every backend
store; a second create fails with RESOURCE_ALREADY_EXISTS), so it serializes read-compare-move
across processes and machines without any store outside MLflow.

The holder has a lease: while it works, a thread bumps the lock's lease tag every quarter of
`stale_after`. A waiter breaks the lock only when the holder's run is no longer RUNNING, or when
it has seen the same holder with the same lease for `stale_after` seconds of its own clock: no
two machines' clocks are ever compared, and a slow holder that is alive is never broken. Right
before it moves an alias, the holder checks that it still holds the lock (`Lease.check`, a
fencing check) and stops with a clear error if it does not.

Breaking takes a second lock named after the stale holder, so of several waiters exactly one
breaks it, and only after checking that the stale holder still owns it. Under basic auth the
lock belongs to the user who created it (MANAGE); a waiter that may not delete it but has EDIT
on it takes it over by rewriting its tags, and one with neither is told which permission it needs.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from contextlib import contextmanager

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lightcycle.errors import UserError
from lightcycle.lifecycle.registry import not_found

LOCK_SUFFIX = "--promotion-lock"
BREAKER_INFIX = "--break-"
TAG_LOCK_OWNER = "lightcycle.lock.owner"
TAG_LOCK_RUN = "lightcycle.lock.run_id"
TAG_LOCK_LEASE = "lightcycle.lock.lease"  # bumped by the holder while it works
TAG_LOCK_SINCE = "lightcycle.lock.since"  # for people reading the UI; never used to judge staleness
FREE = "free"  # owner of a lock its last holder could not delete (EDIT without MANAGE)


class LockLost(UserError):
    """The holder no longer holds the lock: it must not move anything."""


def promotion_lock(client: MlflowClient, name: str, run_id: str, timeout: float = 600,
                   stale_after: float = 300, poll: float = 0.5):
    """Hold the promotion lock for registered model `name` while the block runs; the block
    gets the Lease. A holder whose lease has not moved for `stale_after` seconds is dead."""
    return registry_lock(client, name + LOCK_SUFFIX, run_id, timeout, stale_after, poll,
                         purpose=f"`promote` moves the aliases of {name}")


class Lease:
    """The holder's side: renews the lease in a thread; `check()` is the fencing check."""

    def __init__(self, client: MlflowClient, lock: str, owner: str, stale_after: float):
        self.client, self.lock, self.owner = client, lock, owner
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = None
        if stale_after != float("inf"):
            self._thread = threading.Thread(target=self._renew, args=(stale_after / 4,),
                                            name=f"lease {lock}", daemon=True)
            self._thread.start()

    def _renew(self, every: float) -> None:
        count = 0
        while not self._stop.wait(every):
            try:
                holder = _lock_holder(self.client, self.lock)
                if holder is None or holder.get(TAG_LOCK_OWNER) != self.owner:
                    self.lost = "it was broken as stale or deleted by someone else"
                    return
                count += 1
                self.client.set_registered_model_tag(self.lock, TAG_LOCK_LEASE,
                                                     f"{self.owner}:{count}")
            except MlflowException:
                continue  # a server restart: the next round tries again

    def check(self) -> None:
        """Raise LockLost unless this holder still holds the lock, right now."""
        holder = _lock_holder(self.client, self.lock)
        if holder is None or holder.get(TAG_LOCK_OWNER) != self.owner:
            raise LockLost(
                f"This step no longer holds {self.lock} "
                f"({self.lost or 'another holder has it now'}), so it moved nothing. The "
                "lease was not renewed in time (a stalled process or an unreachable server); "
                "run the step again.")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@contextmanager
def registry_lock(client: MlflowClient, lock: str, run_id: str, timeout: float = 600,
                  stale_after: float = 300, poll: float = 0.5, purpose: str = "a step runs"):
    """Hold registered model `lock` as a lock while the block runs (see the module's doc).

    `run_id` is the holder's MLflow run: once it is no longer RUNNING, the lock is stale.
    """
    owner = uuid.uuid4().hex
    claim = {TAG_LOCK_RUN: run_id, TAG_LOCK_LEASE: f"{owner}:0",
             TAG_LOCK_SINCE: f"{time.time():.3f}", TAG_LOCK_OWNER: owner}
    deadline = time.monotonic() + timeout
    first_seen: dict[tuple[str, str], float] = {}  # (holder, lease) -> when this waiter saw it
    announced: set[str] = set()  # holders this waiter has said it waits for
    while True:
        if _create(client, lock, claim, f"Held while {purpose}; deleted after."):
            break
        holder = _lock_holder(client, lock)
        if holder is not None and holder.get(TAG_LOCK_OWNER) == owner:
            break  # our create committed, its answer was lost and the retry found it
        if holder is not None:
            held_by = holder.get(TAG_LOCK_OWNER, "")
            if held_by != FREE and held_by not in announced:  # a user sees why the step waits
                announced.add(held_by)
                print(f"[lock] waiting: {lock} is held by run {holder.get(TAG_LOCK_RUN)!r} "
                      f"(held while {purpose})", file=sys.stderr, flush=True)
            seen = first_seen.setdefault((held_by, holder.get(TAG_LOCK_LEASE, "")),
                                         time.monotonic())
            if (held_by == FREE or time.monotonic() - seen > stale_after
                    or _holder_run_ended(client, holder)):
                if _break(client, lock, holder, first_seen, stale_after, claim):
                    break  # taken over: we hold it
                continue
        if time.monotonic() > deadline:
            who = holder.get(TAG_LOCK_RUN) if holder else None
            raise UserError(
                f"Registered model {lock} (a lock held while {purpose}) is held by run "
                f"{who!r}. Wait for that run to finish; if it is not running, delete {lock} "
                "in the MLflow UI and re-run."
            )
        time.sleep(poll)
    lease = Lease(client, lock, owner, stale_after)
    try:
        yield lease
    finally:
        lease.stop()
        # Release only our own lock: one broken as stale may already be someone else's.
        holder = _lock_holder(client, lock)
        if holder is not None and holder.get(TAG_LOCK_OWNER) == owner:
            try:
                _delete(client, lock)
            except MlflowException as exc:
                if not _denied(exc):
                    raise
                # Taken over with EDIT only: leave it free for the next holder to claim.
                client.set_registered_model_tag(lock, TAG_LOCK_OWNER, FREE)


def _create(client: MlflowClient, model: str, tags: dict[str, str], description: str) -> bool:
    """True if this call created `model`; False if it exists (or vanished mid-create)."""
    try:
        client.create_registered_model(model, tags=tags, description=description)
        return True
    except MlflowException as exc:
        # A create that loses the race while the holder releases can come back as
        # RESOURCE_DOES_NOT_EXIST (the server looks the existing one up): the caller sleeps
        # and tries again within its deadline.
        if not_found(exc) or getattr(exc, "error_code", "") == "RESOURCE_ALREADY_EXISTS":
            return False
        raise


def _break(client: MlflowClient, lock: str, stale: dict[str, str],
           first_seen: dict[tuple[str, str], float], stale_after: float,
           claim: dict[str, str]) -> bool:
    """Delete `lock` if its stale holder still holds it; of several waiters, only one does.
    True when, unable to delete it, this waiter took it over (it holds the lock now)."""
    stale_owner = stale.get(TAG_LOCK_OWNER, "")
    breaker = f"{lock}{BREAKER_INFIX}{stale_owner}"
    if not _create(client, breaker, {TAG_LOCK_OWNER: stale_owner},
                   f"Held while one waiter breaks the stale {lock}; deleted after."):
        # Another waiter is breaking it. A breaker that died mid-break is itself stale.
        key = (breaker, "")
        if time.monotonic() - first_seen.setdefault(key, time.monotonic()) > stale_after:
            _delete(client, breaker)
        return False
    try:
        holder = _lock_holder(client, lock)
        if holder is None or holder.get(TAG_LOCK_OWNER) != stale_owner:
            return False
        try:
            _delete(client, lock)
            return False
        except MlflowException as exc:
            if not _denied(exc):
                raise
        try:
            for key, value in claim.items():  # the owner last: it is what waiters judge by
                client.set_registered_model_tag(lock, key, value)
        except MlflowException as exc:
            if not _denied(exc):
                raise
            raise UserError(
                f"Registered model {lock} is held by run {stale.get(TAG_LOCK_RUN)!r}, whose "
                "lease has stopped (its holder is gone). Breaking that lock needs EDIT "
                f"permission on registered model {lock}, which this user lacks: ask the "
                "server's admin to grant EDIT (or MANAGE) on it, or the holder's user to "
                f"delete {lock} in the MLflow UI; then re-run.") from None
        return True
    finally:
        _delete(client, breaker)


def _denied(exc: MlflowException) -> bool:
    return getattr(exc, "error_code", "") == "PERMISSION_DENIED" or "403" in str(exc)


def _lock_holder(client: MlflowClient, lock: str) -> dict[str, str] | None:
    try:
        return dict(client.get_registered_model(lock).tags)
    except MlflowException as exc:
        if not_found(exc):
            return None
        raise


def _holder_run_ended(client: MlflowClient, holder: dict[str, str]) -> bool:
    run_id = holder.get(TAG_LOCK_RUN)
    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.status != "RUNNING"
    except MlflowException:
        return False


def _delete(client: MlflowClient, model: str) -> None:
    try:
        client.delete_registered_model(model)
    except MlflowException as exc:
        if not not_found(exc):
            raise
