"""``python -m shira_hooks [VERB]``: the command line (``cli``); without a verb, the demo (``demo``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
