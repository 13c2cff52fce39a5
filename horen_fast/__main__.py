"""``python -m horen_fast``: the ``horen-fast`` command."""
import sys

from horen_fast.cli import main

sys.exit(main())
