"""Prepare a dataset: Ref-AVS layout (official release or our synthetic benchmark) -> Parquet shards.

    python pipelines/prepare_data.py                                  # synthetic, configs/tiny.yaml
    python pipelines/prepare_data.py --source refavs --root /data/refavs --out /data/refavs-shards
    python pipelines/prepare_data.py --source refavs --root DIR --lenient   # quarantine bad rows
"""

import sys

from aurora_core import cli
from aurora_core.config import Source, to_dict
from aurora_core.data import shards, synthetic
from aurora_core.data.refavs import BadRow, DatasetError


def main() -> int:
    p = cli.arg_parser(__doc__)
    p.add_argument("--source", choices=[s.value for s in Source], help="overrides data.source")
    p.add_argument("--root", help="dataset root in the Ref-AVS layout (overrides data.root)")
    p.add_argument("--out", help="shard directory to write (overrides data.shards)")
    p.add_argument("--lenient", action="store_true", help="quarantine bad rows instead of stopping")
    args = p.parse_args()
    cli.setup_logging()
    overrides = list(args.overrides)
    overrides += [f"data.source={args.source}"] if args.source else []
    overrides += [f"data.root={args.root}"] if args.root else []
    overrides += [f"data.shards={args.out}"] if args.out else []
    overrides += ["data.lenient=true"] if args.lenient else []
    args.overrides = overrides
    cfg = cli.config_from_args(args)
    data = cfg.data

    root = data.raw_dir(cfg.run)
    if data.source == Source.synthetic:
        print(f"generating synthetic Ref-AVS (seed {data.synthetic.seed}) into {root}")
        synthetic.generate(root, data)
    elif data.root is None:
        print("error: --source refavs needs --root DIR (the Ref-AVS release: metadata.csv, media/, gt_mask/)",
              file=sys.stderr)
        return 2
    out = data.shards_dir(cfg.run)
    try:
        summary = shards.convert(root, out, data, source=data.source.value,
                                 seed=data.synthetic.seed if data.source == Source.synthetic else None,
                                 config=to_dict(cfg))
    except (BadRow, DatasetError) as e:
        print(f"error: {e}\n(use --lenient to quarantine bad rows and go on)", file=sys.stderr)
        return 1
    print(summary.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
