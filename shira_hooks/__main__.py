"""``python -m shira_hooks [VERB]``: the command line (``tools/cli.py``); without a verb, the demo (``tools/demo.py``)."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
