"""serve.app's OpenAPI description: every route's answer and refusals, the multipart body of /predict, and a client
that builds its request from the schema alone and reads the answer with the schema's model."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers_serve import tiny_model

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_weights, tiny_onnx):
    from fastapi.testclient import TestClient

    from headstart.serve.app import create_app
    from headstart.serve.onnx_predictor import load_export

    model, photos, _ = tiny_model(tmp_path_factory, tiny_weights, tiny_onnx)
    with TestClient(create_app(load_export(model)), base_url="http://localhost") as c:
        c.photo = sorted(photos.rglob("*.jpg"))[0]
        yield c


def _resolve(spec: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_every_route_has_a_response_model_and_its_refusals(client) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) == {"/health", "/model", "/predict"}  # the page and static files are not API
    for path, methods in paths.items():
        for op in methods.values():
            ok = op["responses"]["200"]["content"]["application/json"]["schema"]
            assert _resolve(spec, ok).get("properties"), f"{path}: no response model"
            assert "422" not in op["responses"], f"{path} lists a 422 the service never sends"
    predict = paths["/predict"]["post"]
    assert {"400", "408", "413", "415"} <= set(predict["responses"])
    error = _resolve(spec, predict["responses"]["413"]["content"]["application/json"]["schema"])
    assert set(error["properties"]) == {"detail", "files"} and error["required"] == ["detail"]
    body = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["file"] == {"type": "array", "items": {"type": "string", "format": "binary"},
                                          "description": body["properties"]["file"]["description"]}
    assert [p["name"] for p in predict["parameters"]] == ["top_k"]
    limits = _resolve(spec, _resolve(spec, paths["/model"]["get"]["responses"]["200"]["content"]["application/json"]
                                     ["schema"])["properties"]["limits"])
    assert "max_request_pixels" in limits["properties"]


def test_docs_are_off_and_load_nothing_from_a_cdn(client) -> None:
    for path in ("/docs", "/redoc"):
        resp = client.get(path)
        assert resp.status_code == 404 and resp.json() == {"detail": "Not Found"}


def test_a_client_built_from_the_schema_posts_a_photo(client) -> None:
    """What a generated client does: the path, the method, the field and its encoding all from /openapi.json;
    the answer parsed by the model the schema names."""
    from headstart.serve import schemas

    spec = client.get("/openapi.json").json()
    (path, methods), = [(p, m) for p, m in spec["paths"].items() if "requestBody" in m.get("post", {})]
    op = methods["post"]
    (media, content), = op["requestBody"]["content"].items()
    (field, prop), = content["schema"]["properties"].items()
    assert media == "multipart/form-data" and prop["type"] == "array" and prop["items"]["format"] == "binary"
    photo: Path = client.photo
    resp = client.post(path, params={"top_k": 2},
                       files=[(field, (photo.name, photo.read_bytes(), "image/jpeg"))] * 2)
    assert resp.status_code == 200, resp.text
    name = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    answer = getattr(schemas, name).model_validate(resp.json())
    assert [r.file for r in answer.results] == [photo.name] * 2
    assert all(len(r.top_k) == 2 and r.label == r.top_k[0].label for r in answer.results)
    refused = client.post(path, content=b"x", headers={"content-type": "text/plain"})
    assert refused.status_code == 415 and schemas.ErrorBody.model_validate(refused.json()).detail
