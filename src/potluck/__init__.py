"""Potluck: transfer learning for text, built together.

    from potluck import TextClassifier
    clf = TextClassifier(base="minilm").fit(texts, labels)
    clf.predict_proba(["The server is down and customers cannot pay"])
"""

__version__ = "0.1.0"

# The public names load on first use (PEP 562): `potluck predict` and `potluck serve` start without
# importing scikit-learn or transformers, which the training side needs.
_EXPORTS = {"TextClassifier": "potluck.classifier", "DataError": "potluck.data", "LabelledData": "potluck.data",
            "read_data": "potluck.data", "UserError": "potluck.errors", "FinetuneSettings": "potluck.finetune",
            "Predictor": "potluck.inference"}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'potluck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
