"""Build the model, count its parameters, run one forward and one generate_with_masks on a few rows.

    python pipelines/inspect_model.py                       # the tiny default
    python pipelines/inspect_model.py --config configs/qwen2.5-omni-7b.yaml   # check local checkpoints load
    python pipelines/inspect_model.py --model runs/tiny/exports/sft          # an exported model
"""

import sys
import time

import torch

from aurora_core import cli, memory, reasoning
from aurora_core.data import shards
from aurora_core.model.build import build_model, load_export, parameter_report


def main() -> int:
    p = cli.arg_parser(__doc__)
    p.add_argument("--model", help="an export directory to load instead of building from the config")
    p.add_argument("--rows", type=int, default=2, help="validation rows to run")
    p.add_argument("--samples", type=int, default=2, help="samples per prompt for generate_with_masks")
    args = p.parse_args()
    cfg = cli.config_from_args(args)
    cli.setup_logging(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    t = time.time()
    if args.model:
        model, proc, _ = load_export(args.model, cfg.data, trainable=True, runtime=cfg.model)
    else:
        model, proc = build_model(cfg.model, cfg.data)
    model.to(device).eval()
    print(f"model built in {time.time() - t:.1f}s on {device}")
    print(f"{'part':22s} {'total':>12s} {'trainable':>12s}")
    for part, n in parameter_report(model).items():
        print(f"{part:22s} {n['total']:12,d} {n['trainable']:12,d}")

    try:
        import pyarrow.parquet as pq

        files = shards.split_files(cfg.data.shards_dir(cfg.run), ["val"])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = pq.read_table(files[0]).slice(0, args.rows)
    raw = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    d = cfg.data
    batch = shards.collate(shards.decode_batch(raw, d.frame_size, d.num_frames, d.sample_rate, d.audio_seconds))
    dtype = next(model.llm.parameters()).dtype

    inp = proc.train_batch(batch, batch["cot"]).to(device, dtype)
    t = time.time()
    with torch.no_grad():
        out = model(inp)
    print(f"forward: tokens {tuple(inp.input_ids.shape)}, logits {tuple(out.logits.shape)}, "
          f"masks {tuple(out.mask_logits.shape)} in {time.time() - t:.2f}s")

    prompts = proc.prompt_batch(batch).to(device, dtype)
    t = time.time()
    r = model.generate_with_masks(prompts, num_samples=args.samples, temperature=1.0, top_p=0.9,
                                  max_new_tokens=cfg.model.max_answer_tokens, eos_id=proc.eos_id,
                                  pad_id=proc.pad_id, suppress_ids=proc.suppress_ids, decode=proc.decode)
    dt = time.time() - t
    n_tok = int(r.completion_mask.sum())
    print(f"generate_with_masks: {len(r.texts)} samples, {n_tok} tokens in {dt:.2f}s ({n_tok / dt:.0f} tok/s), "
          f"masks {tuple(r.mask_logits.shape)}")
    for i, text in enumerate(r.texts):
        parsed = reasoning.parse_answer(text)
        print(f"  [{batch['uid'][i // args.samples]} s{i % args.samples}] class={parsed.predicted_class} "
              f"format={'ok' if parsed.well_formed else 'bad'}: {text[:160]}")
    print(memory.describe(memory.peak_mb()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
