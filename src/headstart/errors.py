"""The one base class for problems a user can cause and fix: the CLI prints its message and exits 2."""


class UserError(Exception):
    """A one-line message that says what is wrong and what to do."""
