"""Train: `fedmrg run` as a Ray job (same options).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/train.py --config default --strategy fedmrg --set federation.rounds=5

Under `ray job submit` the driver is already pointed at the cluster (RAY_ADDRESS), so the
run's client actors and coordinator land on the cluster's nodes.

Resubmitting the job with the same `--run-name` (and the same config) resumes it: the run
continues from its last checkpoint under `<tracking.storage_path>/<run name>/` into the same
MLflow run; a finished run does nothing. `--resume RUN` says so explicitly (an error when RUN
never started); `--checkpoint-fallback` resumes from the newest good checkpoint when the newest
one is corrupt. Give an absolute `tracking.storage_path` on shared storage: the job's working
directory is a fresh temporary copy on every submission.

`ray job stop` sends SIGTERM: the run's MLflow runs end as KILLED and the driver exits 143
(`ray job submit` still exits 0 for a stopped job: Ray reports it STOPPED); the last completed
round's checkpoint stays, and resubmitting with the same `--run-name` continues from it.
"""

import sys

from fedmrg.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]], prog_name="ray_jobs/train.py")
