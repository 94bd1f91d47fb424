"""The refusal every stage turns into a one-line message and exit status 2, kept free of heavy imports so that
a stage that needs no torch (report, ema) does not import it to catch it."""


class DataError(ValueError):
    """Invalid data configuration or data file; the message names the params key."""
