"""The lane's version gate: the suite ran on the torch its lane promises, and says which.

``python3 run.py test`` (uv.lock, the GPU image's torch) and ``python3 run.py
test-latest-torch`` (locks/torch-latest, the newest supported torch) set
TITAN_MOE_EXPECT_TORCH; a lane whose environment drifted to another torch fails
here instead of passing on the wrong version.
"""

import os

import pytest
import torch
import torchvision

from titan_moe.common.versions import runtime_versions

EXPECT_ENV = "TITAN_MOE_EXPECT_TORCH"


def test_the_lane_runs_the_torch_it_promises(capsys):
    versions = runtime_versions()
    with capsys.disabled():  # on the terminal whatever the capture mode: CI logs show the version tested
        print(f"\n[torch-version] torch {versions['torch']}, torchvision {torchvision.__version__}, "
              f"torchtitan {versions['torchtitan']}")
    expected = os.environ.get(EXPECT_ENV)
    if not expected:
        pytest.skip(f"{EXPECT_ENV} is unset: only run.py's lanes pin a torch version (this is torch {torch.__version__})")
    # The public version without the build suffix (2.15.0+cu132 -> 2.15.0): the lock pins that.
    assert torch.__version__.split("+")[0] == expected, (
        f"this lane promises torch {expected} but runs torch {torch.__version__}: re-sync its environment"
    )
    # torchvision must be the build made for this torch, or `import streaming` fails.
    import streaming  # noqa: F401
