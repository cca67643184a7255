"""Connecting to Ray: join a cluster (``ray.address`` or RAY_ADDRESS, e.g. under ``ray job submit``) or
start a local one bound to 127.0.0.1, with the environment every worker needs.

The local Ray listens on the loopback only. ``ray.init(_node_ip_address="127.0.0.1")`` alone does not
do that on Linux: Ray resolves a loopback address to the machine's own (its multi-node default) and
the GCS, the raylet, the agents and every worker then listen on all interfaces (``ss -ltn``: ``*:port``).
Ray's single-machine mode, its default on macOS and Windows and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
elsewhere, keeps the node at 127.0.0.1, and Ray's gRPC servers listen on 127.0.0.1 when the node's
address is 127.0.0.1. :func:`init_ray` sets the variable for the raylet and every worker (they inherit
it) and the constant Ray read from it at import for this process, and checks the result. Joining a
cluster leaves both alone: a driver on a node of a real cluster needs its real address.
"""

from __future__ import annotations

import logging
import os
import sys

from aurora_core import logs
from aurora_core.config import REPO_ROOT, AuroraConfig

log = logging.getLogger(__name__)

# Environment of every Ray worker. DS_ACCELERATOR is not among it: each process decides from the
# devices it holds (aurora_core.train.zero3.import_deepspeed), so a GPU learner in a run whose
# supervised stages are on CPUs still gets the CUDA accelerator.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # otherwise every worker line is printed twice
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def worker_env(cfg: AuroraConfig) -> dict[str, str]:
    env = {**WORKER_ENV, **logs.progress_env(sys.stderr.isatty())}
    for k in ("MLFLOW_TRACKING_URI", "AURORA_LOG_LEVEL"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    return env


# Ray's single-machine mode: see the module docstring
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray Train v2's placement-group cleaner: its monitor thread and its module's logger (see quiet_train_cleaner)
TRAIN_CLEANER_THREAD = "PlacementGroupCleanerMonitor"
TRAIN_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def init_ray(cfg: AuroraConfig):
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = worker_env(cfg)
    _quiet_ray_data_here(env)
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if address:
        log.info("joining the Ray cluster at %s", address)
        # under `ray job submit` the job's runtime env (working_dir) already ships the code
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        kw = {}
        if cfg.ray.num_cpus:
            kw["num_cpus"] = cfg.ray.num_cpus
        if cfg.ray.object_store_mb:
            kw["object_store_memory"] = cfg.ray.object_store_mb * 1024**2
        # the variable for the raylet, the GCS and every worker (they inherit this environment); for
        # this process, the constant Ray read from it when first imported, in the pipelines before
        # this (the stages import Ray Data). Checked below, should Ray move it.
        os.environ.update(LOCAL_ONLY_ENV)
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        log.info("starting a local Ray on 127.0.0.1")
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {**env, "PYTHONPATH": pythonpath},
                              "worker_process_setup_hook": "aurora_core.runtime.quiet_train_cleaner"}, **kw)
        gcs = ray.get_runtime_context().gcs_address
        if not gcs.startswith("127.0.0.1:"):
            ray.shutdown()
            raise RuntimeError(
                f"the local Ray's GCS is at {gcs}, not on 127.0.0.1: this Ray did not take its "
                f"single-machine mode (aurora_core/runtime.py), so its services would listen on every "
                f"interface. Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment before Python "
                f"starts and check that ray._private.ray_constants.ENABLE_RAY_CLUSTER is False.")
    return ray


def quiet_train_cleaner() -> None:
    """Ray's ``worker_process_setup_hook`` of the local Ray: Ray Train v2's placement-group cleaner
    (a detached actor per training run) polls the controller every second through Ray's state API,
    which needs the dashboard; the local Ray runs without one (~1.1 GiB in 11 processes, measured).
    What the cleaner would do, remove a dead controller's placement group, the local Ray does when the
    driver exits. It fails in one of two ways, both kept out of the console here: the state API's
    error makes it log a warning at every poll (measured on a fresh machine: 29 lines in the teacher's
    first minute, hundreds a demo), and an ambiguous address (another Ray on the machine: "Found
    multiple active Ray instances", or a stale ``/tmp/ray/ray_current_cluster`` of an earlier
    ``ray start``) makes its thread die with a 30-line traceback, once a stage. Its logger is set to
    ERROR, and its thread's exception logged at DEBUG (below a Ray worker's default level, as README's
    troubleshooting says); any other thread's exception goes to Python's hook."""
    import threading

    logging.getLogger(TRAIN_CLEANER_LOGGER).setLevel(logging.ERROR)
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name == TRAIN_CLEANER_THREAD:
            log.debug("Ray Train's placement-group cleaner stopped (no state API without a dashboard): %r",
                      args.exc_value)
            return
        default(args)

    threading.excepthook = hook


def _quiet_ray_data_here(env: dict[str, str]) -> None:
    """The driver's own Ray Data (it runs the executions the stages iterate over), as the workers'."""
    import ray.data

    os.environ.update({k: v for k, v in env.items() if k.startswith(("RAY_", "HF_HUB_"))})
    ray.data.DataContext.get_current().use_ray_tqdm = env.get("RAY_TQDM", "1") != "0"
    logging.getLogger("ray.data").setLevel(env["RAY_DATA_LOG_LEVEL"])
