"""What a trainer pod's exit status means, and the environment the renderer hands its entrypoint.

A module of constants only (no torch, no titan_moe), so that ``manifests.py``
can render the failure policies from the same numbers the entrypoint exits
with, without importing the entrypoint itself (``python -m`` would then run a
module that is already imported, which Python warns about at PID 1).

The codes (k8s/README.md "What each failure costs" has the whole table):

* ``PREEMPTED`` (75) -- the workers stopped for a SIGTERM: the trainer's
  final save is committed, or the SIGTERM came before any worker trained
  (still importing, still at the rendezvous).  Same value as
  ``titan_moe.checkpoint.PREEMPTED_EXIT_CODE``; a test keeps them equal.
* ``PEER_LOST`` (76) -- this pod's workers were healthy and failed only
  because another pod vanished: a connection to a peer or to the rendezvous
  store was reset or closed, or the rendezvous never completed.
* ``CRASH_LOOP`` (77) -- the run made no progress: ``CRASH_LOOP_LIMIT_ENV``
  attempts in a row ended without a new committed checkpoint
  (``jobs/k8s/attempts.py``).  The one status that ends the JobSet.
* ``RANK_FAILED`` (78) -- a worker of this pod failed on its own (an
  exception that is not a lost connection, or a signal such as the OOM
  killer's).
* ``SETUP_ERROR`` (2) -- bad setup before anything started (an image built for
  another network); the trainer's status for an invalid run config, too.
"""

from __future__ import annotations

PREEMPTED = 75
PEER_LOST = 76
CRASH_LOOP = 77
RANK_FAILED = 78
SETUP_ERROR = 2
# 128 + signal number: the shell's (and the kubelet's) convention for "ended by a signal".
SIGNAL_BASE = 128

# Statuses after which the JobSet restarts the group without using up maxRestarts:
# the restart budget that matters is the entrypoint's progress budget instead.
FREE_RESTART = (PREEMPTED, PEER_LOST, RANK_FAILED)

# -- environment of the trainer container, set by the renderer ----------------------
# tcp | infiniband | efa.
NETWORK_ENV = "TITAN_MOE_NETWORK"
# Set by k8s/Dockerfile: the network libraries the image was built with (--build-arg NETWORK).
IMAGE_NETWORK_ENV = "TITAN_MOE_IMAGE_NETWORK"
# The run's folder on the shared volume (job.dump_folder): the attempt record lives there.
RUN_DIR_ENV = "TITAN_MOE_RUN_DIR"
# The run's checkpoint folder: its newest committed step is the run's progress.
CHECKPOINT_DIR_ENV = "TITAN_MOE_CHECKPOINT_DIR"
# Attempts in a row without a new committed checkpoint before the run gives up.
CRASH_LOOP_LIMIT_ENV = "TITAN_MOE_CRASH_LOOP_LIMIT"
# Which restart of the JobSet this pod belongs to (downward API, ATTEMPT_ANNOTATION):
# the pods of one attempt share it, so they count the attempt once.
ATTEMPT_ENV = "TITAN_MOE_ATTEMPT"
ATTEMPT_ANNOTATION = "jobset.sigs.k8s.io/restart-attempt"
