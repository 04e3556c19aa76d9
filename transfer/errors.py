"""The one exception type for input a user can fix.

The CLI prints a `UserError` as one line (`transfer: error: ...`) and exits 2; anything else is a
bug and keeps its traceback. Messages name the thing that is wrong and how to fix it. It derives
from ValueError so library callers can catch it as such.
"""


class UserError(ValueError):
  """Bad input (a file, a name, a flag, a config value) with a one-line message."""
