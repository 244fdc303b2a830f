"""The one error type for mistakes a user can make (a bad value, a missing or damaged
file). The library raises it where the user's input is at fault; the command-line tools
catch it in one place (`lseg_jax.cli.common.run`) and print `error: <message>`, exit
code 2. Every other exception is a bug and keeps its traceback.

It subclasses ValueError so that library callers which catch ValueError keep working.
"""


class UserError(ValueError):
  """A problem with the user's input or files; its message names the bad value and
  what was expected."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the user named (or the tool needs from them) is not there; also a
  FileNotFoundError, for callers that handle that."""


class NonFiniteError(UserError, FloatingPointError):
  """Training diverged (a non-finite loss or gradient: too high a learning rate), or
  arrays to be saved are not finite; also a FloatingPointError."""
