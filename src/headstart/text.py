"""Text as any UTF-8 output can carry it: the one rule for showing names that came from the file system.

A file name that is not valid UTF-8 reaches Python with its bad bytes as surrogate escapes (PEP 383), which a
UTF-8 stream, an HTML page or a CSV file refuses (`UnicodeEncodeError: surrogates not allowed`). Everything that
writes a name for a person shows it through `shown`, as `predict` always has: the name b"\\xff.jpg" is `\\xff.jpg`.
Standard library only: the CLI's first import reads it.
"""

from __future__ import annotations


def shown(text: object) -> str:
    """`text` as any UTF-8 output can carry it: the undecodable bytes of a file name (surrogate escapes, U+DC80 to
    U+DCFF) as `\\xNN`, any other lone surrogate as `\\uXXXX`. Valid text is returned unchanged."""
    s = str(text)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return "".join(_escape(ch) if "\ud800" <= ch <= "\udfff" else ch for ch in s)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"
