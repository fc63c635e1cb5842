"""Evaluate: `fedmrg evaluate` as a Ray job: a finished run's models on a dataset.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/evaluate.py /mnt/fedmrg/runs/paper-fedmrg \
        --data-root /mnt/fedmrg/data/other-hospital --json /mnt/fedmrg/runs/eval.json

The run folder is <tracking.storage_path>/<run name> (shared storage on a cluster).
"""

import sys

from fedmrg.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]], prog_name="ray_jobs/evaluate.py")
