"""The one exception type that reaches the user as a single line and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (file, row, column, config key, checkpoint).

    The CLI prints ``handclip: error: <message>`` and exits with code 2, no traceback.
    The message must name the file, row, column or key at fault.
    """
