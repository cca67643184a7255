"""The whole pipeline on one command (what `make demo` runs): prepare the data, then each stage.

    python pipelines/all.py [--config configs/tiny.yaml] [key=value ...]
"""

import subprocess
import sys
from pathlib import Path

from aurora_core import cli
from aurora_core.data import shards

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = cli.arg_parser(__doc__)
    args = p.parse_args()
    cli.setup_logging()
    cfg = cli.config_from_args(args)
    common = ["--config", args.config, *args.overrides]
    out = cfg.data.shards_dir(cfg.run)
    try:
        manifest = shards.load_manifest(out)
        print(f"[data] complete shard set at {out} ({sum(manifest['counts'].values())} rows): skipped")
    except FileNotFoundError:
        r = subprocess.run([sys.executable, str(HERE / "prepare_data.py"), *common])
        if r.returncode:
            return r.returncode
        manifest = shards.load_manifest(out)
    print("rows per split: " + ", ".join(f"{k} {v}" for k, v in manifest["counts"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
