"""optc's version, in a module that imports nothing: the runtime writes it into every
artifact's manifest without importing the `optc` package (whose lazy API leads back
to the runtime)."""

__version__ = "0.1.0"
