"""Potluck: transfer learning for text, built together.

    from potluck import TextClassifier
    clf = TextClassifier(base="minilm").fit(texts, labels)
    clf.predict_proba(["The server is down and customers cannot pay"])
"""

__version__ = "0.1.0"

from potluck.classifier import TextClassifier  # noqa: E402
from potluck.data import DataError, LabelledData, read_data  # noqa: E402
from potluck.errors import UserError  # noqa: E402
from potluck.finetune import FinetuneSettings  # noqa: E402
from potluck.inference import Predictor  # noqa: E402

__all__ = ["DataError", "FinetuneSettings", "LabelledData", "Predictor", "TextClassifier", "UserError",
           "__version__", "read_data"]
