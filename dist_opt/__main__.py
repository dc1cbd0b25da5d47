import sys

from dist_opt.cli import main

sys.exit(main())
