"""Request and response shapes of the HTTP API, following text-embeddings-inference's `/predict`.

    POST /v1/models/urgency/predict   {"inputs": "The site is down!"}
        [{"label": "urgent", "score": 0.93}, {"label": "not_urgent", "score": 0.07}]
    POST /v1/models/urgency/predict   {"inputs": ["The site is down!", "Thanks!"], "raw_scores": false}
        [[{"label": "urgent", ...}, ...], [{"label": "not_urgent", ...}, ...]]

Like TEI, a batch item may also be a one-string list (`[["a"], ["b"]]`); pairs of texts are refused,
since these models classify single texts. Labels in each answer are sorted by score, highest first.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PredictRequest(BaseModel):
    """What a client sends to a model's predict route."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": "The site is down!"}]})

    inputs: str | list[str | list[str]] = Field(
        description="one text, or a list of texts (a batch); the answer has the same shape")
    raw_scores: bool = Field(default=False, description="return the model's logits instead of probabilities")
    truncate: bool | None = Field(
        default=None, description="cut texts longer than the model's max_length (default: the server's "
                                  "--auto-truncate); false refuses them with 422")

    @field_validator("inputs")
    @classmethod
    def _flatten(cls, value):
        if isinstance(value, str):
            return value
        flat = []
        for i, item in enumerate(value):
            if isinstance(item, list):
                if len(item) != 1:
                    raise ValueError(f"item {i} is a list of {len(item)} strings: pairs of texts are not "
                                     "supported, send one string per item")
                item = item[0]
            flat.append(item)
        return flat

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class Prediction(BaseModel):
    """One label's score for one text."""

    label: str = Field(examples=["urgent"])
    score: float = Field(examples=[0.93], description="probability (or logit with raw_scores)")


PredictResponse = list[Prediction] | list[list[Prediction]]


class ErrorResponse(BaseModel):
    """Every error answer: one line that says what is wrong and what to do."""

    error: str = Field(examples=["unknown model 'urgncy'; loaded: urgency, intent"])
    error_type: str = Field(examples=["validation"], description="validation, payload_too_large, not_found, "
                                                                  "unauthorized, unavailable or internal")


class ModelInfo(BaseModel):
    """What /info says about one loaded model."""

    name: str
    route: str
    labels: list[str]
    base: str | None = None
    max_length: int
    precision: str = Field(description="the precision that runs on this CPU (see potluck.hardware)")
    backend: str = "torch"
    created: str | None = None
    metrics: dict = Field(default_factory=dict, description="metrics recorded at training time (potluck.json)")
    calibration: dict = Field(default_factory=dict)


class Limits(BaseModel):
    max_texts: int
    max_chars: int
    max_body_bytes: int
    auto_truncate: bool


class Info(BaseModel):
    """GET /info."""

    version: str
    models: list[ModelInfo]
    limits: Limits
    auth: bool = Field(description="whether predict, info and metrics need `Authorization: Bearer <key>`")
