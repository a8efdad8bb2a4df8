"""Programs on top of the library: the command line, the demo, the switching micro-benchmark, and the
timing and report helpers that ``benchmarks/`` uses.

* ``cli``: ``python -m shira_hooks <verb>`` (the ``shira-hooks`` console script);
* ``demo``: the embedded demo (``python -m shira_hooks``);
* ``bench``: ``python -m shira_hooks.bench``;
* ``timing``: interleaved timing, machine description, JSON and markdown reports;
* ``help``: the ``--help`` formatter the verbs share.

The names below are for scripts (the benchmarks are users: they import these, nothing private).
"""

from .._base import atomic_write
from .help import DefaultsFormatter
from .timing import Stats, command_line, machine, publish, report_header, time_interleaved, time_pair

__all__ = [
    "atomic_write",
    "DefaultsFormatter",
    "Stats",
    "command_line",
    "machine",
    "publish",
    "report_header",
    "time_interleaved",
    "time_pair",
]
