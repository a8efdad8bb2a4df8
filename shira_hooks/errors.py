"""The one exception type shira_hooks raises for bad input."""


class ShiraError(ValueError):
    """Bad input to shira_hooks: the message names the module, the value received and the fix.

    A ``ValueError`` subclass, so code that already catches ``ValueError`` keeps working.
    Whenever it is raised, the model, the optimizer and any file on disk are left as they were.
    """
