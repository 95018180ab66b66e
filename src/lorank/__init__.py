"""lorank: which LoRA rank for this model, this dataset, this budget?

The Python API mirrors the CLI: `lorank.recommend(model, data, ...)` and
`lorank.prepare_inputs(...)` load lazily (as does `lorank.RankCallback`, for watching an
adapter's rank use in your own Trainer run), so `import lorank` stays cheap. The other verbs live in
`lorank.api` (`lorank.sweep` is the sweep package: a submodule's name wins once it is imported).
"""

__version__ = "0.1.0"
__all__ = ["recommend", "prepare_inputs", "RankCallback"]


def __getattr__(name: str):
    if name == "RankCallback":
        from lorank.callback import RankCallback

        return RankCallback
    if name in __all__:
        from lorank import api

        return getattr(api, name)
    raise AttributeError(f"module 'lorank' has no attribute {name!r}")
