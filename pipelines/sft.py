"""Stage 1: structured-CoT SFT with [SEG] feature distillation against the frozen stage-0 teacher.

    python pipelines/sft.py [--config configs/tiny.yaml] [key=value ...]

Rerunning with the same run.name resumes from the last checkpoint; a finished stage is skipped.
"""

import sys

from aurora_core import cli

if __name__ == "__main__":
    sys.exit(cli.stage_main(__doc__, "sft"))
