"""Integrations with other libraries' training loops: ``ShiraCallback`` for the Hugging Face ``Trainer`` and
TRL's ``SFTTrainer``.

The only part of shira_hooks that imports transformers (``import shira_hooks`` does not import this).
"""

from .callback import ADAPTER_FILE, ADAPTER_FOLDER, STATE_FILE, ShiraCallback

__all__ = ["ShiraCallback", "ADAPTER_FILE", "ADAPTER_FOLDER", "STATE_FILE"]
