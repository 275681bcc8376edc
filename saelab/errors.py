"""saelab's own error classes: problems a user can meet and fix (bad input, a busy folder, a full disk).

The CLI prints a :class:`SaelabError` as one line (``saelab: error: ...``, exit code 2) and the web app
answers it with its ``http_status``; anything else is a bug and keeps its traceback. Each subclass also
derives from the builtin error its callers caught before it existed (ValueError, OSError), so older
``except ValueError`` code keeps working.
"""

from __future__ import annotations


class SaelabError(Exception):
    """A user-facing error: the message says what was wrong, where, and what to do."""

    http_status = 422


class FolderLocked(SaelabError, RuntimeError):
    """Another live process holds the lock on a folder or file this job would write."""

    http_status = 409


class StorageError(SaelabError, OSError):
    """A write failed for lack of space or permission (ENOSPC, EDQUOT, EROFS, EACCES)."""

    http_status = 507


class DatabaseDamaged(SaelabError, ValueError):
    """features.db cannot be read: corrupt pages, missing tables, or a foreign schema."""

    http_status = 500


class SAEMismatch(SaelabError, ValueError):
    """features.db was built for a different SAE than the one given with it."""

    http_status = 409


class InvalidSAE(SaelabError, ValueError):
    """An SAE file or folder whose config or weights are malformed or unsafe to load."""


class InvalidModel(SaelabError, ValueError):
    """A model folder saelab will not load (only pickled weights, a broken config)."""


class ChatTemplateError(SaelabError, ValueError):
    """A model's chat template failed, tried to leave its sandbox, or ran past its time or size bounds."""


class NotAFile(SaelabError, ValueError):
    """A path that should be a regular file is a FIFO, device, socket or folder (reading it could block forever)."""
