"""The OpenAPI 3.0 schema of every endpoint (served at ``GET /openapi.json``)."""

from __future__ import annotations

from typing import Any

from mlcycle._version import __version__
from mlcycle.serve.online._config import (
    APP_POLICIES,
    BATCH_POLICIES,
    KINDS,
    MAX_BATCH,
    MAX_REPLICAS,
    METHODS,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
FACTORY_PATTERN = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed JSON, or a model that cannot be loaded",
        401: "Missing or wrong admin token",
        403: "Factory outside the server's allowed_factories",
        404: "Unknown app, model, query or path",
        405: "Method not allowed",
        409: "Conflicts with the current state",
        413: "Request body too large",
        422: "Valid JSON of the wrong shape or with invalid values",
    }
    return {str(c): _json(_ref("Error"), text[c]) for c in codes}


def _param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": NAME_PATTERN},
    }


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def openapi_schema() -> dict[str, Any]:
    """The schema as a dict (OpenAPI 3.0.3)."""
    any_value: dict[str, Any] = {"description": "any JSON value", "nullable": True}
    name = {"type": "string", "pattern": NAME_PATTERN}
    batching = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "policy": {"type": "string", "enum": list(BATCH_POLICIES), "default": "aimd"},
            "max_batch_size": {"type": "integer", "minimum": 1, "maximum": MAX_BATCH},
            "wait_ms": {"type": "number", "minimum": 0, "maximum": 1000},
        },
    }
    model_config = {
        "type": "object",
        "required": ["name", "factory"],
        "additionalProperties": False,
        "properties": {
            "name": name,
            "factory": {
                "type": "string",
                "pattern": FACTORY_PATTERN,
                "description": "'package.module:attr', a callable returning a torch module, "
                "a scikit-learn estimator or a callable on a batch",
            },
            "version": name,
            "args": {"type": "object", "description": "keyword arguments for the factory"},
            "replicas": {"type": "integer", "minimum": 1, "maximum": MAX_REPLICAS},
            "kind": {"type": "string", "enum": list(KINDS)},
            "batching": _ref("BatchingConfig"),
            "method": {"type": "string", "enum": list(METHODS)},
            "threads": {"type": "integer", "minimum": 1, "maximum": 256, "nullable": True},
            "input_shape": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1},
                "minItems": 1,
                "maxItems": 8,
                "nullable": True,
            },
            "ray_options": {"type": "object"},
        },
    }
    app_config = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": name,
            "slo_ms": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
            "default": any_value,
            "models": {"type": "array", "items": name, "uniqueItems": True},
            "policy": {"type": "string", "enum": list(APP_POLICIES)},
            "thresholds": {
                "type": "array",
                "items": {"type": "number", "minimum": 0, "maximum": 1},
                "nullable": True,
            },
            "cache": {"type": "boolean"},
            "slo_margin_ms": {"type": "number", "minimum": 0, "nullable": True},
            "policy_args": {"type": "object"},
            "policy_state": {"type": "object", "nullable": True},
        },
    }
    predict_request = {
        "oneOf": [
            {
                "type": "object",
                "required": ["input"],
                "additionalProperties": False,
                "properties": {"input": any_value},
            },
            {
                "type": "object",
                "required": ["inputs"],
                "additionalProperties": False,
                "properties": {"inputs": {"type": "array", "minItems": 1, "items": any_value}},
            },
        ]
    }
    one = {
        "type": "object",
        "required": ["query_id", "output", "default", "model", "cached", "latency_ms"],
        "properties": {
            "query_id": {"type": "string"},
            "output": any_value,
            "default": {"type": "boolean", "description": "true: the app's default answer"},
            "model": {"type": "string", "nullable": True, "description": "name:version"},
            "cached": {"type": "boolean"},
            "confidence": {"type": "number", "nullable": True},
            "latency_ms": {"type": "number"},
            "reason": {"type": "string", "description": "why the default was given"},
        },
    }
    many = {
        "type": "object",
        "required": ["query_ids", "outputs", "default", "models", "cached", "latency_ms"],
        "properties": {
            "query_ids": {"type": "array", "items": {"type": "string"}},
            "outputs": {"type": "array", "items": any_value},
            "default": {"type": "array", "items": {"type": "boolean"}},
            "models": {"type": "array", "items": {"type": "string", "nullable": True}},
            "cached": {"type": "array", "items": {"type": "boolean"}},
            "confidence": {"type": "array", "items": {"type": "number", "nullable": True}},
            "latency_ms": {"type": "number"},
        },
    }
    feedback_request = {
        "type": "object",
        "required": ["label"],
        "properties": {
            "query_id": {"type": "string"},
            "input": any_value,
            "label": any_value,
        },
    }
    obj = {"type": "object"}
    app_p = _param("app", "the app's name")
    model_p = _param("model", "the model's name")
    link_body = {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": name,
            "thresholds": {"type": "array", "items": {"type": "number"}},
        },
    }
    paths: dict[str, Any] = {
        "/{app}/predict": {
            "post": {
                "summary": "Answer one input or a list of inputs within the app's SLO",
                "parameters": [app_p],
                "requestBody": _body(_ref("PredictRequest")),
                "responses": {
                    "200": _json(
                        {"oneOf": [_ref("Prediction"), _ref("Predictions")]},
                        "Answers; 'default': true marks the app's default",
                    ),
                    **_errors(400, 404, 405, 413, 422),
                },
            }
        },
        "/{app}/feedback": {
            "post": {
                "summary": "The true label of an earlier query (drives Exp3/Exp4)",
                "parameters": [app_p],
                "requestBody": _body(_ref("Feedback")),
                "responses": {
                    "200": _json(obj, "Recorded; 'weights' for learning policies"),
                    **_errors(400, 404, 405, 413, 422),
                },
            }
        },
        "/health": {
            "get": {
                "summary": "Readiness (every model loaded and warmed up) and replica counts",
                "responses": {"200": _json(obj, "status 'ok' when ready, else 'starting'")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text: per app and per model counters and histograms",
                "responses": {
                    "200": {
                        "description": "Prometheus exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This schema", "responses": {"200": _json(obj, "OpenAPI 3.0")}}
        },
        "/admin/config": {
            "get": {
                "summary": "The running configuration",
                "responses": {"200": _json(obj, "Config"), **_errors(401)},
            }
        },
        "/admin/apps": {
            "get": {
                "summary": "Every app",
                "responses": {"200": _json(obj, "Apps"), **_errors(401)},
            },
            "post": {
                "summary": "Register an app",
                "requestBody": _body(_ref("AppConfig")),
                "responses": {
                    "201": _json(obj, "Registered"),
                    **_errors(400, 401, 409, 413, 422),
                },
            },
        },
        "/admin/apps/{app}": {
            "get": {
                "summary": "One app",
                "parameters": [app_p],
                "responses": {"200": _json(obj, "App"), **_errors(401, 404)},
            },
            "delete": {
                "summary": "Remove an app",
                "parameters": [app_p],
                "responses": {"200": _json(obj, "Removed"), **_errors(401, 404)},
            },
        },
        "/admin/models": {
            "get": {
                "summary": "Every deployed model",
                "responses": {"200": _json(obj, "Models"), **_errors(401)},
            },
            "post": {
                "summary": "Deploy a model version (replaces the name's current version)",
                "requestBody": _body(_ref("ModelConfig")),
                "responses": {
                    "201": _json(obj, "Deployed"),
                    **_errors(400, 401, 403, 409, 413, 422),
                },
            },
        },
        "/admin/models/{model}": {
            "get": {
                "summary": "One model",
                "parameters": [model_p],
                "responses": {"200": _json(obj, "Model"), **_errors(401, 404)},
            },
            "delete": {
                "summary": "Undeploy a model",
                "parameters": [
                    model_p,
                    {
                        "name": "version",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "undeploy only if this version is the one serving",
                    },
                ],
                "responses": {"200": _json(obj, "Removed"), **_errors(401, 404, 409)},
            },
        },
        "/admin/models/{model}/replicas": {
            "post": {
                "summary": "Set the number of replicas",
                "parameters": [model_p],
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["replicas"],
                        "properties": {
                            "replicas": {"type": "integer", "minimum": 1, "maximum": MAX_REPLICAS}
                        },
                    }
                ),
                "responses": {
                    "200": _json(obj, "Scaled"),
                    **_errors(400, 401, 404, 413, 422),
                },
            }
        },
    }
    for verb in ("link", "unlink"):
        paths[f"/admin/apps/{{app}}/{verb}"] = {
            "post": {
                "summary": f"{verb.capitalize()} a model and an app",
                "parameters": [app_p],
                "requestBody": _body(link_body),
                "responses": {
                    "200": _json(obj, "The app after the change"),
                    **_errors(400, 401, 404, 409, 413, 422),
                },
            }
        }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "mlcycle online serving",
            "version": __version__,
            "description": "Clipper-style prediction serving: SLO-aware adaptive batching, "
            "prediction cache, model selection (Exp3/Exp4) and IDK cascades.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "PredictRequest": predict_request,
                "Prediction": one,
                "Predictions": many,
                "Feedback": feedback_request,
                "BatchingConfig": batching,
                "ModelConfig": model_config,
                "AppConfig": app_config,
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
            }
        },
    }
