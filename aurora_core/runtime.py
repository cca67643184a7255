"""Connecting to Ray: join a cluster (``ray.address`` or RAY_ADDRESS, e.g. under ``ray job submit``) or
start a local one bound to 127.0.0.1, with the environment every worker needs."""

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
    env = {**WORKER_ENV, **logs.ray_data_env(sys.stderr.isatty())}
    for k in ("MLFLOW_TRACKING_URI", "AURORA_LOG_LEVEL"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    return env


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
        log.info("starting a local Ray on 127.0.0.1")
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {**env, "PYTHONPATH": pythonpath}}, **kw)
    return ray


def _quiet_ray_data_here(env: dict[str, str]) -> None:
    """The driver's own Ray Data (it runs the executions the stages iterate over), as the workers'."""
    import ray.data

    os.environ.update({k: v for k, v in env.items() if k.startswith("RAY_")})
    ray.data.DataContext.get_current().use_ray_tqdm = env.get("RAY_TQDM", "1") != "0"
    logging.getLogger("ray.data").setLevel(env["RAY_DATA_LOG_LEVEL"])
