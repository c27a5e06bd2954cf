"""Fixtures for the SLURM tests: a real loopback cluster (2 nodes x 2 CPUs) for the session.

The cluster is started once per session by ``slurm_cluster`` (installing slurm and munge
from Debian first if they are missing) and stopped at the end. A machine that cannot run
it makes those tests fail with the reason; set ``ATTNXFER_SKIP_SLURM=1`` to skip them
on purpose. There is no accounting daemon: every wait on a job has a timeout instead (see
``attnxfer.launch.slurm.wait``).
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import cloudpickle
import pytest
import toy_training
from loopback_cluster import ClusterUnavailable, LoopbackCluster

# jobs import this module from a pickle: ship it by value, the job's sys.path has no tests/cluster/slurm
cloudpickle.register_pickle_by_value(toy_training)

SKIP_ENV = "ATTNXFER_SKIP_SLURM"
#: the machine's temporary folder, read before the session moves TMPDIR under pytest's own (tests/conftest.py)
SYSTEM_TMP = tempfile.gettempdir()


@pytest.fixture(scope="session")
def slurm_cluster(request):
    """Start munged, slurmctld and two slurmd (node1, node2) on 127.0.0.1; SLURM_CONF points at it."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: SLURM tests skipped on request")
    root = Path(tempfile.mkdtemp(prefix="attnxfer-slurm-", dir=SYSTEM_TMP))
    cluster = LoopbackCluster(root, nodes=2, cpus_per_node=2)
    try:
        cluster.start()
    except (ClusterUnavailable, OSError, subprocess.SubprocessError) as e:
        cluster.stop()
        pytest.fail(
            f"cannot start the loopback SLURM cluster: {e}\n(set {SKIP_ENV}=1 to skip the SLURM tests "
            "on a machine that cannot run them)",
            pytrace=False,
        )
    saved = {k: os.environ.get(k) for k in cluster.client_env()}
    os.environ.update(cluster.client_env())
    try:
        yield cluster
    finally:
        cluster.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if request.session.testsfailed:  # keep slurmctld/slurmd logs for whoever debugs the failure
            print(f"\nloopback SLURM cluster logs kept in {root / 'log'}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slurm(slurm_cluster):
    """The session cluster, after cancelling whatever a previous test left running on it."""
    subprocess.run(["scancel", "--user", getpass.getuser()], check=False, capture_output=True)
    yield slurm_cluster
    subprocess.run(["scancel", "--user", getpass.getuser()], check=False, capture_output=True)
