"""``python -m ibkit``: the same as the ``ibkit`` command."""

import sys

from ibkit.app import main

if __name__ == "__main__":
    sys.exit(main())
