"""``python -m dist_opt.launch ...`` is ``dist-opt launch ...``."""

import sys

from dist_opt.launch.cli import main

sys.exit(main(sys.argv[1:]))
