"""The promotion lock: one `promote` at a time reads, compares and moves a model's aliases.

The lock is a registered model of its own, `<name>--promotion-lock`. Creating a registered model
is the one atomic compare-and-set the registry offers (the name is unique in every backend
store; a second create fails with RESOURCE_ALREADY_EXISTS), so it serializes read-compare-move
across processes and machines without any store outside MLflow.

A holder that died leaves its lock behind. A waiter breaks it when the holder's run is no
longer RUNNING, or when the same holder has kept it for `stale_after` seconds of the waiter's
own clock: no two machines' clocks are ever compared. Breaking takes a second lock named after
the stale holder, so of several waiters exactly one breaks it, and only after checking that
the stale holder still owns it (a fresh holder's lock is never deleted).
"""

from __future__ import annotations

import sys
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
TAG_LOCK_SINCE = "lightcycle.lock.since"  # for people reading the UI; never used to judge staleness


def promotion_lock(client: MlflowClient, name: str, run_id: str, timeout: float = 600,
                   stale_after: float = 300, poll: float = 0.5):
    """Hold the promotion lock for registered model `name` while the block runs.

    A promote holds it for a few seconds (evaluate the champion, move aliases), so a holder
    seen for `stale_after` seconds is presumed dead.
    """
    return registry_lock(client, name + LOCK_SUFFIX, run_id, timeout, stale_after, poll,
                         purpose=f"`promote` moves the aliases of {name}")


@contextmanager
def registry_lock(client: MlflowClient, lock: str, run_id: str, timeout: float = 600,
                  stale_after: float = 300, poll: float = 0.5, purpose: str = "a step runs"):
    """Hold registered model `lock` as a lock while the block runs (see the module's doc).

    `run_id` is the holder's MLflow run: once it is no longer RUNNING, the lock is stale.
    """
    owner = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    first_seen: dict[str, float] = {}  # holder (or breaker) -> when this waiter first saw it
    while True:
        if _create(client, lock, {TAG_LOCK_OWNER: owner, TAG_LOCK_RUN: run_id,
                                  TAG_LOCK_SINCE: f"{time.time():.3f}"},
                   f"Held while {purpose}; deleted after."):
            break
        holder = _lock_holder(client, lock)
        if holder is not None and holder.get(TAG_LOCK_OWNER) == owner:
            break  # our create committed, its answer was lost and the retry found it
        if holder is not None:
            held_by = holder.get(TAG_LOCK_OWNER, "")
            if held_by not in first_seen:  # once per holder: a user sees why the step waits
                print(f"[lock] waiting: {lock} is held by run {holder.get(TAG_LOCK_RUN)!r} "
                      f"(held while {purpose})", file=sys.stderr, flush=True)
            seen = first_seen.setdefault(held_by, time.monotonic())
            if time.monotonic() - seen > stale_after or _holder_run_ended(client, holder):
                _break(client, lock, held_by, first_seen, stale_after)
                continue
        if time.monotonic() > deadline:
            who = holder.get(TAG_LOCK_RUN) if holder else None
            raise UserError(
                f"Registered model {lock} (a lock held while {purpose}) is held by run "
                f"{who!r}. Wait for that run to finish; if it is not running, delete {lock} "
                "in the MLflow UI and re-run."
            )
        time.sleep(poll)
    try:
        yield
    finally:
        # Release only our own lock: one broken as stale may already be someone else's.
        holder = _lock_holder(client, lock)
        if holder is not None and holder.get(TAG_LOCK_OWNER) == owner:
            _delete(client, lock)


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


def _break(client: MlflowClient, lock: str, stale_owner: str, first_seen: dict[str, float],
           stale_after: float) -> None:
    """Delete `lock` if `stale_owner` still holds it; of several waiters, only one does."""
    breaker = f"{lock}{BREAKER_INFIX}{stale_owner}"
    if not _create(client, breaker, {TAG_LOCK_OWNER: stale_owner},
                   f"Held while one waiter breaks the stale {lock}; deleted after."):
        # Another waiter is breaking it. A breaker that died mid-break is itself stale.
        if time.monotonic() - first_seen.setdefault(breaker, time.monotonic()) > stale_after:
            _delete(client, breaker)
        return
    try:
        holder = _lock_holder(client, lock)
        if holder is not None and holder.get(TAG_LOCK_OWNER) == stale_owner:
            _delete(client, lock)
    finally:
        _delete(client, breaker)


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
