"""The parameters of the `language` relabeler (`language:model=...,per=segment,n=3`).

Two modes, one model: descriptions (the default) and paraphrases (`source=COLUMN` and/or
`paraphrases=N`: paraphrase.py), which share the endpoint, model and budget parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from relabelers import llm
from schemas.frames import DEFAULT_CAMERA


class LanguageParams(llm.EndpointParams):
    model: str = Field("gpt-4o-mini", description="chat model name at the endpoint")
    per: Literal["episode", "segment"] = Field(
        "episode", description="describe whole episodes, or segments of `segment` steps"
    )
    n: int = Field(3, ge=1, le=16, description="descriptions per episode/segment")
    segment: int = Field(50, ge=1, description="steps per segment (per=segment)")
    describer: Literal["auto", "llm", "template"] = Field(
        "auto", description="auto: the LLM when an endpoint is configured, else the template"
    )
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="sampling temperature")
    max_tokens: int = Field(400, ge=16, description="max tokens per answer")
    concurrency: int = Field(16, ge=1, description="requests in flight per part")
    max_requests: int | None = Field(None, ge=0, description="request budget for the job")
    max_tokens_budget: int | None = Field(None, ge=0, description="token budget for the job")
    retry_failed: bool = Field(False, description="ask again for requests that failed before")
    prompt: str | None = Field(None, description="prompt template file (default describe_v1)")
    goal_threshold: float = Field(
        0.05, ge=0.0, description="achieved-desired goal distance that counts as reached"
    )
    keyframes: int = Field(
        0,
        ge=0,
        le=16,
        description="camera frames per episode/segment sent to a vision model as images "
        "(evenly spaced, first and last included; 1: the last)",
    )
    camera: str = Field(DEFAULT_CAMERA, pattern=r"^\w+$", description="the camera of the keyframes")
    detail: Literal["low", "high"] | None = Field(
        None, description="image detail asked of the model (default: the endpoint's)"
    )
    source: str | None = Field(
        None,
        description="paraphrase mode: the text column to rewrite (default instruction when "
        "paraphrases is given)",
        pattern=r"^\w+$",
    )
    paraphrases: int = Field(
        0, ge=0, le=16, description="paraphrase mode: rewrites per text (default 3 with source)"
    )
    at: Literal["both", "episodes", "steps"] = Field(
        "both", description="paraphrase mode: the levels the source is read from and written at"
    )

    @model_validator(mode="after")
    def _paraphrase_mode(self) -> LanguageParams:
        """`source` alone means 3 paraphrases; `paraphrases` alone paraphrases `instruction`.
        Description-only parameters make no sense with them."""
        if self.source is None and self.paraphrases == 0:
            return self
        if self.per != "episode" or self.keyframes:
            raise ValueError(
                "per=segment and keyframes describe episodes; paraphrases (source=...) rewrite "
                "a text column and take neither"
            )
        object.__setattr__(self, "source", self.source or "instruction")
        object.__setattr__(self, "paraphrases", self.paraphrases or 3)
        return self

    @property
    def paraphrase_mode(self) -> bool:
        return self.source is not None
