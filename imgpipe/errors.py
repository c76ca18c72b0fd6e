"""One exception hierarchy for the whole service.

``PermanentError`` means the input or the request is wrong: retrying cannot help, the
job or stage ends in a terminal state with the message as its reason.
``TransientError`` means something around us failed (broker, database, device): the
work is retried with backoff up to ``max_attempts`` and then dead-lettered.

Every message says what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ImageRejectedError",
    "ImgpipeError",
    "OverrideNotAllowedError",
    "PermanentError",
    "PipelineSpecError",
    "StageNotInstalledError",
    "TransientError",
    "UnknownPipelineError",
    "WeightsMismatchError",
]


class ImgpipeError(Exception):
    """Base class of every error imgpipe raises on purpose."""


class PermanentError(ImgpipeError):
    """Bad input or a bad request: never retried."""


class TransientError(ImgpipeError):
    """A failure of something around the work: retried with backoff, then dead-lettered."""


class ConfigError(PermanentError):
    """A setting is missing or malformed."""


class ImageRejectedError(PermanentError):
    """The uploaded bytes are not an image imgpipe will process.

    ``code`` is a short machine-readable reason (``too_many_bytes``, ``unsupported_format``,
    ``decompression_bomb``, ``corrupt``, ...) stored on the rejected job.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PipelineSpecError(PermanentError):
    """A pipeline definition is invalid; the message names the offending field."""


class UnknownPipelineError(PermanentError):
    """A submission names a pipeline that is neither built in nor registered."""


class OverrideNotAllowedError(PermanentError):
    """A per-submission override sets a parameter the pipeline file does not let
    submitters set (a file path, or a threshold not in the stage's ``overridable``)."""


class StageNotInstalledError(PipelineSpecError):
    """A pipeline names a stage kind whose implementation is not installed here."""


class WeightsMismatchError(PermanentError):
    """A weights file's sha256 differs from the one pinned in configuration."""
