"""``python -m shira_hooks.bench``: the switching micro-benchmark; it lives in ``tools/bench.py``, and this
module keeps the command short."""

from .tools.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
