"""``python -m launch ...`` is ``dist-opt launch ...``."""

import sys

from launch.cli import main

sys.exit(main(sys.argv[1:]))
