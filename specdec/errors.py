"""Errors that carry a message for the user: what is wrong and what to do.

Every error raised on purpose by specdec derives from :class:`SpecdecError`, so
the CLI and the webui extension can show ``str(error)`` without a traceback.
"""

from __future__ import annotations


class SpecdecError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}\n  hint: {hint}" if hint else message)


class ModelNotFoundError(SpecdecError):
    """A model name, folder or file that cannot be found or read."""


class VocabularyMismatchError(SpecdecError):
    """A draft model whose tokens differ from the target's."""


class MissingDraftError(SpecdecError, ValueError):
    """The method ``draft`` without a draft model."""


class MissingHeadsError(SpecdecError, ValueError):
    """The method ``medusa`` without Medusa heads."""


class ChatContentError(SpecdecError, ValueError):
    """A chat message whose content is not text.

    Attributes:
        index: the message's index in the chat.
        part: the index of the first part that is not text, or None when the content is neither a string
            nor a list of parts.
    """

    def __init__(self, index: int, part: int | None, what: str) -> None:
        where = f"chat message {index}" if part is None else f"chat message {index}, content part {part},"
        super().__init__(
            f'{where} is {what}; specdec takes text: a string or a list of {{"type": "text", "text": ...}} parts',
            'e.g. [{"role": "user", "content": "Hello"}]',
        )
        self.index = index
        self.part = part


class ContextLengthError(SpecdecError):
    """Prompt plus max_new_tokens does not fit the model's context."""


class InvalidSamplingError(SpecdecError, ValueError):
    """A sampling value outside its valid range."""


class UnknownMethodError(SpecdecError, ValueError):
    """A method name that specdec does not know."""


class ForeignOptionsError(SpecdecError, ValueError):
    """Options of another method than the one used (``options``: their names; ``owners``: for each, the methods
    it belongs to), so a setting never goes silently unused."""

    def __init__(self, message: str, hint: str, method: str, owners: dict[str, list[str]]) -> None:
        super().__init__(message, hint)
        self.method = method
        self.owners = owners


class MissingExtraError(SpecdecError, ImportError):
    """An optional dependency is not installed."""

    def __init__(self, extra: str, package: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the package '{package}', which is not installed.",
            f"install it with: pip install 'specdec[{extra}]'",
        )
        self.extra = extra
        self.package = package


class UnsupportedModelError(SpecdecError):
    """A model that a method cannot run on (e.g. attention that takes no custom mask)."""


class StaticCacheMemoryError(SpecdecError, MemoryError):
    """The static KV cache (preallocated for a whole generation) does not fit in memory.

    Attributes:
        mib: the size it needed, in MiB.
        capacity: the positions it was to hold.
    """

    def __init__(self, mib: float, capacity: int) -> None:
        super().__init__(
            f"out of memory allocating the static KV cache: {mib:.0f} MiB for {capacity} positions",
            "use --no-static-cache (static_cache=False), or a shorter prompt / fewer new tokens",
        )
        self.mib = mib
        self.capacity = capacity


class GeneratorBusyError(SpecdecError, RuntimeError):
    """A generator asked to decode while another of its generations runs (another thread), or a stream resumed
    after another generation of the same generator took over its KV cache."""


class CorruptModelError(SpecdecError):
    """A model file that is truncated, corrupt or differs from what was pulled."""
