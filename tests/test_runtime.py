"""The local Ray that aurora_core.runtime.init_ray starts: loopback only, and Ray Train's cleaner quiet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import ROOT

# A fresh interpreter (Ray's single-machine mode is read when Ray is imported): start the local Ray the
# way the pipelines do, start workers, and list what every process of the session listens on.
SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import psutil
    import ray.data  # imported before init_ray, as the pipelines' stages do
    from aurora_core.config import load_config
    from aurora_core.runtime import TRAIN_CLEANER_THREAD, init_ray

    cfg = load_config("configs/tiny.yaml", ["run.root=" + sys.argv[1]])
    ray = init_ray(cfg)

    @ray.remote(num_cpus=0)
    class Raiser:
        def run(self):
            # the thread name Ray Train v2's placement-group cleaner gives its monitor, and another
            for name, msg in ((TRAIN_CLEANER_THREAD, "cleaner-boom"), ("other", "other-boom")):
                t = threading.Thread(target=lambda m=msg: (_ for _ in ()).throw(ValueError(m)), name=name)
                t.start()
                t.join()
            # the level of the real cleaner module's logger in a worker (it warns at every poll when
            # Ray's state API answers "no dashboard")
            import logging
            from ray.train.v2._internal.execution.controller import placement_group_cleaner
            return logging.getLogger(placement_group_cleaner.__name__).getEffectiveLevel()

    a = Raiser.remote()
    print("CLEANER_LOG_LEVEL", ray.get(a.run.remote()))
    time.sleep(3)  # the workers' stderr reaches this console asynchronously
    listening = set()
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening |= {(p.name(), c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN}
    print("GCS", ray.get_runtime_context().gcs_address)
    print("LISTENING", json.dumps(sorted(listening)))
    ray.shutdown()
""")


def test_the_local_ray_listens_on_the_loopback_only_and_keeps_the_train_cleaner_quiet(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "GCS 127.0.0.1:" in r.stdout
    listening = json.loads(r.stdout.split("LISTENING ", 1)[1].splitlines()[0])
    names = {name for name, _ in listening}
    # the GCS and the raylet at least, and each listens on the loopback (IPv4 or IPv4-mapped IPv6) only
    assert {"gcs_server", "raylet"} <= names, listening
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for _, ip in listening), listening
    # the worker's other threads still report; the cleaner's traceback does not reach the console
    assert "other-boom" in r.stderr
    assert "cleaner-boom" not in r.stderr + r.stdout
    # and its warnings are off (on a machine with one Ray it printed "Failed to query Ray Train
    # Controller actor state" every second of every training stage)
    assert "CLEANER_LOG_LEVEL 40" in r.stdout, r.stdout[-2000:]
