"""The service's answers as pydantic models: what /openapi.json describes, and what a generated client reads."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class InputView(BaseModel):
    """One graph input: the short side resized to `resize`, centre-cropped to `size` x `size`."""

    name: str
    size: int
    resize: int
    interpolation: str
    crop_pct: float


class ServiceLimits(BaseModel):
    max_upload_bytes: int
    max_images: int
    max_pixels: int = Field(description="Pixels of one image, read from its header before decoding.")
    max_request_pixels: int = Field(description="Decoded pixels of all a request's images together.")
    max_batch: int
    max_top_k: int
    decoders: int
    max_fields: int
    upload_timeout_s: float
    idle_timeout_s: float


class ModelInfo(BaseModel):
    classes: list[str]
    backbone: str
    version: str = Field(description="The headstart version that exported the model.")
    quantization: str = Field(examples=["float32", "int8"])
    metrics: dict[str, Any] = Field(description="Validation metrics recorded when the model was trained.")
    inputs: list[InputView]
    bytes: int = Field(description="Size of model.onnx.")
    limits: ServiceLimits
    multi_label: bool = Field(False, description="Independent labels, each on at or above its threshold.")
    thresholds: dict[str, float] | None = Field(None, description="A multi-label model's threshold per label.")


class Scored(BaseModel):
    label: str
    probability: float


class LabelScore(BaseModel):
    """A multi-label model's label: its probability, its threshold and whether it is on."""
    label: str
    probability: float
    threshold: float
    on: bool


class ImageResult(BaseModel):
    file: str = Field(description="The upload's file name as sent (echoed, never used as a path).")
    label: str | None = Field(description="The likeliest class; a multi-label model: the likeliest label that is "
                                          "on (null when none is).")
    confidence: float | None
    top_k: list[Scored]
    labels: list[str] | None = Field(None, description="A multi-label model's labels that are on.")
    scores: list[LabelScore] | None = Field(None, description="A multi-label model's every label, likeliest first.")


class Predictions(BaseModel):
    results: list[ImageResult] = Field(description="One per uploaded image, in the order sent.")


class FileError(BaseModel):
    file: str
    error: str


class ErrorBody(BaseModel):
    """Every refusal: FastAPI's shape, `detail` one line; `files` names the uploads at fault (400 only)."""

    detail: str
    files: list[FileError] | None = None


# The multipart body of POST /predict, as OpenAPI states it: one or more files in the repeatable field `file`.
PREDICT_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                "description": "Images (JPEG, PNG, BMP, GIF, WebP, TIFF); repeat the field."}},
    }}},
}
TOP_K = {"name": "top_k", "in": "query", "required": False,
         "description": "Labels returned per image, most probable first (clamped to 1 .. max_top_k and the classes).",
         "schema": {"type": "integer", "default": 3, "minimum": 1}}


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the refusals a route sends, each with the ErrorBody JSON."""
    what = {400: "Bad request: no images, an upload that is not a readable image (named in `files`), a malformed "
                 "multipart body, a Host not allowed, a top_k that is not a number.",
            404: "No such page.", 405: "Method not allowed.",
            408: "The upload took too long, or stalled.",
            413: "Too large: the body, the number of images, or the decoded pixels of the request.",
            415: "The body is not multipart/form-data."}
    return {s: {"model": ErrorBody, "description": what[s]} for s in statuses}
