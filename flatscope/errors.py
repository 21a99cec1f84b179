"""The one exception type flatscope raises for bad input.

The CLI turns a :class:`FlatscopeError` into a single ``Error: ...`` line on stderr and
exit code 2; library users catch it like any other exception.
"""


class FlatscopeError(Exception):
    """Bad input or an impossible request, with a message meant for the user."""
