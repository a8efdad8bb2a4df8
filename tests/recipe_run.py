"""Runs one recipe's command line and writes the result its ``run()`` returned as JSON (tests/test_recipes.py).

    python tests/recipe_run.py RESULT.json RECIPE [ARGUMENTS...]      # also under torchrun / accelerate launch

The recipe runs as a user runs it: a fresh process, its folder first on ``sys.path``, its ``main(argv)``
(whose exit status this script exits with), its own thread and warning settings. Only ``run()`` is
wrapped, to keep the value it returns. ``RESULT`` may hold ``{rank}``: each process of a launcher
writes its own file (RANK from the launcher's environment, 0 without one).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import warnings
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def main() -> int:
    result_path, name, *argv = sys.argv[1:]
    sys.path.insert(0, str(RECIPES))  # what `python recipes/NAME.py` does
    sys.argv = [str(RECIPES / f"{name}.py"), *argv]
    warnings.filterwarnings("default", category=DeprecationWarning, module=name)  # as Python does for a script
    recipe = importlib.import_module(name)
    results = []
    run = recipe.run
    recipe.run = lambda argv=None: results.append(run(argv)) or results[-1]
    status = recipe.main(argv)
    (result,) = results
    path = Path(result_path.format(rank=os.environ.get("RANK", "0")))
    path.write_text(json.dumps(dataclasses.asdict(result), default=str))  # Path -> str
    return status


if __name__ == "__main__":
    raise SystemExit(main())
