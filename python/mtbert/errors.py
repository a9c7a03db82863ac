"""Every exception and warning type that crosses a module boundary, in one small module.

Each is raised by the module named in its docstring; the command line turns them into one
line and an exit status. Keeping them here lets any module raise or catch them without
importing upward (nothing in this file imports mtbert).
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not fit the model (mtbert.checkpoint)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions); the previous one is kept."""


class DataDirError(FileNotFoundError):
    """No directory holding the handout data files could be found (mtbert.data.readers)."""


class DataFormatError(ValueError):
    """A data file cannot be read (bad encoding, missing column, or a malformed row under strict)."""


class MalformedRowWarning(UserWarning):
    """A data row was skipped; the message gives file, line and reason."""


class DuplicateIdWarning(UserWarning):
    """A training file holds the same id on several rows (the rows are all kept)."""


class ModelFolderError(FileNotFoundError):
    """A model folder is missing or lacks the files an HF BERT folder needs (mtbert.model.pretrained)."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or weight (mtbert.training.finite)."""


class DistributedError(RuntimeError):
    """A collective failed: another rank died or cannot be reached (mtbert.training.distributed)."""


class RunFolderError(ValueError):
    """The run folder cannot be used: it is locked by another run, or cannot be created (mtbert.checkpoint.runfolder)."""


class MissingExtraError(ValueError):
    """An optional integration was asked for but its package is not installed; the message
    names the extra to install, e.g. `pip install 'mtbert[tensorboard]'` or `'mtbert[hf]'`
    (mtbert.extras)."""
