"""Stage 0: train the teacher (direct answers "It is <class> [SEG].") on Ray Train + DeepSpeed ZeRO-3.

    python pipelines/teacher.py [--config configs/tiny.yaml] [key=value ...]

Rerunning with the same run.name resumes from the last checkpoint; a finished stage is skipped.
"""

import sys

from aurora_core import cli

if __name__ == "__main__":
    sys.exit(cli.stage_main(__doc__, "teacher"))
