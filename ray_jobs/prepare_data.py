"""Prepare data: `fedmrg data ...` as a Ray job (generate the phantom benchmark, import a real
dataset, validate, or check the whole pipeline on the cluster).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/prepare_data.py phantom --out /mnt/fedmrg/data/phantom-v1
    ... python ray_jobs/prepare_data.py import --format r2gen --input ... --out ...
    ... python ray_jobs/prepare_data.py validate /mnt/fedmrg/data/phantom-v1

The dataset is written on the node that runs the job's driver (the head): give an --out on
shared storage so every client's node sees it.
"""

import sys

from fedmrg.cli import main

if __name__ == "__main__":
    main(["data", *sys.argv[1:]], prog_name="ray_jobs/prepare_data.py")
