"""The promotion lock's lease (issue 22): a holder that is alive is never broken, however slow,
and a holder that lost the lock moves nothing (the fencing check)."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from lightcycle.lifecycle import promotion_lock
from lightcycle.lifecycle.promotion_lock import LockLost

STALE_AFTER = 1.0  # a user setting (promotion_lock(stale_after=...)), small to keep this cheap


def test_a_holder_slower_than_stale_after_is_never_broken(tracking_uri, experiment, model_name):
    client = MlflowClient()
    run_id = client.create_run(experiment).info.run_id  # RUNNING, as a promote's run is
    events, errors, inside = [], [], threading.Event()

    def holder():
        try:
            with promotion_lock.promotion_lock(client, model_name, run_id,
                                               stale_after=STALE_AFTER, poll=0.05) as lease:
                events.append("holder in")
                inside.set()
                time.sleep(5 * STALE_AFTER)  # a gate evaluating a large champion
                lease.check()  # right before it would move an alias
                events.append("holder out")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            inside.set()

    def waiter():
        inside.wait()
        with promotion_lock.promotion_lock(client, model_name, run_id, timeout=60,
                                           stale_after=STALE_AFTER, poll=0.05):
            events.append("waiter in")

    threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert events == ["holder in", "holder out", "waiter in"]
    assert not client.search_registered_models(f"name LIKE '{model_name}--%'")


def test_a_holder_that_lost_the_lock_is_stopped_by_the_fencing_check(tracking_uri, experiment,
                                                                      model_name):
    client = MlflowClient()
    run_id = client.create_run(experiment).info.run_id
    lock = model_name + promotion_lock.LOCK_SUFFIX
    with promotion_lock.promotion_lock(client, model_name, run_id, stale_after=60) as lease:
        lease.check()  # held: passes
        client.delete_registered_model(lock)  # what a waiter that judged it stale does
        client.create_registered_model(lock, tags={promotion_lock.TAG_LOCK_OWNER: "another"})
        with pytest.raises(LockLost, match=f"no longer holds {lock}.*moved nothing"):
            lease.check()
    # The release left the new holder's lock alone.
    assert client.get_registered_model(lock).tags[promotion_lock.TAG_LOCK_OWNER] == "another"
