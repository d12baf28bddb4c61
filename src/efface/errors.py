"""Exceptions efface raises on bad input; each message says what to do instead."""


class EffaceError(Exception):
    """Base class of efface's own errors."""


class InputError(EffaceError, ValueError):
    """An argument is wrong (unknown name, empty or too-long concept, unsupported model...)."""


class ModelLoadError(EffaceError):
    """A model could not be loaded (missing files, offline hub id, refused pickle checkpoint)."""


class TrainingDiverged(EffaceError, RuntimeError):
    """A loss became NaN or infinite; the message names where. Nothing half-done is written."""
