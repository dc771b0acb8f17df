"""A classification result: what sinks receive and what the JSON record holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.atomic import utf8_name


@dataclass(frozen=True)
class ClassificationResult:
    """`destination` is where the image lies once moved (None while still being routed). Scores in `top_k`
    are calibrated probabilities; `novelty` is the version's novelty score (higher: less like the training
    images); `review_reason` is why it goes to review (`low_confidence`, `unfamiliar`), None when filed."""

    id: str
    source: Path
    sha256: str
    top_k: tuple[tuple[str, float], ...]
    model_version: int
    backbone: str
    time: str
    destination: Path | None = None
    review_reason: str | None = None
    novelty: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.top_k[0][0]

    @property
    def confidence(self) -> float:
        return self.top_k[0][1]

    def record(self) -> dict[str, Any]:
        """The machine-readable record (sidecar and `results.jsonl` line)."""
        return {
            "id": self.id,
            "file": utf8_name(self.source.name),  # the inbox name; bytes that are not UTF-8 as U+FFFD
            "destination": str(self.destination) if self.destination else None,
            "label": self.label,
            "confidence": self.confidence,
            "top_k": [{"label": label, "score": score} for label, score in self.top_k],
            "review_reason": self.review_reason,
            "novelty": self.novelty,
            "model_version": self.model_version,
            "backbone": self.backbone,
            "sha256": self.sha256,
            "time": self.time,
            **self.extra,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], source: Path, destination: Path) -> ClassificationResult:
        """The inverse of `record()` (the inbox journal keeps records, and finishes them after a crash);
        `source` and `destination` come from the journal, which keeps them exactly (odd bytes included)."""
        top_k = tuple((item["label"], float(item["score"])) for item in record["top_k"])
        known = {"id", "file", "destination", "label", "confidence", "top_k", "model_version", "backbone",
                 "sha256", "time", "review_reason", "novelty"}
        return cls(id=record["id"], source=source, sha256=record["sha256"], top_k=top_k,
                   model_version=record["model_version"], backbone=record["backbone"], time=record["time"],
                   destination=destination, review_reason=record.get("review_reason"),
                   novelty=record.get("novelty"), extra={k: v for k, v in record.items() if k not in known})
