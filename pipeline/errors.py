"""User-facing error types.

Anything derived from :class:`ProsecoError` is an expected failure caused by the user's
input (a bad config key, a missing file, ...). The CLI prints such errors as a single
``error: <message>`` line without a traceback (``--debug`` adds it), so messages must be
self-contained: name the offending key/file and, where possible, the fix.
"""

from __future__ import annotations


class ProsecoError(Exception):
    """Base class for errors whose message is shown to the user without a traceback."""


class ConfigError(ProsecoError):
    """An invalid configuration: unknown key, wrong type, or out-of-range value."""
