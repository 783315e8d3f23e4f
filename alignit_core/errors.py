"""Errors meant for people: the UI shows them with gr.Error, the CLI prints them and exits 2."""


class AlignITError(ValueError):
    """Bad input from a user. The message says what is wrong and how to fix it."""


class PromptError(AlignITError):
    """The prompt, a position or a swap cannot be used."""


class ConceptError(AlignITError):
    """A concept file or manifest is missing, malformed, unsafe or for another model."""


class ModelError(AlignITError):
    """The model cannot be found or loaded."""


class SettingsError(AlignITError):
    """A generation setting (steps, guidance, size, seed, scheduler) is out of range."""


def short(text: str, limit: int = 160) -> str:
    """`text` as a message may quote it: at most `limit` characters, cut with "…" (a name in a
    visitor's file may be 100,000 characters long; a layer's, about 90)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
