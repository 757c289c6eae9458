"""``python -m cl_lib.experiments NAME [--full | --smoke] [--seeds 0,1,2] [--out results]``."""

import sys

from cl_lib.experiments.cli import main

sys.exit(main())
