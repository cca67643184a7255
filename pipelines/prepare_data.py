"""Prepare a dataset: an official layout (Ref-AVS or AVSBench release, or our synthetic benchmark) -> Parquet shards.

    python pipelines/prepare_data.py                                  # synthetic Ref-AVS, configs/tiny.yaml
    python pipelines/prepare_data.py --source refavs --root /data/refavs --out /data/refavs-shards
    python pipelines/prepare_data.py --source refavs --root DIR --lenient   # quarantine bad rows
    python pipelines/prepare_data.py --source avsbench --root /data/avsbench_data --subset s4 --out DIR
    python pipelines/prepare_data.py --subset ms3                     # synthetic, in the AVSBench layout

An AVSBench root is the folder holding Single-source/ and Multi-sources/; its clips have 5 frames
(data.num_frames=5 and data.audio_seconds=5 are set with --subset).
"""

import sys

from aurora_core import cli
from aurora_core.config import Source, to_dict
from aurora_core.data import shards, synthetic
from aurora_core.data.refavs import BadRow, DatasetError


def main() -> int:
    p = cli.arg_parser(__doc__)
    p.add_argument("--source", choices=[s.value for s in Source], help="overrides data.source")
    p.add_argument("--root", help="dataset root in the official layout (overrides data.root)")
    p.add_argument("--out", help="shard directory to write (overrides data.shards)")
    p.add_argument("--subset", choices=["s4", "ms3"], help="an AVSBench subset (overrides data.subset)")
    p.add_argument("--lenient", action="store_true", help="quarantine bad rows instead of stopping")
    args = p.parse_args()
    overrides = list(args.overrides)
    overrides += [f"data.source={args.source}"] if args.source else []
    overrides += [f"data.root={args.root}"] if args.root else []
    overrides += [f"data.shards={args.out}"] if args.out else []
    overrides += ["data.lenient=true"] if args.lenient else []
    overrides += [f"data.subset={args.subset}", "data.num_frames=5", "data.audio_seconds=5"] if args.subset else []
    args.overrides = overrides
    cfg = cli.config_from_args(args)
    cli.setup_logging(cfg)
    data = cfg.data

    if data.source != Source.synthetic and data.root is None:
        layout = ("metadata.csv, media/, gt_mask/" if data.subset is None
                  else "Single-source/ and Multi-sources/, as avsbench_data/ of the official repository")
        print(f"error: --source {data.source.value} needs --root DIR (the release: {layout})", file=sys.stderr)
        return 2
    root = data.raw_dir(cfg.run)
    if data.source == Source.synthetic:
        if data.subset is None:
            print(f"generating synthetic Ref-AVS (seed {data.synthetic.seed}) into {root}")
            synthetic.generate(root, data)
        else:
            print(f"generating the synthetic unreferenced set in the AVSBench layout (seed {data.synthetic.seed}) "
                  f"into {root}")
            synthetic.generate_avsbench(root, data)
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
