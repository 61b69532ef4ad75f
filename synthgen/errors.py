"""User-facing errors.

Anything raised as a :class:`SynthgenError` is a problem with the user's input or environment; the
CLI prints its message as one line and exits non-zero without a traceback. Everything else is a bug.
"""


class SynthgenError(Exception):
    """An error the user can fix (bad recipe, missing file, unknown model, ...)."""


class RecipeError(SynthgenError):
    """The recipe is malformed or asks for something impossible."""


class ModelNotFoundError(SynthgenError):
    """A recipe's ``generator.model`` names a local folder that does not exist."""


class OutputFolderError(SynthgenError):
    """The output folder holds something that this build must not touch."""


class MissingSplitError(SynthgenError):
    """A dataset has no split of the name asked for (the message lists those it has)."""
