"""optc: an ahead-of-time inference compiler for PyTorch models.

Public API (what the CLI is built on)::

    import optc
    art = optc.compile(model, example_inputs, target="cpu", passes={"skip_layers.count": 2})
    art.save("model.optc")
    art = optc.load("model.optc")
    calib = optc.read_calibration("text.txt", model, example_inputs)  # --calibration PATH

Submodules are imported on first use so that `import optc` stays cheap and changes
no global torch state.
"""

from optc.version import __version__

__all__ = ["compile", "load", "read_calibration", "__version__"]


def __getattr__(name):
    if name in ("compile", "load", "read_calibration"):
        from optc import api

        return getattr(api, name)
    raise AttributeError(f"module 'optc' has no attribute {name!r}")
