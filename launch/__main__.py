"""Deprecated: ``python -m launch ...`` runs ``python -m dist_opt.launch ...`` with a warning."""

import sys
import warnings

from launch import MESSAGE

warnings.warn(MESSAGE, DeprecationWarning, stacklevel=1)

from dist_opt.launch.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
