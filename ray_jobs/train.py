"""Train: `fedmrg run` as a Ray job (same options).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/train.py --config default --strategy fedmrg --set federation.rounds=5

Under `ray job submit` the driver is already pointed at the cluster (RAY_ADDRESS), so the
run's client actors and coordinator land on the cluster's nodes.
"""

import sys

from fedmrg.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]], prog_name="ray_jobs/train.py")
