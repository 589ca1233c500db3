"""`python -m meddap ...` (and `torchrun ... -m meddap run CONFIG`) is the `meddap` command."""
import sys

from meddap.cli import main

sys.exit(main())
