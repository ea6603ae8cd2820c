"""The one exception type for mistakes a user can fix (bad input, bad config).

The command line prints its message on one line and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; its message is one line that says what to do.

    >>> import dcgan
    >>> try:
    ...     dcgan.load("no/such/run")
    ... except dcgan.UserError as e:
    ...     print(e)
    no generator snapshot at no/such/run (expected a run folder or a generator.safetensors file)
    """
