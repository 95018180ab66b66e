"""lorank: which LoRA rank for this model, this dataset, this budget?

The Python API mirrors the CLI: `lorank.recommend(model, data, ...)`, `lorank.sweep(...)`,
`lorank.prepare_inputs(...)`. They load lazily, so `import lorank` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["recommend", "sweep", "prepare_inputs"]


def __getattr__(name: str):
    if name in __all__:
        from lorank import api

        return getattr(api, name)
    raise AttributeError(f"module 'lorank' has no attribute {name!r}")
