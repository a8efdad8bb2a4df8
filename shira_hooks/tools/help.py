"""The ``--help`` formatter the command-line verbs share (``cli``, ``bench``, ``demo``)."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has a meaningful one (not for None, flags and required options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:  # as argparse declares it
        if action.default is None or action.default is False or action.required or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)
