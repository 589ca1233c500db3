"""torchrun entry for tests/test_pipeline_distributed.py: `meddap run` whose rank 1 fails in its
first LoRA fold with a MeddapError, to show that every rank stops with that rank's message."""
import os
import sys

import meddap.pipeline.run as run
from meddap.cli import main
from meddap.errors import MeddapError

if os.environ.get("RANK") == "1":
    def failing_lora(ctx, split, fold, work):
        if work:
            raise MeddapError(f"planted failure in the LoRA stage of fold {fold}")
        return None
    run.stage_lora = failing_lora

sys.exit(main(sys.argv[1:]))
