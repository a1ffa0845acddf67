"""``python -m gpucrypt``: the same command line as the ``gpucrypt`` script."""
import sys

from gpucrypt.cli import main

sys.exit(main())
