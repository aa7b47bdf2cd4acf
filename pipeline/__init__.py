"""longreel: minute-long, multi-shot video generation with diffusion transformers on Ray."""

__version__ = "0.1.0"


def __getattr__(name):  # `from pipeline import Pipeline` without importing Ray on every import
    if name in ("Pipeline", "submit"):
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(name)
