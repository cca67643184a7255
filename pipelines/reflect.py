"""Stage 2: run the stage-1 model over the train split (a Ray Data actor pool), build reflective targets
for its wrong answers (own reasoning + "Wait, let me reconsider." + the correct CoT), keep the right
ones, write that dataset as shards, then train on it with the same loop.

    python pipelines/reflect.py [--config configs/tiny.yaml] [key=value ...]

Rerunning with the same run.name resumes from the last checkpoint; a finished stage is skipped.
"""

import sys

from aurora_core import cli

if __name__ == "__main__":
    sys.exit(cli.stage_main(__doc__, "reflect"))
