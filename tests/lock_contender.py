"""A process that contends for a model's promotion lock, for tests/test_faults.py.

    python tests/lock_contender.py <model> <run_id> <rounds> <log> [--hold]

Each round takes the lock, reads the model's `counter` tag and writes it back plus one, and
appends "<start> <end> <pid>" (CLOCK_MONOTONIC, shared by every process on the machine) to
<log>. With --hold it takes the lock once, writes "held" to <log> and sleeps until killed.
"""

import os
import sys
import time

from mlflow import MlflowClient

from lightcycle.lifecycle.promotion_lock import promotion_lock

STALE_AFTER = 3.0


def main() -> None:
    model, run_id, rounds, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    client = MlflowClient()
    if "--hold" in sys.argv:
        with promotion_lock(client, model, run_id, stale_after=STALE_AFTER, poll=0.05):
            with open(log, "a") as out:
                out.write("held\n")
            time.sleep(3600)
    for _ in range(rounds):
        with promotion_lock(client, model, run_id, timeout=120, stale_after=STALE_AFTER,
                            poll=0.05):
            start = time.monotonic()
            value = int(client.get_registered_model(model).tags["counter"])
            client.set_registered_model_tag(model, "counter", str(value + 1))
            end = time.monotonic()
        with open(log, "a") as out:
            out.write(f"{start} {end} {os.getpid()}\n")


if __name__ == "__main__":
    main()
