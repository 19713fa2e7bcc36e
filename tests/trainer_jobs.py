"""Run under torchrun: train several run configs back to back in one process group.

Usage (from tests/distributed_utils.py): ``torchrun ... tests/trainer_jobs.py JOBS.json``
where JOBS.json is ``[{"name": ..., "argv": [trainer args]}, ...]``.  Stops at
the first job that fails.
"""

import json
import sys

from titan_moe import train  # activates the CPU adapter before torchtitan is imported

from titan_moe.trainer import shutdown  # noqa: E402
from torchtitan.tools.logging import init_logger, logger  # noqa: E402


def main(spec_path: str) -> int:
    init_logger()
    with open(spec_path) as f:
        jobs = json.load(f)
    status = 1
    try:
        for job in jobs:
            logger.info(f"=== job {job['name']} ===")
            status = train.run(job["argv"])
            if status != 0:
                print(f"job {job['name']} failed with status {status}", file=sys.stderr)
                return status
    finally:
        shutdown.destroy_process_groups(clean=status == 0)  # the trainer's own teardown order
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
