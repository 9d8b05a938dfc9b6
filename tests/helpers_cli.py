"""What the tests of headstart's command line share: the one-line error message check.

Not a test file (pytest collects only test_*.py); imported as `from helpers_cli import ...`.
"""

from __future__ import annotations


def assert_one_line(message: str, *needles: str) -> str:
    """`message` is one non-empty line holding every needle; returns it."""
    assert message and "\n" not in message, repr(message)
    for needle in needles:
        assert needle in message, message
    return message
