"""The one exception type for mistakes a user can fix (bad input, bad config).

The command line prints its message on one line and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    pass
