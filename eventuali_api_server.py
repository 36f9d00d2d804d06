"""Eventuali API Server: an append-only event log for AI-agent workflows.

One module, two dependencies (starlette, uvicorn). Agents and hooks POST
lifecycle events; dashboards and scripts query them over REST and watch them
live over Server-Sent Events. Events are stored in SQLite (WAL mode) by one
writer thread that commits every waiting request in one transaction.

Sections, in dependency order:
    1. Configuration
    2. Validation (field specs)
    3. Storage (schema, writer, readers)
    4. Live broadcasting
    5. HTTP handlers
    6. OpenAPI and docs HTML
    7. CLI

Vendoring: copy this file into your project; `pip install starlette uvicorn`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

__version__ = "1.0.0"
__all__ = ["APIServerConfig", "get_config", "set_config", "create_app", "app", "main"]

logger = logging.getLogger("eventuali_api_server")


# =============================================================================
# 1. Configuration
# =============================================================================

DEFAULT_CORS_ORIGINS = [
    "http://localhost:3210",
    "http://127.0.0.1:3210",
    "http://localhost:3000",
    "http://127.0.0.1:3000",
]
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DOCS_ASSETS_URL = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"


@dataclasses.dataclass
class APIServerConfig:
    """Every setting of the server; see SETTINGS for the matching flags and env vars."""

    host: str = "127.0.0.1"
    port: int = 8765
    reload: bool = False
    log_level: str = "info"
    data_dir: str = ".events"
    database_timeout: float = 10.0
    cors_origins: list = dataclasses.field(default_factory=lambda: list(DEFAULT_CORS_ORIGINS))
    cors_allow_credentials: bool = True
    title: str = "Eventuali API Server"
    description: str = "Append-only event log for AI-agent workflows, over REST and Server-Sent Events"
    version: str = __version__
    durability: str = "full"
    api_key: str = ""
    sse_ping: float = 15.0
    max_streams: int = 1000
    max_batch: int = 1000
    max_body: int = 1024 * 1024
    max_depth: int = 32
    max_id_length: int = 256
    docs_assets_url: str = DOCS_ASSETS_URL

    def __post_init__(self) -> None:
        if "*" in self.cors_origins:
            self.cors_allow_credentials = False  # browsers refuse credentials with a wildcard origin

    @property
    def database_path(self) -> str:
        return os.path.join(self.data_dir, "events.db")

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "APIServerConfig":
        """Settings from the environment (kept from the original's API)."""
        return config_from_env(environ)


class ConfigError(ValueError):
    """A setting has a value it cannot take; the message names the setting."""


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _parse_int(low: int, high: int = 2**31 - 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.strip())
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value
    return parse


def _parse_seconds(text: str) -> float:
    value = float(text.strip())
    if not 0 < value < 86400:  # also rejects nan and inf
        raise ValueError("expected a number of seconds above 0")
    return value


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value
    return parse


def _parse_origins(text: str) -> list:
    return [origin.strip() for origin in text.split(",") if origin.strip()]


# (field, environment variable, flag, parser, help). Drives from_env and argparse alike.
SETTINGS = [
    ("host", "HOST", "--host", str, "address to bind (default 127.0.0.1)"),
    ("port", "PORT", "--port", _parse_int(0, 65535), "port to bind (default 8765)"),
    ("reload", "RELOAD", "--reload", _parse_bool, "restart when the code changes"),
    ("log_level", "LOG_LEVEL", "--log-level", _parse_choice(*LOG_LEVELS), "debug|info|warning|error|critical"),
    ("data_dir", "DATA_DIR", "--data-dir", str, "folder of the SQLite database (default .events)"),
    ("cors_origins", "CORS_ORIGINS", "--cors-origins", _parse_origins, "comma-separated allowed origins, or *"),
    ("cors_allow_credentials", "CORS_ALLOW_CREDENTIALS", "--cors-allow-credentials", _parse_bool,
     "allow credentials in CORS requests (never with *)"),
    ("database_timeout", "DATABASE_TIMEOUT", "--database-timeout", _parse_seconds,
     "seconds to wait for a database lock before answering 503 (default 10)"),
    ("durability", "DURABILITY", "--durability", _parse_choice("full", "normal"),
     "full: an acknowledged event survives power loss; normal: it survives a process crash"),
    ("api_key", "API_KEY", "--api-key", str, "require 'Authorization: Bearer KEY' on event routes"),
    ("sse_ping", "SSE_PING", "--sse-ping", _parse_seconds, "seconds between stream heartbeats (default 15)"),
    ("max_streams", "MAX_STREAMS", "--max-streams", _parse_int(1), "open streams at most (default 1000)"),
    ("max_batch", "MAX_BATCH", "--max-batch", _parse_int(1, 100000), "events per batch at most (default 1000)"),
    ("max_body", "MAX_BODY", "--max-body", _parse_int(1024), "request body bytes at most (default 1 MiB)"),
    ("max_depth", "MAX_DEPTH", "--max-depth", _parse_int(1, 1000), "attributes nesting depth at most (default 32)"),
    ("max_id_length", "MAX_ID_LENGTH", "--max-id-length", _parse_int(1, 65536),
     "characters in a name or id at most (default 256)"),
    ("docs_assets_url", "DOCS_ASSETS_URL", "--docs-assets-url", str,
     "where /docs loads swagger-ui-dist from (default: a CDN)"),
]


def config_from_env(environ: dict | None = None, **overrides: Any) -> APIServerConfig:
    """Settings from environment variables, then `overrides` (already parsed) on top."""
    environ = os.environ if environ is None else environ
    values: dict = {}
    for field, env, _flag, parse, _help in SETTINGS:
        if env in environ:
            try:
                values[field] = parse(environ[env])
            except ValueError as exc:
                raise ConfigError(f"{env}={environ[env]!r}: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name in ("title", "description", "version"):
        env = "API_" + name.upper()
        if env in environ and name not in values:
            values[name] = environ[env]
    return APIServerConfig(**values)


_config: APIServerConfig | None = None


def get_config() -> APIServerConfig:
    """The process-wide configuration, read from the environment on first use."""
    global _config
    if _config is None:
        _config = config_from_env()
    return _config


def set_config(config: APIServerConfig) -> None:
    """Replace the process-wide configuration (before the server starts)."""
    global _config
    _config = config


def config_to_env(config: APIServerConfig) -> dict:
    """The environment that recreates `config` in a child process (reload, workers)."""
    env = {}
    for field, name, _flag, _parse, _help in SETTINGS:
        value = getattr(config, field)
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):
            value = ",".join(value)
        env[name] = str(value)
    return env


# =============================================================================
# 2. Validation (field specs)
# =============================================================================
# Each field is a JSON Schema fragment. The same dicts validate requests here
# and become the OpenAPI schemas in section 6, so docs and behaviour agree.

KINDS = {
    # kind: (aggregate_type, event_type, message label)
    "agent": ("agent_aggregate", "AgentEvent", "Agent"),
    "workflow": ("workflow_aggregate", "WorkflowEvent", "Workflow"),
    "system": ("system_aggregate", "SystemEvent", "System"),
}
AGGREGATE_KINDS = {aggregate_type: kind for kind, (aggregate_type, _, _) in KINDS.items()}
EVENT_TYPE_AGGREGATES = {event_type: aggregate_type for aggregate_type, event_type, _ in KINDS.values()}
TIMESTAMP_FORMS = (
    "ISO 8601: `YYYY-MM-DD`, optionally followed by `T` (or a space) and `HH:MM`, `HH:MM:SS` or "
    "`HH:MM:SS.fraction` (up to 9 digits, kept to the microsecond), optionally followed by `Z` or an "
    "offset `+HH:MM`, `-HH:MM`, `+HHMM`. Without an offset the time is UTC. "
    "Example: `2026-11-27T06:08:19.123Z`."
)
MAX_INT = 2**63 - 1


def _compact_encoder() -> Callable[[Any], str]:
    """JSON text without spaces, non-ASCII kept as is, NaN refused. JSONEncoder.encode makes
    a new C encoder on every call, which costs twice the encoding of a small object; this
    one is made once (it runs for every event stored, listed and streamed)."""
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:  # the arguments JSONEncoder.iterencode passes; no cycle check: values come from JSON
        encode = json.encoder.c_make_encoder(None, encoder.default, json.encoder.encode_basestring,
                                             None, ":", ",", False, False, False)
    except TypeError:  # no C encoder (None), or one this code does not know
        return encoder.encode
    return lambda value: "".join(encode(value, 0))


compact_json = _compact_encoder()


class Problem(Exception):
    """An error reply: HTTP status, a `detail` clients can show, and extra fields."""

    def __init__(self, status: int, detail: Any, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


def invalid(loc: Sequence, msg: str, kind: str) -> dict:
    return {"loc": list(loc), "msg": msg, "type": kind}


def id_field(description: str, limit: int, example: str | None = None) -> dict:
    spec = {"type": "string", "minLength": 1, "maxLength": limit, "description": description}
    if example:
        spec["examples"] = [example]
    return spec


def event_fields(config: APIServerConfig) -> dict:
    """The fields of an emitted event, as JSON Schema, in documentation order."""
    n = config.max_id_length
    return {
        "name": id_field("Event name, e.g. `agent.started`.", n, "agent.started"),
        "attributes": {
            "type": "object",
            "description": f"Any JSON object (nesting depth at most {config.max_depth}). "
                           "`attributes.agent_name` (agents) and `attributes.user_prompt` (workflows) "
                           "are also shown as item fields.",
            "x-max-depth": config.max_depth,
            "default": {},
        },
        "timestamp": {"type": "string", "format": "date-time", "description": "When it happened; default: "
                      "when the server stores it. Accepted forms: " + TIMESTAMP_FORMS},
        "aggregate_id": id_field("The agent, workflow or session this event belongs to. Default: a new "
                                 "UUID for agents and workflows, `system` for system events.", n),
        "causation_id": id_field("What caused it; for agents, the parent agent's id.", n),
        "correlation_id": id_field("What it belongs to; for agents and system events, the workflow id.", n),
        "event_id": {"type": "string", "format": "uuid", "description": "A client-chosen UUID that makes "
                     "retries idempotent: the same id with the same content returns the original reply "
                     "and stores nothing; with other content it is a 409. Default: a new UUID."},
        "expected_version": {"type": "integer", "minimum": 0, "maximum": MAX_INT, "description":
                             "Optimistic concurrency: the aggregate's current version must be this "
                             "(0: the aggregate must not exist yet), else 409 and nothing is stored."},
    }


REQUIRED_FIELDS = ("name",)
KIND_FIELD = {"type": "string", "enum": list(KINDS), "description": "agent, workflow or system."}
_TIMESTAMP = re.compile(  # ASCII digits only: int() would take any script's digits
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?",
    re.ASCII,
)


def parse_timestamp(text: str) -> datetime:
    """An aware UTC datetime from the forms in TIMESTAMP_FORMS; ValueError otherwise."""
    match = _TIMESTAMP.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError("not an ISO 8601 date-time")
    y, mo, d, h, mi, s, frac, _z, sign, oh, om = match.groups()
    micro = int((frac or "0").ljust(6, "0")[:6])
    moment = datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0), micro, timezone.utc)
    if sign:
        offset = timedelta(hours=int(oh), minutes=int(om))
        if offset >= timedelta(hours=24):
            raise ValueError("offset out of range")
        moment = moment - offset if sign == "+" else moment + offset
    return moment


def format_timestamp(moment: datetime) -> str:
    """Fixed-width UTC form, so that comparing stored strings compares instants."""
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def utc_now() -> str:
    return format_timestamp(datetime.now(timezone.utc))


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests deeper than limit, one level at a time."""
    level, depth = [value], 1
    while level:
        if depth > limit:
            return True
        nested = []
        for node in level:
            for child in node.values() if isinstance(node, dict) else node:
                if isinstance(child, (dict, list)):
                    nested.append(child)
        level, depth = nested, depth + 1
    return False


def check_value(spec: dict, value: Any, loc: Sequence, errors: list, key: Any = None) -> Any:
    """Validate one value against its field spec; returns the cleaned value. The error
    location is loc (+ key), built only when there is an error: this runs per field."""
    kind = spec["type"]
    problem = None
    if kind == "string":
        if not isinstance(value, str):
            problem, value = ("must be a string", "type_error.str"), None
        elif "enum" in spec:
            if value not in spec["enum"]:
                problem = ("must be one of: " + ", ".join(spec["enum"]), "value_error.enum")
        elif "format" in spec:
            try:
                if spec["format"] == "date-time":
                    return format_timestamp(parse_timestamp(value))
                return str(uuid.UUID(value))
            except (ValueError, OverflowError) as exc:
                problem = ((f"invalid timestamp ({exc}); accepted: {TIMESTAMP_FORMS}", "value_error.datetime")
                           if spec["format"] == "date-time" else ("must be a UUID", "value_error.uuid"))
        elif not value:
            if spec.get("minLength"):
                problem = ("must not be empty", "value_error.any_str.min_length")
        elif len(value) > spec.get("maxLength", len(value)):
            problem = (f"must be at most {spec['maxLength']} characters", "value_error.any_str.max_length")
    elif kind == "integer":
        if isinstance(value, float) and value.is_integer():  # JSON Schema: 3.0 is an integer
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            problem = ("must be an integer", "type_error.integer")
        elif not spec.get("minimum", value) <= value <= spec.get("maximum", value):
            problem = (f"must be from {spec.get('minimum')} to {spec.get('maximum')}",
                       "value_error.number.not_in_range")
    elif kind == "object":
        if not isinstance(value, dict):
            problem = ("must be a JSON object", "type_error.dict")
        elif value and "x-max-depth" in spec and _depth_exceeds(value, spec["x-max-depth"]):
            problem = (f"nested deeper than {spec['x-max-depth']} levels", "value_error.depth")
    else:
        raise AssertionError(f"field spec type {kind!r} has no validator")
    if problem:
        errors.append(invalid([*loc, key] if key is not None else loc, *problem))
    return value


def check_object(body: Any, fields: dict, required: Iterable[str], loc: Sequence, errors: list) -> dict:
    """Validate a JSON object: unknown fields, missing fields, then each value."""
    if not isinstance(body, dict):
        errors.append(invalid(loc, "must be a JSON object", "type_error.dict"))
        return {}
    clean = {}
    for key, value in body.items():
        spec = fields.get(key)
        if spec is None:
            errors.append(invalid([*loc, key], "unknown field; allowed: " + ", ".join(fields),
                                  "value_error.extra"))
        elif value is not None:  # an explicit null means the same as leaving it out
            clean[key] = check_value(spec, value, loc, errors, key)
    for key in required:
        if body.get(key) is None:
            errors.append(invalid([*loc, key], "field required", "value_error.missing"))
    return clean


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_decode = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float).decode


def parse_json(body: bytes, max_depth: int) -> Any:
    """Strict JSON: UTF-8 only, no NaN or Infinity, no lone surrogates, bounded nesting."""
    try:
        text = body.decode("utf-8")
        value = _decode(text)
        if "\\u" in text and _SURROGATE.search(text):
            json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    except UnicodeError:
        raise Problem(422, [invalid(["body"], "not valid UTF-8 or has a lone surrogate", "value_error.unicode")])
    except RecursionError:
        raise Problem(422, [invalid(["body"], f"nested deeper than {max_depth} levels", "value_error.depth")])
    except ValueError as exc:
        raise Problem(422, [invalid(["body"], f"invalid JSON: {exc}", "value_error.jsondecode")])
    return value


# The fields of a prepared event that may be absent (None), which are stored as NULL.
NULLABLE = ("correlation_id", "causation_id", "agent_name", "user_prompt", "session_id", "content_hash")


def prepare_event(kind: str, body: Any, loc: Sequence, errors: list, fields: dict) -> dict | None:
    """Validate one emitted event and map it to a row-to-be, as the original mapped it."""
    clean = check_object(body, fields, REQUIRED_FIELDS, loc, errors)
    if errors:
        return None
    aggregate_type, event_type, _label = KINDS[kind]
    attributes = clean.get("attributes", {})
    given_id = clean.get("aggregate_id")
    aggregate_id = given_id or ("system" if kind == "system" else uuid7())
    event = {
        "kind": kind,
        "event_id": clean.get("event_id") or uuid7(),
        "client_event_id": "event_id" in clean,
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id,
        "fresh": given_id is None and kind != "system",  # a new UUID has no history to look up
        "event_type": event_type,
        "name": clean["name"],
        "timestamp": clean.get("timestamp"),
        "attributes": compact_json(attributes),
        "correlation_id": clean.get("correlation_id"),
        "causation_id": clean.get("causation_id"),
        "agent_name": _string_attr(attributes, "agent_name") if kind == "agent" else None,
        "user_prompt": _string_attr(attributes, "user_prompt") if kind == "workflow" else None,
        "session_id": given_id if kind == "system" else None,
        "expected_version": clean.get("expected_version"),
        "content_hash": None,
    }
    if event["client_event_id"]:
        content = [kind, clean["name"], event["attributes"], event["timestamp"], given_id,
                   event["correlation_id"], event["causation_id"]]
        event["content_hash"] = hashlib.sha256(json.dumps(content).encode()).hexdigest()
    # The stored row's values after position, version and timestamp (ROW_COLUMNS), laid out
    # here once, 0 standing for NULL.
    event["values"] = (event["event_id"], aggregate_type, aggregate_id, event_type, event["name"], event["attributes"],
                       *[0 if event[name] is None else event[name] for name in NULLABLE])
    return event


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7): new ids land at the end of the event_id
    index instead of on a random page of it, which keeps commits small as the log grows."""
    raw = (time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10)  # 48-bit ms, then random
    text = raw.hex()
    variant = "89ab"[raw[8] >> 6]  # 0b10 and two random bits
    return f"{text[:8]}-{text[8:12]}-7{text[13:16]}-{variant}{text[17:20]}-{text[20:]}"


def _string_attr(attributes: dict, key: str) -> str | None:
    value = attributes.get(key)
    return value if isinstance(value, str) else None


# Query parameters of the list routes: name -> JSON Schema (also the OpenAPI parameters).
def list_params(config: APIServerConfig) -> dict:
    n = config.max_id_length
    return {
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100,
                  "description": "Events per page."},
        "offset": {"type": "integer", "minimum": 0, "maximum": MAX_INT, "default": 0,
                   "description": "Events to skip. Deep offsets get slow: prefer the `after`/`before` cursor."},
        "order": {"type": "string", "enum": ["desc", "asc"], "default": "desc",
                  "description": "By position: `desc` newest first, `asc` oldest first."},
        "after": {"type": "integer", "minimum": 0, "maximum": MAX_INT,
                  "description": "Cursor: only events with a position above this (use with order=asc)."},
        "before": {"type": "integer", "minimum": 0, "maximum": MAX_INT,
                   "description": "Cursor: only events with a position below this (use with order=desc)."},
        "event_type": id_field("`AgentEvent`, `WorkflowEvent` or `SystemEvent`.", n),
        "aggregate_type": id_field("`agent_aggregate`, `workflow_aggregate` or `system_aggregate`.", n),
        "aggregate_id": id_field("Only this aggregate's events.", n),
        "correlation_id": id_field("Only events with this correlation id.", n),
        "event_name": id_field("Only events with this name, e.g. `agent.started`.", n),
        "since": {"type": "string", "format": "date-time",
                  "description": "Only events whose timestamp is after this instant. " + TIMESTAMP_FORMS},
        "until": {"type": "string", "format": "date-time",
                  "description": "Only events whose timestamp is at or before this instant."},
    }


STREAM_FILTERS = ("event_type", "aggregate_type", "aggregate_id", "correlation_id", "event_name")


def stream_params(config: APIServerConfig) -> dict:
    params = {name: spec for name, spec in list_params(config).items() if name in STREAM_FILTERS}
    params["after"] = {"type": "integer", "minimum": 0, "maximum": MAX_INT,
                       "description": "Resume: first send the stored events after this position "
                                      "(the `Last-Event-ID` header does the same)."}
    params["access_token"] = {"type": "string", "description": "The API key, for browsers' EventSource, "
                              "which cannot send an Authorization header."}
    return params


def check_query(request: Request, specs: dict) -> dict:
    """Validate query parameters against their specs; unknown ones are an error too."""
    errors: list = []
    clean = {}
    for key in set(request.query_params.keys()):
        values = request.query_params.getlist(key)
        spec = specs.get(key)
        loc = ["query", key]
        if spec is None:
            errors.append(invalid(loc, "unknown parameter; allowed: " + ", ".join(specs), "value_error.extra"))
        elif len(values) > 1:
            errors.append(invalid(loc, "given more than once", "value_error.duplicate"))
        elif spec["type"] == "integer":
            text = values[0].strip()
            if not re.fullmatch(r"[+-]?\d{1,19}", text):
                errors.append(invalid(loc, "must be an integer", "type_error.integer"))
            else:
                clean[key] = check_value(spec, int(text), loc, errors)
        else:
            clean[key] = check_value(spec, values[0], loc, errors)
    if errors:
        raise Problem(422, errors)
    for key, spec in specs.items():
        if key not in clean and "default" in spec:
            clean[key] = spec["default"]
    return clean


# =============================================================================
# 3. Storage (schema, writer, readers)
# =============================================================================

SCHEMA_VERSION = 3
# The planner has no statistics for a new log, and without them it may pick the
# 3-valued aggregate_type index over aggregate_id's. Fixed, typical statistics in
# sqlite_stat1 (documented as the way to steer it) keep every read on the selective index.
MIGRATIONS = {
    # user_version before -> statements that bring the schema one version up.
    # A log made by an older server is brought up to date when it is opened.
    0: """
    CREATE TABLE events (
        position          INTEGER PRIMARY KEY,
        event_id          TEXT NOT NULL,
        aggregate_type    TEXT NOT NULL,
        aggregate_id      TEXT NOT NULL,
        aggregate_version INTEGER NOT NULL,
        event_type        TEXT NOT NULL,
        event_name        TEXT NOT NULL,
        timestamp         TEXT NOT NULL,
        attributes        TEXT NOT NULL,
        correlation_id    TEXT,
        causation_id      TEXT,
        agent_name        TEXT,
        user_prompt       TEXT,
        session_id        TEXT,
        content_hash      TEXT
    );
    CREATE UNIQUE INDEX events_event_id ON events (event_id);
    CREATE UNIQUE INDEX events_stream ON events (aggregate_type, aggregate_id, aggregate_version);
    CREATE INDEX events_aggregate_id ON events (aggregate_id, position);
    CREATE INDEX events_event_type ON events (event_type, position);
    CREATE INDEX events_aggregate_type ON events (aggregate_type, position);
    CREATE INDEX events_event_name ON events (event_name, position);
    CREATE INDEX events_correlation ON events (correlation_id, position);
    CREATE INDEX events_timestamp ON events (timestamp);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
    CREATE TABLE counts (
        field TEXT NOT NULL, value TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (field, value)
    ) WITHOUT ROWID;
    CREATE TABLE workflow_agents (
        workflow_id TEXT NOT NULL, agent_id TEXT NOT NULL, first_position INTEGER NOT NULL,
        PRIMARY KEY (workflow_id, agent_id)
    ) WITHOUT ROWID;
    ANALYZE sqlite_master;
    DELETE FROM sqlite_stat1;
    INSERT INTO sqlite_stat1 VALUES
        ('events', NULL, '1000000'),
        ('events', 'events_event_id', '1000000 1'),
        ('events', 'events_stream', '1000000 333333 20 1'),
        ('events', 'events_aggregate_id', '1000000 20 1'),
        ('events', 'events_event_type', '1000000 333333 1'),
        ('events', 'events_aggregate_type', '1000000 333333 1'),
        ('events', 'events_event_name', '1000000 20000 1'),
        ('events', 'events_correlation', '1000000 200 1'),
        ('events', 'events_timestamp', '1000000 2');
    """,
    # event_type and aggregate_type map one to one (KINDS), so one index serves both
    # filters (build_where); every append then updates 7 indexes, not 8.
    1: "DROP INDEX events_event_type",
    # Counters no longer kept (see COUNTED).
    2: "DELETE FROM counts WHERE field IN ('event_type', 'aggregate_id')",
}
COLUMNS = ("position, event_id, aggregate_type, aggregate_id, aggregate_version, event_type, event_name, "
           "timestamp, attributes, correlation_id, causation_id, agent_name, user_prompt, session_id")
# Maintained with the log, in the same transaction, so that reads need not scan:
# exact totals for one filter, and each workflow's agents in order of appearance.
# event_type's totals are aggregate_type's (KINDS maps them one to one), and an
# aggregate_id's total is the sum of its versions: counting those too cost every event
# two more updates.
COUNTED = ("aggregate_type", "event_name", "correlation_id")
# The writer's rows: the values it decides (position, version, and the timestamp if the client
# gave none), then the values prepare_event laid out once (event["values"]).
ROW_COLUMNS = ("position, aggregate_version, timestamp, event_id, aggregate_type, aggregate_id, event_type, "
               "event_name, attributes, correlation_id, causation_id, agent_name, user_prompt, session_id, "
               "content_hash")
EVENT_WIDTH = len(ROW_COLUMNS.split(", "))
# Binding None costs the sqlite3 module two failed attribute lookups, ~0.8 µs a value with the
# GIL held (it binds an int in 0.06), and an event has three to six of them. So in rows 0 stands
# for NULL in the NULLABLE columns, and the statement turns it back (they hold text, never the
# integer 0). Rows whose position is 0 are padding (see insert_events), which it leaves out.
INSERT_EVENTS = f"INSERT INTO events ({ROW_COLUMNS}) SELECT " + ", ".join(
    f"nullif(column{i}, 0)" if name in NULLABLE else f"column{i}"
    for i, name in enumerate(ROW_COLUMNS.split(", "), 1)) + " FROM ("
EVENTS_TAIL = ") WHERE column1 > 0"
ROW_SQL = "(" + ", ".join("?" * EVENT_WIDTH) + ")"
# The writer's connection keeps the counters and workflow membership with a trigger, row by
# row, in the statement that inserts the rows: so that a group can be one statement (see
# Store._commit_at_once). A trigger of this connection only (TEMP), so that the log's
# schema, which other servers share, stays as it is.
SUMMARIES_TRIGGER = f"""
CREATE TEMP TRIGGER events_summaries AFTER INSERT ON main.events BEGIN
    {"".join(f"INSERT INTO counts SELECT '{name}', NEW.{name}, 1 WHERE NEW.{name} IS NOT NULL "
             "ON CONFLICT (field, value) DO UPDATE SET n = n + 1; " for name in COUNTED)}
    INSERT OR IGNORE INTO workflow_agents SELECT NEW.correlation_id, NEW.aggregate_id, NEW.position
        WHERE NEW.aggregate_type = 'agent_aggregate' AND NEW.correlation_id IS NOT NULL;
END;
"""


# Parameters per statement: SQLite's limit since 3.32, and before it.
MAX_PARAMS = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


# Statements of up to STEP rows are made to measure; bigger ones are rounded up to a power of
# two, so that a few cached statements serve every group (each costs ~1.3 KB a row).
STEP = 64
# The most events the writer stores in one statement: a power of two within the parameter limit.
AT_ONCE = max(1 << ((MAX_PARAMS // EVENT_WIDTH).bit_length() - 1), STEP)


@functools.lru_cache(maxsize=None)
def insert_sql(rows: int) -> str:
    return f"{INSERT_EVENTS} VALUES " + ", ".join([ROW_SQL] * rows) + EVENTS_TAIL


def insert_events(conn: sqlite3.Connection, rows: list) -> None:
    """Store rows of events in statements of up to AT_ONCE rows; in autocommit mode, a group
    of up to AT_ONCE rows is one statement, which also commits. Past STEP rows, a
    statement's size is rounded up to a power of two, and the rest of it is padding (zeros:
    no position; ~1 µs a row). Few statements matter: see Store._commit_at_once."""
    for start in range(0, len(rows), AT_ONCE):
        chunk = rows[start:start + AT_ONCE]
        size = len(chunk) if len(chunk) <= STEP else 1 << (len(chunk) - 1).bit_length()
        values = [value for row in chunk for value in row]
        values += [0] * ((size - len(chunk)) * EVENT_WIDTH)
        conn.execute(insert_sql(size), values)


class StoreError(Exception):
    """The database cannot serve the request now (locked, read-only, full, unreadable)."""


def describe_sqlite_error(exc: BaseException) -> str:
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return f"database is locked by another process ({text})"
    if "readonly" in lowered or "read-only" in lowered:
        return f"database is read-only ({text})"
    if "full" in lowered:
        return f"disk is full ({text})"
    if "i/o" in lowered:
        return f"the database files cannot be written or read: read-only or failing storage? ({text})"
    return f"database error ({text})"


def connect(path: str, timeout: float, durability: str = "full", readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA cache_size = -16384")  # KiB
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = " + ("FULL" if durability == "full" else "NORMAL"))
        # Index pages touched by every commit stay cached, and the WAL is copied back
        # every ~40 MB rather than every ~4 MB: each hot page is written out once per
        # checkpoint instead of once per commit.
        conn.execute("PRAGMA cache_size = -65536")
        conn.execute("PRAGMA wal_autocheckpoint = 10000")
        # Statement journals stay in memory: on disk they cost a temp file (create,
        # write, unlink) per commit, and a writable temp directory.
        conn.execute("PRAGMA temp_store = MEMORY")
    return conn


def open_database(path: str, timeout: float, durability: str) -> sqlite3.Connection:
    """Create or migrate the database and return the writer's connection."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = connect(path, timeout, durability)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        conn.close()
        raise StoreError(f"{path} has schema version {version}; this server ({__version__}) "
                         f"knows versions up to {SCHEMA_VERSION}: upgrade the server")
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("PRAGMA user_version").fetchone()[0] == version:  # another process may have migrated
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        conn.execute("COMMIT")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    return conn


class Conflict(Problem):
    def __init__(self, detail: str, current_version: int) -> None:
        super().__init__(409, detail, current_version=current_version)


class Store:
    """The event log. append() goes through one writer thread that commits each waiting
    group of requests in one transaction; read() and read_now() run a query function with
    a connection of the calling reader thread; on_commit is called after each commit.
    The handlers and the Hub use only these, so another backend can stand in for it."""

    def __init__(self, config: APIServerConfig) -> None:
        self.path = config.database_path
        self.timeout = config.database_timeout
        self.durability = config.durability
        self.max_batch = config.max_batch
        self.on_commit: Callable[[], None] = lambda: None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="eventuali-read")
        self._local = threading.local()
        self._read_conns: list = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._position: int | None = None  # the writer's record of the log (_commit_at_once)
        self._versions: dict = {}
        self._in_flight = 0  # events queued and not yet answered; changed on the event loop only

    # -- lifecycle ----------------------------------------------------------
    def open(self) -> None:
        """Create the database if needed and start the writer (blocking: call off the loop)."""
        try:
            conn = open_database(self.path, self.timeout, self.durability)
            conn.executescript(SUMMARIES_TRIGGER)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {describe_sqlite_error(exc)}") from None
        self._writer = threading.Thread(target=self._write_loop, args=(conn,), name="eventuali-write",
                                        daemon=True)
        self._writer.start()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(self._readers, self.open)

    async def stop(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
            self._writer = None
        self._readers.shutdown(wait=True)
        for conn in self._read_conns:
            conn.close()

    # -- reading ------------------------------------------------------------
    def _read_conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path, self.timeout, readonly=True)
            self._read_conns.append(conn)
        return conn

    def read_now(self, fn: Callable, *args: Any) -> Any:
        """Run fn(connection, *args) here, in a thread that is not the event loop's."""
        try:
            return fn(self._read_conn(), *args)
        except sqlite3.Error as exc:
            raise StoreError(describe_sqlite_error(exc)) from None

    async def read(self, fn: Callable, *args: Any) -> Any:
        """Run fn(connection, *args) on a reader thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, functools.partial(self.read_now, fn, *args))

    # -- writing ------------------------------------------------------------
    def append(self, events: list) -> asyncio.Future:
        """Queue events to be stored atomically; the future gives one result per event
        (event_id, position, version, timestamp, aggregate_id) once they are committed."""
        return self._enqueue(events)

    def probe(self) -> asyncio.Future:
        """Queue a tiny committed write, to tell whether the database takes writes."""
        return self._enqueue("probe")

    def _enqueue(self, entry: Any) -> asyncio.Future:
        item = (entry, self._loop.create_future())
        self._in_flight += request_size(item)
        self._queue.put(item)
        return item[1]

    def _settle(self, outcomes: list, events: int) -> None:
        """Complete a group's requests (on the event loop)."""
        self._in_flight -= events
        for future, outcome in outcomes:
            if future.cancelled():
                continue  # the client went away; the event is stored all the same
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        running = True
        while running:
            group = [self._queue.get()]
            # Take what is waiting into one transaction, up to half of the events in flight.
            # Under load the writer gets the GIL only when the event loop goes idle, so a
            # group of every request would leave the loop nothing to do while it commits;
            # with half, the loop answers one group and reads its next requests while the
            # other commits. Nor does a group take more than one statement can store.
            events = request_size(group[0])
            while events < min(self._in_flight // 2, AT_ONCE - self.max_batch):
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                events += request_size(group[-1])
            if None in group:
                running = False
                group = [entry for entry in group if entry is not None]
            if group:
                try:
                    outcomes = self._commit(conn, group)
                except Exception as exc:  # a bug: fail this group (500), keep the writer alive
                    logger.exception("writer failed")
                    outcomes = [(future, exc) for _events, future in group]
                self._loop.call_soon_threadsafe(self._settle, outcomes, events)
                self.on_commit()
        conn.close()

    def _commit(self, conn: sqlite3.Connection, group: list) -> list:
        outcomes = self._commit_at_once(conn, group)
        return self._commit_locked(conn, group) if outcomes is None else outcomes

    def _commit_at_once(self, conn: sqlite3.Connection, group: list) -> list | None:
        """The usual group as one autocommit INSERT, planned from what this writer knows of
        the log: its last position and the versions it has seen. Each statement the writer
        runs costs it a GIL hand-off, which under load waits for milliseconds on the event
        loop's thread, and this is one statement where the locked path takes four or more.
        Knowing may be out of date, as another process may have written since; but then that
        process took the next position, the INSERT fails on the primary key, and nothing is
        stored. For that and anything unusual (a conflict, a probe, a big group) this returns
        None, and the caller decides again under the write lock."""
        if (self._position is None or any(events == "probe" for events, _future in group)
                or sum(map(request_size, group)) > AT_ONCE):
            return None
        keys, client_ids = group_needs(group)
        versions = {key: self._versions[key] for key in keys if key in self._versions}
        try:
            if len(versions) < len(keys):
                position, found = log_state(conn, [key for key in keys if key not in versions])
                if position != self._position:
                    return None
                versions.update(found)
            outcomes, rows = plan_group(group, self._position, versions, stored_events(conn, client_ids))
            if any(isinstance(result, Problem) for _future, result in outcomes):
                return None
            if rows:
                insert_events(conn, rows)
        except sqlite3.IntegrityError:
            return None
        except sqlite3.Error as exc:  # nothing was stored: a failed statement leaves no trace
            return failed(group, exc)
        self._remember(self._position, versions, len(rows))
        return outcomes

    def _commit_locked(self, conn: sqlite3.Connection, group: list) -> list:
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                keys, client_ids = group_needs(group)
                position, versions = log_state(conn, list(keys))  # valid inside this transaction
                stored = stored_events(conn, client_ids)
                if any(events == "probe" for events, _future in group):
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('health_probe', ?)", (utc_now(),))
                outcomes, rows = plan_group(group, position, versions, stored)
                if rows:
                    insert_events(conn, rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # a failed COMMIT (disk full, I/O error) has rolled back already
                    conn.execute("ROLLBACK")
                raise
            self._remember(position, versions, len(rows))
            return outcomes
        except sqlite3.IntegrityError:
            if len(group) > 1:  # fail only the request that broke a constraint
                return [outcome for entry in group for outcome in self._commit_locked(conn, [entry])]
            return [(group[0][1], Problem(409, "event conflicts with a stored event"))]
        except sqlite3.Error as exc:
            return failed(group, exc)

    def _remember(self, position: int, versions: dict, added: int) -> None:
        """After a commit: the log's new end, and the versions the group saw and made."""
        if position != self._position or len(self._versions) > KNOWN_VERSIONS:
            self._versions.clear()  # another process has written since, or there are too many
        self._versions.update(versions)
        self._position = position + added


KNOWN_VERSIONS = 100_000  # aggregates whose versions the writer keeps


def request_size(item: tuple | None) -> int:
    """The events in a queued request: a probe counts as one, the writer's stop signal as none."""
    if item is None:
        return 0
    return 1 if item[0] == "probe" else len(item[0])


def group_needs(group: list) -> tuple:
    """The aggregates whose versions a group needs, and the client event_ids to look up."""
    events_in = [event for events, _future in group if events != "probe" for event in events]
    keys = {(event["aggregate_type"], event["aggregate_id"]) for event in events_in if not event["fresh"]}
    return keys, [event["event_id"] for event in events_in if event["client_event_id"]]


def failed(group: list, exc: sqlite3.Error) -> list:
    error = StoreError(describe_sqlite_error(exc))
    logger.warning("write failed: %s", error)
    return [(future, error) for _events, future in group]


def plan_group(group: list, position: int, versions: dict, stored: dict) -> tuple:
    """Decide each request's outcome from the log's last position, the current versions of
    the group's aggregates (updated here as the group advances them) and its client event_ids
    already stored; return the outcomes and the rows to insert."""
    now = utc_now()
    rows: list = []
    outcomes: list = []
    for events, future in group:
        if events == "probe":
            outcomes.append((future, True))
            continue
        staged_versions: dict = {}
        staged_rows: list = []
        staged_ids: dict = {}
        results: list = []
        try:
            for event in events:
                if event["client_event_id"]:
                    earlier = staged_ids.get(event["event_id"]) or stored.get(event["event_id"])
                    if earlier:
                        if earlier[0] != event["content_hash"]:
                            raise Problem(409, f"event_id {event['event_id']} was already used "
                                               "for an event with other content")
                        results.append(earlier[1])
                        continue
                key = (event["aggregate_type"], event["aggregate_id"])
                current = staged_versions.get(key, versions.get(key, 0))  # fresh ids are at 0
                expected = event["expected_version"]
                if expected is not None and expected != current:
                    raise Conflict(f"{key[0]} {key[1]!r} is at version {current}, "
                                   f"not the expected {expected}", current)
                version = staged_versions[key] = current + 1
                pos = position + len(rows) + len(staged_rows) + 1
                timestamp = event["timestamp"] or now
                result = (event["event_id"], pos, version, timestamp, event["aggregate_id"])
                staged_rows.append((pos, version, timestamp) + event["values"])
                if event["client_event_id"]:
                    staged_ids[event["event_id"]] = (event["content_hash"], result)
                results.append(result)
        except Problem as problem:
            outcomes.append((future, problem))
            continue
        versions.update(staged_versions)
        stored.update(staged_ids)
        rows.extend(staged_rows)
        outcomes.append((future, results))
    return outcomes, rows


# The writer looks up what a group needs in one statement, not one per event: see insert_events.
LOOKUP_KEYS = MAX_PARAMS // 3


def log_state(conn: sqlite3.Connection, keys: list) -> tuple:
    """The last position, and {(aggregate_type, aggregate_id): current version} for `keys`."""
    position, versions = 0, {}
    for start in range(0, max(len(keys), 1), LOOKUP_KEYS):
        chunk = keys[start:start + LOOKUP_KEYS]
        sql = "SELECT (SELECT max(position) FROM events)"
        if chunk:
            sql = ("WITH k (i, t, id) AS (VALUES " + ", ".join(["(?, ?, ?)"] * len(chunk)) + ") " + sql +
                   ", (SELECT group_concat(i || ' ' || (SELECT coalesce(max(aggregate_version), 0) FROM events "
                   "WHERE aggregate_type = k.t AND aggregate_id = k.id)) FROM k)")
        row = conn.execute(sql, [value for i, key in enumerate(chunk) for value in (i, *key)]).fetchone()
        position = row[0] or 0
        if chunk:
            for pair in row[1].split(","):
                i, version = pair.split(" ")
                versions[chunk[int(i)]] = int(version)
    return position, versions


def stored_events(conn: sqlite3.Connection, event_ids: list) -> dict:
    """{event_id: (content_hash, result)} for those of `event_ids` already stored."""
    found = {}
    for start in range(0, len(event_ids), MAX_PARAMS):
        chunk = event_ids[start:start + MAX_PARAMS]
        for row in conn.execute("SELECT content_hash, event_id, position, aggregate_version, timestamp, "
                                "aggregate_id FROM events WHERE event_id IN (" + ", ".join("?" * len(chunk)) + ")",
                                chunk):
            found[row[1]] = (row[0], tuple(row[1:]))
    return found


# -- read queries (each runs on a reader thread: fn(conn, ...)) ----------------

PAGE = 500  # rows per read when a stream catches up


def item_json(row: tuple) -> str:
    """One event item as JSON; the stored attributes text is spliced in, not re-parsed."""
    (position, event_id, aggregate_type, aggregate_id, version, event_type, name, timestamp, attributes,
     correlation_id, causation_id, agent_name, user_prompt, session_id) = row
    kind = AGGREGATE_KINDS.get(aggregate_type)
    head = compact_json({
        "event_id": event_id, "position": position, "aggregate_id": aggregate_id,
        "aggregate_type": aggregate_type, "aggregate_version": version, "event_type": event_type,
        "event_name": name, "timestamp": timestamp})
    tail = compact_json({
        "correlation_id": correlation_id, "causation_id": causation_id, "agent_name": agent_name,
        "agent_id": aggregate_id if kind == "agent" else None,
        "parent_agent_id": causation_id if kind == "agent" else None,
        "workflow_id": aggregate_id if kind == "workflow" else correlation_id,
        "user_prompt": user_prompt, "session_id": session_id})
    return head[:-1] + ',"attributes":' + attributes + "," + tail[1:]


def build_where(filters: dict, scope: tuple = ("", ())) -> tuple:
    """SQL conditions for the list filters, ANDed with a route's own scope condition."""
    clauses, args = ([scope[0]], list(scope[1])) if scope[0] else ([], [])
    for name in STREAM_FILTERS:
        if filters.get(name) is not None:
            clauses.append(f"{name} = ?")
            args.append(filters[name])
    if filters.get("event_type") is not None:  # no index of its own: use aggregate_type's
        clauses.append("aggregate_type = ?")
        args.append(EVENT_TYPE_AGGREGATES.get(filters["event_type"], ""))
    if filters.get("since") is not None:
        clauses.append("timestamp > ?")
        args.append(filters["since"])
    if filters.get("until") is not None:
        clauses.append("timestamp <= ?")
        args.append(filters["until"])
    return " AND ".join(clauses), args


FEW = 20000  # below this many matches, a time filter is best served by the timestamp index


def _count(conn: sqlite3.Connection, sql: str, args: Sequence) -> int:
    row = conn.execute(sql, args).fetchone()  # no row: a value never counted
    return row[0] or 0 if row else 0


def _counter(conn: sqlite3.Connection, field: str, value: str) -> int:
    return _count(conn, "SELECT n FROM counts WHERE field = ? AND value = ?", (field, value))


def _time_total(conn: sqlite3.Connection, params: dict) -> int:
    """Events in the since/until window, counted on whichever side of it is smaller."""
    since, until = params.get("since"), params.get("until")
    where, args = build_where({"since": since, "until": until})
    few = _count(conn, f"SELECT count(*) FROM (SELECT 1 FROM events WHERE {where} LIMIT {FEW + 1})", args)
    if few <= FEW or (since is not None and until is not None):
        return few if few <= FEW else _count(conn, f"SELECT count(*) FROM events WHERE {where}", args)
    outside = "timestamp <= ?" if since is not None else "timestamp > ?"
    return last_position(conn) - _count(conn, f"SELECT count(*) FROM events WHERE {outside}", [since or until])


def aggregate_version(conn: sqlite3.Connection, aggregate_type: str, aggregate_id: str) -> int:
    return _count(conn, "SELECT max(aggregate_version) FROM events WHERE aggregate_type = ? AND aggregate_id = ?",
                  (aggregate_type, aggregate_id))


def scope_arms(agent: str | None, workflow: str | None) -> list:
    """The route's own condition, as (sql, args) arms whose results are disjoint. A workflow's
    timeline is two index-ordered arms that SQLite merges, instead of an OR and a sort."""
    if agent is not None:
        return [("aggregate_type = 'agent_aggregate' AND aggregate_id = ?", (agent,))]
    if workflow is not None:
        return [("aggregate_type = 'workflow_aggregate' AND aggregate_id = ?", (workflow,)),
                ("correlation_id = ? AND NOT (aggregate_type = 'workflow_aggregate' AND aggregate_id = ?)",
                 (workflow, workflow))]
    return [("", ())]


def query_events(conn: sqlite3.Connection, params: dict, agent: str | None = None,
                 workflow: str | None = None) -> dict:
    """A page of events and the exact total for the filters (cursor and paging aside);
    scoped to one agent's events, or to a workflow's timeline, when given."""
    equal = {name: params[name] for name in STREAM_FILTERS if params.get(name) is not None}
    timed = params.get("since") is not None or params.get("until") is not None
    arms = scope_arms(agent, workflow)
    cursor = {"position > ?": params.get("after"), "position < ?": params.get("before")}
    cursor = {clause: value for clause, value in cursor.items() if value is not None}
    indexed, total = "", None
    if timed and not equal and agent is None and workflow is None:
        total = _time_total(conn, params)
        if total <= FEW:
            indexed = " INDEXED BY events_timestamp"

    def union(with_cursor: bool) -> tuple:
        parts, args = [], []
        for arm in arms:
            where, arm_args = build_where(params, arm)
            clauses = ([where] if where else []) + (list(cursor) if with_cursor else [])
            parts.append(f"SELECT {COLUMNS} FROM events{indexed}" +
                         (" WHERE " + " AND ".join(clauses) if clauses else ""))
            args += [*arm_args, *(cursor.values() if with_cursor else ())]
        return " UNION ALL ".join(parts), args

    sql, args = union(with_cursor=True)
    order = "ASC" if params["order"] == "asc" else "DESC"
    rows = conn.execute(f"{sql} ORDER BY position {order} LIMIT ? OFFSET ?",
                        [*args, params["limit"], params["offset"]]).fetchall()
    if total is None:
        total = summary_total(conn, equal, timed, agent, workflow)
    if total is None:  # counted on the same indexes the page used
        count_sql, count_args = union(with_cursor=False)
        total = _count(conn, f"SELECT count(*) FROM ({count_sql})", count_args)
    return {"items": [item_json(row) for row in rows], "total": total,
            "next": rows[-1][0] if len(rows) == params["limit"] else None}


def summary_total(conn: sqlite3.Connection, equal: dict, timed: bool, agent: str | None,
                  workflow: str | None) -> int | None:
    """The exact total from the maintained summaries, where they can answer it; else None."""
    if timed or len(equal) > 1 or (equal and (agent is not None or workflow is not None)):
        return None
    if equal:
        [(field, value)] = equal.items()
        if field == "event_type":
            return _counter(conn, "aggregate_type", EVENT_TYPE_AGGREGATES.get(value, ""))
        if field == "aggregate_id":  # its events are numbered 1..n for each aggregate_type
            return sum(aggregate_version(conn, aggregate_type, value) for aggregate_type in AGGREGATE_KINDS)
        return _counter(conn, field, value)
    if agent is not None:
        return aggregate_version(conn, "agent_aggregate", agent)
    if workflow is not None:
        overlap = _count(conn, "SELECT count(*) FROM events WHERE aggregate_type = 'workflow_aggregate' "
                               "AND aggregate_id = ? AND correlation_id = ?", (workflow, workflow))
        own = aggregate_version(conn, "workflow_aggregate", workflow)
        return own + _counter(conn, "correlation_id", workflow) - overlap
    return last_position(conn)  # positions are 1..n without gaps


def read_after(conn: sqlite3.Connection, position: int, filters: dict, limit: int = PAGE) -> list:
    """Stored events after `position` matching the stream filters, oldest first."""
    where, args = build_where(filters, ("position > ?", (position,)))
    return conn.execute(f"SELECT {COLUMNS} FROM events WHERE {where} ORDER BY position LIMIT ?",
                        [*args, limit]).fetchall()


def last_position(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT max(position) FROM events").fetchone()[0] or 0


AGENT_EVENTS = "FROM events WHERE aggregate_type = 'agent_aggregate' AND aggregate_id = m.agent_id"
WORKFLOW_AGENTS = f"""
SELECT m.agent_id,
    (SELECT agent_name {AGENT_EVENTS} AND agent_name IS NOT NULL ORDER BY position DESC LIMIT 1),
    (SELECT causation_id {AGENT_EVENTS} AND causation_id IS NOT NULL ORDER BY position DESC LIMIT 1),
    (SELECT timestamp {AGENT_EVENTS} ORDER BY position LIMIT 1),
    (SELECT timestamp {AGENT_EVENTS} ORDER BY position DESC LIMIT 1),
    (SELECT max(aggregate_version) {AGENT_EVENTS}),
    (SELECT event_name {AGENT_EVENTS} ORDER BY position DESC LIMIT 1)
FROM workflow_agents m WHERE m.workflow_id = ? ORDER BY m.first_position
"""


def workflow_agents(conn: sqlite3.Connection, workflow_id: str) -> list:
    """Agents with an event correlated to the workflow, in order of their first such event.
    Their figures cover all their events: the first's and the latest's times, the count,
    and the latest event's name as status."""
    return [
        {"agent_id": agent_id, "agent_name": name, "workflow_id": workflow_id, "parent_agent_id": parent,
         "first_event_time": first, "last_event_time": last, "event_count": count, "status": status}
        for agent_id, name, parent, first, last, count, status in conn.execute(WORKFLOW_AGENTS, (workflow_id,))
    ]


# =============================================================================
# 4. Live broadcasting
# =============================================================================
# One thread follows the log: woken at once by this process's commits and every
# POLL seconds for other processes' commits, it reads the new rows once,
# serializes each once, and hands the bytes to the event loop, which appends
# them to each matching subscriber's bounded buffer. A subscriber whose buffer
# overflows is marked `behind` and catches up from the store by position, so a
# slow reader neither blocks anyone nor loses events.

POLL = 0.05  # seconds between checks for commits made by other processes
CLOSE_GRACE = 0.3  # seconds a stream stuck on a slow client gets to finish when the server stops
BUFFER = 1024  # messages a subscriber may have waiting before it catches up from the store
FILTER_INDEX = {"event_type": 1, "aggregate_type": 2, "aggregate_id": 3, "correlation_id": 4, "event_name": 5}


def sse_message(row: tuple) -> tuple:
    """(position, event_type, aggregate_type, aggregate_id, correlation_id, event_name, bytes)."""
    data = f"id: {row[0]}\nevent: event\ndata: {item_json(row)}\n\n".encode()
    return (row[0], row[5], row[2], row[3], row[9], row[6], data)


class Subscriber:
    __slots__ = ("filters", "live_from", "buffer", "wake", "behind", "closed", "pump")

    def __init__(self, filters: dict, live_from: int) -> None:
        self.filters = [(FILTER_INDEX[k], v) for k, v in filters.items() if v is not None]
        self.live_from = live_from  # the log's last position just before it subscribed
        self.buffer: deque = deque()
        self.wake = asyncio.Event()
        self.behind = True  # it starts by reading the stored events after its start position
        self.closed = False
        self.pump: asyncio.Future | None = None  # the task that sends to the client


class Hub:
    """Subscribers of this process and the thread that feeds them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.subscribers: set = set()
        self.overflows = 0  # times a subscriber fell behind and was caught up from the store
        self._signal = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        store.on_commit = self._on_commit

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._follow, name="eventuali-follow", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self.close_all()
        self._stopping = True
        self._signal.set()
        if self._thread is not None:  # before the store closes the connection it reads with
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def close_all(self) -> None:
        """End every stream: at once where it waits for events, and after CLOSE_GRACE
        where it is stuck sending to a client that does not read."""
        for sub in self.subscribers:
            sub.closed = True
            sub.wake.set()
            if sub.pump is not None:
                asyncio.get_running_loop().call_later(CLOSE_GRACE, sub.pump.cancel)

    def subscribe(self, filters: dict, live_from: int) -> Subscriber:
        """A new subscriber; every event after `live_from` committed from now on reaches it."""
        sub = Subscriber(filters, live_from)
        self.subscribers.add(sub)
        self._signal.set()
        return sub

    def _on_commit(self) -> None:
        if self.subscribers:  # with nobody listening the follower sleeps: emits pay nothing for it
            self._signal.set()

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def _follow(self) -> None:
        cursor = None
        while not self._stopping:
            self._signal.wait(POLL if self.subscribers else None)
            self._signal.clear()
            subscribers = tuple(self.subscribers)
            if self._stopping:
                break
            if not subscribers:
                cursor = None
                continue
            # Events up to every subscriber's live_from reach it by its own catch-up read,
            # so the cursor may start there; a later one only re-reads rows nobody skips.
            floor = min(sub.live_from for sub in subscribers)
            cursor = floor if cursor is None else max(cursor, floor)
            try:
                top = self.store.read_now(last_position)
                while cursor < top:
                    rows = self.store.read_now(read_after, cursor, {})
                    if not rows:
                        break
                    cursor = rows[-1][0]
                    self._loop.call_soon_threadsafe(self._fan_out, [sse_message(row) for row in rows])
            except StoreError as exc:  # the store is failing: streams wait, then go on from the cursor
                logger.warning("stream follower: %s", exc)
                time.sleep(POLL)
            except RuntimeError:  # the loop has closed under us during shutdown
                break

    def _fan_out(self, messages: list) -> None:
        for sub in self.subscribers:
            if sub.behind:
                continue
            buffer = sub.buffer
            for message in messages:
                for index, value in sub.filters:
                    if message[index] != value:
                        break
                else:
                    buffer.append(message)
            if len(buffer) > BUFFER:
                sub.behind = True
                buffer.clear()
                self.overflows += 1
            if buffer or sub.behind:
                sub.wake.set()


# =============================================================================
# 5. HTTP handlers
# =============================================================================

JSON_TYPE = "application/json"


def json_response(content: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(compact_json(content), status_code=status, media_type=JSON_TYPE, headers=headers)


# -- the emit routes: the hot path -------------------------------------------------
# Every agent hook POSTs here, so these routes are plain ASGI functions served in front
# of routing (see emit_routes): one pass over the headers, no Request or Response
# objects, the reply written as JSON text directly. Measured in-process, an emit took
# 75 µs through routing and Request/Response, 43 µs this way (the bare endpoint: 24 µs).

json_string = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept as is


async def receive_json(scope: dict, receive: Callable, config: APIServerConfig) -> Any:
    """The request's JSON body: 415 unless it is JSON, 413 as soon as it passes max_body."""
    content_type, length = b"application/json", b""
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            length = value
    media = content_type.split(b";")[0].strip().lower()
    if media != b"application/json" and not media.endswith(b"+json"):
        raise Problem(415, f"content type must be {JSON_TYPE}, not {media.decode('latin-1')!r}")
    limit = config.max_body
    too_large = f"request body is larger than {limit} bytes"
    if length.isdigit() and int(length) > limit:
        raise Problem(413, too_large)
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Problem(400, "the client closed the connection before sending the whole body")
        body += message.get("body", b"")
        if len(body) > limit:
            raise Problem(413, too_large)
        if not message.get("more_body"):
            return parse_json(body, config.max_depth)


async def send_json(send: Callable, body: str, status: int = 200, headers: Sequence = ()) -> None:
    data = body.encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(data)), *headers]})
    await send({"type": "http.response.body", "body": data})


def problem_json(exc: Problem) -> str:
    return compact_json({"detail": exc.detail, **exc.extra})


def emit_reply(kind: str, name: str, result: tuple) -> str:
    """The original's emit reply, as JSON text (ids, timestamps and numbers need no escaping)."""
    event_id, position, version, timestamp, aggregate_id = result
    message = json_string(f"{KINDS[kind][2]} event '{name}' emitted successfully")
    return (f'{{"success":true,"event_id":"{event_id}","message":{message},"timestamp":"{timestamp}",'
            f'"position":{position},"aggregate_id":{json_string(aggregate_id)},"aggregate_version":{version}}}')


async def stored(future: asyncio.Future) -> Any:
    try:
        return await future
    except StoreError as exc:
        raise Problem(503, str(exc)) from None


def emit_endpoint(kind: str) -> Callable:
    """POST /events/emit/{kind}: one event."""
    async def emit(scope: dict, receive: Callable, send: Callable) -> None:
        state = scope["app"].state
        body = await receive_json(scope, receive, state.config)
        errors: list = []
        event = prepare_event(kind, body, ["body"], errors, state.fields)
        if errors:
            raise Problem(422, errors)
        [result] = await stored(state.store.append([event]))
        await send_json(send, emit_reply(kind, event["name"], result))
    return emit


async def emit_batch(scope: dict, receive: Callable, send: Callable) -> None:
    """POST /events/emit/batch: 1 to max_batch events, stored all or nothing."""
    state = scope["app"].state
    config = state.config
    body = await receive_json(scope, receive, config)
    errors: list = []
    items = body.get("events") if isinstance(body, dict) else None
    if not isinstance(body, dict):
        errors.append(invalid(["body"], "must be a JSON object", "type_error.dict"))
    elif set(body) - {"events"}:
        for key in sorted(set(body) - {"events"}):
            errors.append(invalid(["body", key], "unknown field; allowed: events", "value_error.extra"))
    if isinstance(body, dict) and not isinstance(items, list):
        errors.append(invalid(["body", "events"], "must be a list of events", "type_error.list"))
    elif isinstance(items, list) and not 1 <= len(items) <= config.max_batch:
        errors.append(invalid(["body", "events"], f"must hold 1 to {config.max_batch} events",
                              "value_error.list.size"))
    if errors:
        raise Problem(422, errors)
    fields = state.batch_fields
    events = []
    for index, item in enumerate(items):
        loc = ["body", "events", index]
        kind = item.get("kind") if isinstance(item, dict) else None
        if not isinstance(kind, str) or kind not in KINDS:  # the kind's spec names the problem
            check_object(item, fields, ("kind", *REQUIRED_FIELDS), loc, errors)
            continue
        events.append(prepare_event(kind, item, loc, errors, fields))
    if errors:
        raise Problem(422, errors)
    results = await stored(state.store.append(events))
    replies = ",".join([emit_reply(event["kind"], event["name"], result) for event, result in zip(events, results)])
    await send_json(send, '{"success":true,"events":[' + replies + "]}")


EMIT_ROUTES = {f"/events/emit/{kind}": emit_endpoint(kind) for kind in KINDS}
EMIT_ROUTES["/events/emit/batch"] = emit_batch


def emit_routes(app: Callable) -> Callable:
    """ASGI wrapper that serves the emit routes itself and passes the rest on to routing.
    Errors are answered here as Problem replies; anything else is a bug and reaches
    Starlette's ServerErrorMiddleware (500)."""
    async def route(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # behind `--root-path`, routes match below it, as Starlette's do
            path = path[len(root):]
        endpoint = EMIT_ROUTES.get(path)
        if endpoint is None:
            return await app(scope, receive, send)
        if scope["method"] != "POST":
            return await send_json(send, '{"detail":"Method Not Allowed"}', 405, [(b"allow", b"POST")])
        try:
            await endpoint(scope, receive, send)
        except Problem as exc:
            await send_json(send, problem_json(exc), exc.status)

    return route


def list_reply(page: dict, params: dict) -> Response:
    body = ('{"events":[' + ",".join(page["items"]) + "]," +
            compact_json({"total": page["total"], "limit": params["limit"], "offset": params["offset"],
                          "next": page["next"]})[1:])
    return Response(body, media_type=JSON_TYPE)


def path_id(request: Request, name: str) -> str:
    value = request.path_params[name]
    limit = request.app.state.config.max_id_length
    if len(value) > limit:
        raise Problem(422, [invalid(["path", name], f"must be at most {limit} characters",
                                    "value_error.any_str.max_length")])
    return value


async def list_events(request: Request) -> Response:
    state = request.app.state
    params = check_query(request, state.list_params)
    return list_reply(await state.store.read(query_events, params), params)


async def agent_events(request: Request) -> Response:
    state = request.app.state
    params = check_query(request, state.list_params)
    return list_reply(await state.store.read(query_events, params, path_id(request, "agent_id")), params)


async def workflow_events(request: Request) -> Response:
    state = request.app.state
    params = check_query(request, state.list_params)
    workflow_id = path_id(request, "workflow_id")
    return list_reply(await state.store.read(query_events, params, None, workflow_id), params)


async def workflow_agents_handler(request: Request) -> Response:
    state = request.app.state
    check_query(request, {})
    agents = await state.store.read(workflow_agents, path_id(request, "workflow_id"))
    return json_response({"agents": agents})


async def store_health(store: Store) -> tuple:
    """(connected, events, latency_ms, problem): read and commit a write, timed."""
    started = time.perf_counter()
    try:
        events = await store.read(last_position)
        await store.probe()
    except StoreError as exc:
        return False, None, round((time.perf_counter() - started) * 1000, 3), str(exc)
    return True, events, round((time.perf_counter() - started) * 1000, 3), None


async def health(request: Request) -> Response:
    state = request.app.state
    check_query(request, {})
    connected, _events, _latency, problem = await store_health(state.store)
    reply = {"status": "healthy" if connected else "unhealthy", "timestamp": utc_now(),
             "api_connected": True, "database_connected": connected, "version": state.config.version}
    if problem:
        reply["detail"] = problem
    return json_response(reply, 200 if connected else 503)


async def health_database(request: Request) -> Response:
    state = request.app.state
    check_query(request, {})
    connected, events, latency, problem = await store_health(state.store)
    reply = {"status": "healthy" if connected else "unhealthy", "timestamp": utc_now(),
             "connected": connected, "path": os.path.abspath(state.store.path), "events": events,
             "latency_ms": latency, "streams": len(state.hub.subscribers)}
    if problem:
        reply["detail"] = problem
    return json_response(reply, 200 if connected else 503)


async def root(request: Request) -> Response:
    config = request.app.state.config
    return json_response({"name": config.title, "version": config.version, "description": config.description,
                          "endpoints": {"events": "/events", "health": "/health", "docs": "/docs",
                                        "openapi": "/openapi.json", "ui": "/ui"}})


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no", "connection": "keep-alive"}


async def stream(request: Request) -> Response:
    state = request.app.state
    params = check_query(request, state.stream_params)
    filters = {name: params.get(name) for name in STREAM_FILTERS}
    after = params.get("after")
    last_id = request.headers.get("last-event-id", "").strip()
    if last_id:
        if not re.fullmatch(r"\d{1,19}", last_id):
            raise Problem(422, [invalid(["header", "last-event-id"], "must be an event position (an integer)",
                                        "type_error.integer")])
        after = int(last_id)
    hub: Hub = state.hub
    if len(hub.subscribers) >= state.config.max_streams:
        raise Problem(503, f"too many open streams (at most {state.config.max_streams}); try again later")
    live_from = await state.store.read(last_position)
    sub = hub.subscribe(filters, live_from)
    start = after if after is not None else live_from
    return SSEResponse(sub, filters, hub, state.store, start, state.config.sse_ping)


class SSEResponse(Response):
    """Sends a subscriber's events until the client leaves or the server stops."""

    def __init__(self, sub: Subscriber, filters: dict, hub: Hub, store: Store, start: int, ping: float) -> None:
        self.sub, self.filters, self.hub, self.store = sub, filters, hub, store
        self.start, self.ping = start, ping
        self.status_code = 200
        self.background = None
        self.init_headers(None)
        self.headers.update(SSE_HEADERS)
        self.headers["content-type"] = "text/event-stream; charset=utf-8"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        sub = self.sub

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            sub.closed = True
            sub.wake.set()

        watcher = asyncio.ensure_future(watch_disconnect())
        sub.pump = asyncio.ensure_future(self._pump(send))
        try:
            # asyncio.wait, not await: a pump cancelled by Hub.close_all ends the response quietly
            await asyncio.wait([sub.pump])
            if not sub.pump.cancelled():
                sub.pump.result()
        finally:
            watcher.cancel()
            sub.pump.cancel()
            self.hub.unsubscribe(sub)

    async def _pump(self, send: Callable) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": b"retry: 3000\n: connected\n\n", "more_body": True})
            async for chunk in self._messages():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-send
        except Exception as exc:
            if type(exc).__name__ != "ClientDisconnected":  # uvicorn's, raised by send() after a disconnect
                raise

    async def _messages(self) -> AsyncIterator[bytes]:
        sub, last, filters = self.sub, self.start, self.filters
        while not sub.closed:
            if sub.behind:
                sub.behind = False
                sub.buffer.clear()
                while not sub.closed:  # stored events first, in bounded pages
                    try:
                        rows = await self.store.read(read_after, last, filters)
                    except StoreError as exc:
                        yield f"event: error\ndata: {json.dumps({'detail': str(exc)})}\n\n".encode()
                        return
                    if rows:
                        last = rows[-1][0]
                        yield b"".join(sse_message(row)[-1] for row in rows)
                    if len(rows) < PAGE:
                        break
            chunk = []
            while sub.buffer:
                message = sub.buffer.popleft()
                if message[0] > last:  # skip what the catch-up already sent
                    last = message[0]
                    chunk.append(message[-1])
            if chunk:
                yield b"".join(chunk)
                continue
            sub.wake.clear()
            if sub.buffer or sub.behind or sub.closed:
                continue
            try:
                await asyncio.wait_for(sub.wake.wait(), self.ping)
            except asyncio.TimeoutError:
                yield b": ping\n\n"


# -- errors, access, app -------------------------------------------------------

async def problem_handler(request: Request, exc: Problem) -> Response:
    return Response(problem_json(exc), status_code=exc.status, media_type=JSON_TYPE)


async def http_error_handler(request: Request, exc: HTTPException) -> Response:
    return json_response({"detail": exc.detail}, exc.status_code, getattr(exc, "headers", None))


async def store_error_handler(request: Request, exc: StoreError) -> Response:
    return json_response({"detail": str(exc)}, 503)


async def server_error_handler(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return json_response({"detail": "Internal Server Error"}, 500)


PUBLIC_PATHS = ("/", "/health", "/health/", "/health/database", "/docs", "/openapi.json", "/ui")


def require_key(app: Callable, key: str) -> Callable:
    """ASGI wrapper: event routes need `Authorization: Bearer <key>` (or ?access_token= on the stream)."""
    expected = key.encode()

    async def guard(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or scope["method"] == "OPTIONS":
            return await app(scope, receive, send)
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].strip()
        if not token and scope["path"] == "/events/stream":
            query = Request(scope).query_params.get("access_token", "")
            token = query.encode()
        if hmac.compare_digest(token, expected):
            return await app(scope, receive, send)
        detail = "missing or wrong API key: send 'Authorization: Bearer <key>'"
        response = json_response({"detail": detail}, 401, {"www-authenticate": "Bearer"})
        await response(scope, receive, send)

    return guard


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_TOKEN = re.compile(r"(access_token=)[^&\s]*")


def redact_token(record: logging.LogRecord) -> bool:
    """Logging filter: the stream's ?access_token= never reaches a log line."""
    if isinstance(record.args, tuple) and any("access_token=" in str(arg) for arg in record.args):
        record.args = tuple(_TOKEN.sub(r"\1***", arg) if isinstance(arg, str) else arg for arg in record.args)
    return True


def cors_when_origin(app: Callable, **options: Any) -> Callable:
    """CORSMiddleware, skipped for requests without an Origin header (agents, scripts):
    it has nothing to add to those and costs a header parse and a send wrapper each."""
    cors = CORSMiddleware(app, **options)

    async def route(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and any(name == b"origin" for name, _ in scope["headers"]):
            return await cors(scope, receive, send)
        await app(scope, receive, send)

    return route


def chain_signals(hub: Hub, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Close every stream as soon as SIGINT/SIGTERM arrives, then let the server's own
    handler run: uvicorn waits for open responses, so streams would hold shutdown up."""
    previous = {}

    def handler(sig: int, frame: Any) -> None:
        loop.call_soon_threadsafe(hub.close_all)
        prior = previous.get(sig)
        if callable(prior):
            prior(sig, frame)
        elif prior == signal.SIG_DFL and sig == signal.SIGINT:
            raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

    def restore() -> None:
        for sig, prior in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, prior)

    return restore


def create_app(config: APIServerConfig | None = None) -> Starlette:
    """The Starlette application; `config` defaults to get_config()."""
    config = config or get_config()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = Store(config)
        await store.start()
        hub = Hub(store)
        hub.start()
        app.state.store, app.state.hub = store, hub
        restore = chain_signals(hub, asyncio.get_running_loop())
        access_log = logging.getLogger("uvicorn.access")
        access_log.addFilter(redact_token)  # added here: uvicorn sets up its loggers before startup
        url = f"http://{config.host}:{config.port}"
        logger.info("Eventuali API Server %s on %s (docs: %s/docs), database: %s",
                    config.version, url, url, os.path.abspath(store.path))
        if not config.api_key and not is_loopback(config.host):
            logger.warning("listening on %s without an API key: anyone who can reach it can read and "
                           "write events; set --api-key (API_KEY)", config.host)
        try:
            yield
        finally:
            access_log.removeFilter(redact_token)
            restore()
            await hub.stop()
            await store.stop()

    routes = [  # the emit routes are served in front of these: see emit_routes
        Route("/", root),
        Route("/health", health),
        Route("/health/", health),
        Route("/health/database", health_database),
        Route("/events", list_events),
        Route("/events/", list_events),
        Route("/events/stream", stream),
        Route("/events/agents/{agent_id}", agent_events),
        Route("/events/workflows/{workflow_id}", workflow_events),
        Route("/events/workflows/{workflow_id}/agents", workflow_agents_handler),
        Route("/openapi.json", openapi_handler),
        Route("/docs", docs_handler),
        Route("/ui", ui_handler),
    ]
    middleware = [Middleware(
        cors_when_origin, allow_origins=config.cors_origins,
        allow_credentials=config.cors_allow_credentials,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Accept", "Cache-Control"],
    )]
    if config.api_key:
        middleware.append(Middleware(require_key, key=config.api_key))
    middleware.append(Middleware(emit_routes))
    handlers = {Problem: problem_handler, HTTPException: http_error_handler, StoreError: store_error_handler,
                Exception: server_error_handler}
    application = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers,
                            lifespan=lifespan)
    application.router.redirect_slashes = False  # the original's 307s broke its own client
    application.state.config = config
    application.state.fields = event_fields(config)
    application.state.batch_fields = {"kind": KIND_FIELD, **application.state.fields}
    application.state.list_params = list_params(config)
    application.state.stream_params = stream_params(config)
    return application


def lazy_app() -> Callable:
    """The module-level `app`: built on first use, so that set_config() and the
    environment of `uvicorn eventuali_api_server:app` both take effect."""
    built: list = []

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if not built:
            built.append(create_app())
        await built[0](scope, receive, send)

    return app


# =============================================================================
# 6. OpenAPI and docs HTML
# =============================================================================

def openapi_handler(request: Request) -> Response:
    return json_response(openapi(request.app.state.config))


def docs_handler(request: Request) -> Response:
    return HTMLResponse(docs_html(request.app.state.config))


def ui_handler(request: Request) -> Response:
    return HTMLResponse(UI_PAGE)


def _nullable(spec: dict) -> dict:
    spec = {k: v for k, v in spec.items() if not k.startswith("x-")}
    spec["type"] = [spec["type"], "null"]
    return spec


def _request_schema(fields: dict, required: Sequence[str], description: str) -> dict:
    return {"type": "object", "description": description, "additionalProperties": False,
            "required": list(required),
            "properties": {name: ({k: v for k, v in spec.items() if not k.startswith("x-")}
                                  if name in required else _nullable(spec)) for name, spec in fields.items()}}


def _parameters(specs: dict) -> list:
    return [{"name": name, "in": "query", "required": False, "description": spec.get("description", ""),
             "schema": {k: v for k, v in spec.items() if k != "description"}} for name, spec in specs.items()]


def _path_parameter(name: str, config: APIServerConfig) -> dict:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": config.max_id_length}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {JSON_TYPE: {"schema": schema}}}


STRING_OR_NULL = {"type": ["string", "null"]}
ERRORS = {
    401: ("Error", "Missing or wrong API key (only when the server has one)."),
    404: ("Error", "No such path."),
    409: ("Conflict", "Version conflict (`expected_version`) or an `event_id` reused with other content; "
                      "nothing was stored."),
    413: ("Error", "Request body too large."),
    415: ("Error", "Content type is not application/json."),
    422: ("ValidationError", "Invalid request: every problem is listed with its location."),
    503: ("Error", "The database cannot serve now (locked, read-only, disk full) or too many streams."),
}


def _errors(*codes: int) -> dict:
    return {str(code): _json(_ref(ERRORS[code][0]), ERRORS[code][1]) for code in codes}


SEED_EXAMPLES = {
    "agent": {"name": "agent.started", "attributes": {"agent_name": "url-cacher",
              "message": "Agent started successfully"}, "aggregate_id": "url-cacher-abc123",
              "correlation_id": "workflow-def456", "causation_id": "parent-agent-789"},
    "workflow": {"name": "workflow.started", "attributes": {"user_prompt": "Cache the documentation page"},
                 "aggregate_id": "workflow-def456"},
    "system": {"name": "session.started", "attributes": {"session_type": "interactive"},
               "aggregate_id": "session-ghi789"},
}


def _schemas(config: APIServerConfig) -> dict:
    fields = event_fields(config)
    item_props = {
        "event_id": {"type": "string"}, "position": {"type": "integer", "minimum": 1},
        "aggregate_id": {"type": "string"}, "aggregate_type": {"type": "string"},
        "aggregate_version": {"type": "integer", "minimum": 1}, "event_type": {"type": "string"},
        "event_name": {"type": "string"}, "timestamp": {"type": "string", "format": "date-time"},
        "attributes": {"type": "object"},
        **{name: STRING_OR_NULL for name in ("correlation_id", "causation_id", "agent_name", "agent_id",
                                             "parent_agent_id", "workflow_id", "user_prompt", "session_id")},
    }
    emit_props = {"success": {"type": "boolean"}, "event_id": {"type": "string"}, "message": {"type": "string"},
                  "timestamp": {"type": "string", "format": "date-time"}, "position": {"type": "integer"},
                  "aggregate_id": {"type": "string"}, "aggregate_version": {"type": "integer"}}
    agent_props = {"agent_id": {"type": "string"}, "agent_name": STRING_OR_NULL, "workflow_id": {"type": "string"},
                   "parent_agent_id": STRING_OR_NULL, "first_event_time": {"type": "string"},
                   "last_event_time": {"type": "string"}, "event_count": {"type": "integer"},
                   "status": {"type": "string", "description": "The agent's latest event name."}}
    health_props = {"status": {"type": "string", "enum": ["healthy", "unhealthy"]},
                    "timestamp": {"type": "string"}, "api_connected": {"type": "boolean"},
                    "database_connected": {"type": "boolean"}, "version": {"type": "string"},
                    "detail": {"type": "string"}}
    db_props = {"status": {"type": "string", "enum": ["healthy", "unhealthy"]}, "timestamp": {"type": "string"},
                "connected": {"type": "boolean"}, "path": {"type": "string"},
                "events": {"type": ["integer", "null"]}, "latency_ms": {"type": "number"},
                "streams": {"type": "integer", "description": "Streams open on this process."},
                "detail": {"type": "string"}}

    def obj(props: dict, optional: Sequence[str] = ()) -> dict:
        return {"type": "object", "properties": props, "required": [k for k in props if k not in optional]}

    return {
        "EventRequest": _request_schema(fields, REQUIRED_FIELDS, "An event to append."),
        "BatchEvent": _request_schema({"kind": KIND_FIELD, **fields},
                                      ("kind", *REQUIRED_FIELDS), "An event of a batch, with its kind."),
        "BatchRequest": {"type": "object", "additionalProperties": False, "required": ["events"],
                         "properties": {"events": {"type": "array", "minItems": 1, "maxItems": config.max_batch,
                                                   "items": _ref("BatchEvent")}}},
        "EmitReply": obj(emit_props),
        "BatchReply": obj({"success": {"type": "boolean"}, "events": {"type": "array", "items": _ref("EmitReply")}}),
        "EventItem": obj(item_props),
        "EventList": obj({"events": {"type": "array", "items": _ref("EventItem")},
                          "total": {"type": "integer", "description": "Events matching the filters "
                                    "(the cursor and paging aside)."},
                          "limit": {"type": "integer"}, "offset": {"type": "integer"},
                          "next": {"type": ["integer", "null"], "description": "When the page is full: the "
                                   "cursor for the next page (`after` with order=asc, `before` with desc)."}}),
        "WorkflowAgent": obj(agent_props),
        "AgentList": obj({"agents": {"type": "array", "items": _ref("WorkflowAgent")}}),
        "Health": obj(health_props, ("detail",)),
        "DatabaseHealth": obj(db_props, ("detail",)),
        "Root": obj({"name": {"type": "string"}, "version": {"type": "string"}, "description": {"type": "string"},
                     "endpoints": {"type": "object", "additionalProperties": {"type": "string"}}}),
        "Error": obj({"detail": {"type": "string"}}),
        # One Server-Sent Event as a client parses it (before OpenAPI 3.2, the schema of a
        # text/event-stream reply describes each event): its data is the JSON text of an event
        # item, or of an error when the store fails mid-stream.
        "StreamEvent": {"type": "object", "required": ["event", "data"], "properties": {
            "event": {"type": "string", "enum": ["event", "error"]},
            "id": {"type": "string", "pattern": "^[0-9]{1,19}$", "description": "The event's position."},
            "retry": {"type": "integer", "minimum": 0},
            "data": {"type": "string", "contentMediaType": JSON_TYPE,
                     "contentSchema": {"anyOf": [_ref("EventItem"), _ref("Error")]}}}},
        "Conflict": obj({"detail": {"type": "string"}, "current_version": {"type": "integer"}}, ("current_version",)),
        "ValidationError": obj({"detail": {"type": "array", "items": obj({
            "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
            "msg": {"type": "string"}, "type": {"type": "string"}})}}),
    }


def openapi(config: APIServerConfig) -> dict:
    """The OpenAPI 3.1 document, built from the same specs that validate requests."""
    guarded = [{"bearer": []}] if config.api_key else None
    lists = _parameters(list_params(config))

    def op(summary: str, tag: str, replies: dict, *codes: int, **extra: Any) -> dict:
        operation = {"summary": summary, "tags": [tag], "operationId": extra.pop("operation_id"),
                     "responses": {**replies, **_errors(*codes)}, **extra}
        if guarded and tag == "events":
            operation["security"] = guarded
            operation["responses"].update(_errors(401))
        return operation

    def emit_op(kind: str) -> dict:
        label = KINDS[kind][2]
        return op(f"Emit a {kind} event", "events", {"200": _json(_ref("EmitReply"), "Stored and committed.")},
                  409, 413, 415, 422, 503, operation_id=f"emit_{kind}",
                  description=f"Appends one {label.lower()} event (`aggregate_type` {KINDS[kind][0]}, "
                              f"`event_type` {KINDS[kind][1]}). The reply comes after the commit.",
                  requestBody={"required": True, "content": {JSON_TYPE: {
                      "schema": _ref("EventRequest"), "example": SEED_EXAMPLES[kind]}}})

    def list_op(summary: str, operation_id: str, description: str, path_param: str | None = None) -> dict:
        params = ([_path_parameter(path_param, config)] if path_param else []) + lists
        return op(summary, "events", {"200": _json(_ref("EventList"), "A page of events.")},
                  *((404,) if path_param else ()), 422, 503, operation_id=operation_id,
                  description=description, parameters=params)

    events_list = list_op("Query events", "list_events", "Events with filters, newest first by default.")
    health_op = op("Health of the API and its database", "health",
                   {"200": _json(_ref("Health"), "Healthy."),
                    "503": _json(_ref("Health"), "Unhealthy: the database cannot be read and written.")},
                   422, operation_id="health")
    paths = {
        "/": {"get": op("Server information", "info", {"200": _json(_ref("Root"), "Name, version, endpoints.")},
                        operation_id="root")},
        "/health": {"get": {**health_op, "operationId": "health_no_slash"}},
        "/health/": {"get": health_op},
        "/health/database": {"get": op(
            "Database health", "health", {"200": _json(_ref("DatabaseHealth"), "Healthy."),
                                          "503": _json(_ref("DatabaseHealth"), "Unhealthy.")},
            422, operation_id="health_database")},
        "/events": {"get": {**events_list, "operationId": "list_events_no_slash"}},
        "/events/": {"get": events_list},
        "/events/emit/agent": {"post": emit_op("agent")},
        "/events/emit/workflow": {"post": emit_op("workflow")},
        "/events/emit/system": {"post": emit_op("system")},
        "/events/emit/batch": {"post": op(
            "Emit several events atomically", "events", {"200": _json(_ref("BatchReply"), "All stored.")},
            409, 413, 415, 422, 503, operation_id="emit_batch",
            description=f"1 to {config.max_batch} events of any kind, all or nothing, in one transaction. "
                        "`expected_version` is checked against the version at that point in the batch.",
            requestBody={"required": True, "content": {JSON_TYPE: {"schema": _ref("BatchRequest"), "example": {
                "events": [{"kind": kind, **example} for kind, example in SEED_EXAMPLES.items()]}}}})},
        "/events/agents/{agent_id}": {"get": list_op(
            "An agent's events", "agent_events", "Events of the agent aggregate with this id.", "agent_id")},
        "/events/workflows/{workflow_id}": {"get": list_op(
            "A workflow's timeline", "workflow_events", "The workflow's own events and every event whose "
            "`correlation_id` is the workflow id.", "workflow_id")},
        "/events/workflows/{workflow_id}/agents": {"get": op(
            "Agents of a workflow", "events", {"200": _json(_ref("AgentList"), "In order of first appearance.")},
            404, 422, 503, operation_id="workflow_agents", parameters=[_path_parameter("workflow_id", config)],
            description="Agents with an event correlated to the workflow; `status` is the latest event name.")},
        "/events/stream": {"get": op(
            "Live events (Server-Sent Events)", "events",
            {"200": {"description": "`retry: 3000` and a comment at once; then per event `id: <position>`, "
                                    "`event: event`, `data: <event item JSON>`; a `: ping` comment every "
                                    f"{config.sse_ping:g} s. If the store fails, `event: error` with "
                                    "`data: {\"detail\": ...}`, and the stream ends.",
                     "content": {"text/event-stream": {"schema": _ref("StreamEvent")}}}},
            422, 503, operation_id="stream_events", parameters=[
                *_parameters(stream_params(config)),
                {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string",
                 "pattern": "^([0-9]{1,19})?$"}, "description": "Resume after this position (browsers send "
                 "it); empty means none, as when it is left out."}],
            description="Resume with `Last-Event-ID` or `after`: stored events after that position first, then "
                        "live ones, without gap or duplicate. A client that reads too slowly is caught up "
                        "from the store; it never misses an event.")},
        "/openapi.json": {"get": op("This document", "docs", {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
                                    operation_id="openapi")},
        "/docs": {"get": op("Swagger UI", "docs", {"200": {"description": "HTML page.",
                                                            "content": {"text/html": {"schema": {"type": "string"}}}}},
                            operation_id="docs")},
        "/ui": {"get": op("Live view of events, workflows and agents", "docs", {"200": {
            "description": "HTML page (asks for the API key when the server has one).",
            "content": {"text/html": {"schema": {"type": "string"}}}}}, operation_id="live_view")},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": config.title, "version": config.version, "description": config.description,
                 "license": {"name": "MIT", "identifier": "MIT"}},
        "paths": paths,
        "components": {"schemas": _schemas(config),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description":
                                                      "The server's --api-key; the stream also takes it as "
                                                      "?access_token=."}}},
    }


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - docs</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true}});</script>
</body></html>
"""


def docs_html(config: APIServerConfig) -> str:
    from html import escape
    return DOCS_PAGE.format(title=escape(config.title), assets=escape(config.docs_assets_url.rstrip("/")))


# The live view at /ui: one self-contained page (no external asset, works offline).
# It loads the newest events, then follows /events/stream from the last position;
# it keeps at most MAX_ROWS rows in the DOM and MAX_EVENTS events in memory.
UI_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Eventuali live view</title>
<style>
:root { font: 13px/1.4 system-ui, sans-serif; color: #1d2433; background: #f5f6f8; }
body { margin: 0; display: grid; grid-template-rows: auto 1fr; height: 100vh; }
header { display: flex; gap: .5rem; align-items: center; padding: .5rem .8rem; background: #1d2433; color: #fff; flex-wrap: wrap; }
header h1 { font-size: 15px; margin: 0 1rem 0 0; }
header input, header select, header button { font: inherit; padding: .2rem .4rem; border-radius: 4px; border: 1px solid #888; }
#status { margin-left: auto; font-size: 12px; }
#status.live::before { content: "\25CF "; color: #3ddc84; }
#status.down::before { content: "\25CF "; color: #ff6b6b; }
main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: .6rem; padding: .6rem; min-height: 0; }
section { background: #fff; border-radius: 6px; box-shadow: 0 1px 2px #0002; overflow: auto; min-height: 0; }
section h2 { font-size: 13px; margin: 0; padding: .4rem .6rem; position: sticky; top: 0; background: #eef0f4; }
table { border-collapse: collapse; width: 100%; }
td { padding: .2rem .5rem; border-bottom: 1px solid #eee; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; max-width: 16rem; }
tr.event { cursor: pointer; } tr.event:hover { background: #f0f6ff; } tr.selected { background: #dbe9ff; }
.k-AgentEvent { color: #0b62d6; } .k-WorkflowEvent { color: #8a3ffc; } .k-SystemEvent { color: #6f6f6f; }
#side { display: grid; grid-template-rows: 1fr auto; gap: .6rem; min-height: 0; }
.wf { padding: .4rem .6rem; border-bottom: 1px solid #eee; }
.wf b { font-weight: 600; } .muted { color: #777; font-size: 12px; }
ul.tree { list-style: none; margin: .2rem 0 0 .2rem; padding-left: .8rem; border-left: 1px dashed #ccc; }
#detail { max-height: 40vh; }
pre { margin: 0; padding: .5rem .6rem; font-size: 12px; white-space: pre-wrap; word-break: break-all; }
dialog input { width: 20rem; }
</style></head>
<body>
<header>
  <h1>Eventuali live view</h1>
  <select id="f-type" title="event type"><option value="">all types</option>
    <option>AgentEvent</option><option>WorkflowEvent</option><option>SystemEvent</option></select>
  <input id="f-aggregate" placeholder="aggregate id" size="14">
  <input id="f-workflow" placeholder="workflow (correlation) id" size="18">
  <input id="f-name" placeholder="event name" size="14">
  <button id="pause">Pause</button>
  <span id="status" class="down">connecting</span>
</header>
<main>
  <section><h2>Events <span class="muted" id="count"></span></h2>
    <table><tbody id="tail"></tbody></table></section>
  <div id="side">
    <section><h2>Workflows</h2><div id="workflows"></div></section>
    <section id="detail"><h2>Event</h2><pre id="json">Click an event to see all of it.</pre></section>
  </div>
</main>
<dialog id="keydialog"><form method="dialog">
  <p>This server needs its API key.</p><input id="keyinput" type="password" autocomplete="off">
  <button>Use key</button></form></dialog>
<script>
"use strict";
const MAX_ROWS = 500, MAX_EVENTS = 10000, MAX_WORKFLOWS = 200;
const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("eventuali-key") || "";
let source = null, lastId = 0, paused = false, held = [], events = [], selected = null;
const workflows = new Map();  // workflow_id -> {status, first, last, agents: Map}

function filters() {
  const f = {event_type: $("f-type").value, aggregate_id: $("f-aggregate").value.trim(),
             correlation_id: $("f-workflow").value.trim(), event_name: $("f-name").value.trim()};
  return Object.fromEntries(Object.entries(f).filter(([, v]) => v));
}
function query(extra) { return new URLSearchParams({...filters(), ...extra}).toString(); }
async function api(path) {
  const reply = await fetch(path, {headers: key ? {Authorization: "Bearer " + key} : {}});
  if (reply.status === 401) { await askKey(); return api(path); }
  if (!reply.ok) throw new Error(path + ": " + reply.status);
  return reply.json();
}
function askKey() {
  return new Promise((resolve) => {
    const dialog = $("keydialog");
    dialog.addEventListener("close", () => {
      key = $("keyinput").value; sessionStorage.setItem("eventuali-key", key); resolve();
    }, {once: true});
    dialog.showModal();
  });
}
function setStatus(text, live) { $("status").textContent = text; $("status").className = live ? "live" : "down"; }

function duration(a, b) {
  const ms = Date.parse(b) - Date.parse(a);
  if (!(ms >= 0)) return "";
  return ms < 1000 ? ms + " ms" : ms < 60000 ? (ms / 1000).toFixed(1) + " s" : Math.round(ms / 60000) + " min";
}
function remember(e) {
  const wfId = e.aggregate_type === "workflow_aggregate" ? e.aggregate_id : e.correlation_id;
  if (!wfId) return;
  let wf = workflows.get(wfId);
  if (!wf) {
    wf = {status: "", first: e.timestamp, last: e.timestamp, agents: new Map()}; workflows.set(wfId, wf);
    if (workflows.size > MAX_WORKFLOWS) workflows.delete(workflows.keys().next().value);
  }
  if (e.timestamp < wf.first) wf.first = e.timestamp;
  if (e.timestamp > wf.last) wf.last = e.timestamp;
  if (e.aggregate_type === "workflow_aggregate") wf.status = e.event_name;
  if (e.aggregate_type === "agent_aggregate") {
    let a = wf.agents.get(e.aggregate_id);
    if (!a) { a = {name: "", parent: null, status: "", count: 0, first: e.timestamp, last: e.timestamp}; wf.agents.set(e.aggregate_id, a); }
    a.count += 1; a.status = e.event_name; a.last = e.timestamp;
    if (e.agent_name) a.name = e.agent_name;
    if (e.parent_agent_id) a.parent = e.parent_agent_id;
  }
}
function row(e) {
  const tr = document.createElement("tr");
  tr.className = "event"; tr.dataset.position = e.position;
  for (const [text, cls] of [[e.position, "muted"], [e.timestamp.slice(11, 23), "muted"],
                             [e.event_type, "k-" + e.event_type], [e.event_name, ""],
                             [e.aggregate_id, ""], [e.correlation_id || "", "muted"]]) {
    const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.append(td);
  }
  tr.addEventListener("click", () => {
    if (selected) selected.classList.remove("selected");
    selected = tr; tr.classList.add("selected");
    $("json").textContent = JSON.stringify(e, null, 2);
  });
  return tr;
}
let drawPending = false;
function draw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; drawWorkflows(); $("count").textContent = "(" + events.length + ")"; });
}
function drawWorkflows() {
  const box = $("workflows"); box.textContent = "";
  for (const [id, wf] of [...workflows].reverse().slice(0, 50)) {
    const div = document.createElement("div"); div.className = "wf"; div.dataset.workflow = id;
    div.innerHTML = "<b></b> <span class=muted></span>";
    div.querySelector("b").textContent = id;
    div.querySelector("span").textContent = [wf.status, duration(wf.first, wf.last)].filter(Boolean).join(" · ");
    const children = new Map();
    for (const [agentId, a] of wf.agents) {
      const parent = a.parent && wf.agents.has(a.parent) ? a.parent : "";
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(agentId);
    }
    const build = (parent, depth) => {
      const ul = document.createElement("ul"); ul.className = "tree";
      for (const agentId of children.get(parent) || []) {
        if (depth > 20) break;
        const a = wf.agents.get(agentId), li = document.createElement("li");
        li.dataset.agent = agentId;
        li.textContent = (a.name || agentId) + " — " + a.status + " · " + a.count + (a.count === 1 ? " event" : " events") +
                         (duration(a.first, a.last) ? " · " + duration(a.first, a.last) : "");
        const sub = build(agentId, depth + 1);
        if (sub.children.length) li.append(sub);
        ul.append(li);
      }
      return ul;
    };
    div.append(build("", 0));
    box.append(div);
  }
}
function show(list) {
  const tail = $("tail"), rows = document.createDocumentFragment();
  for (const e of list) rows.prepend(row(e));
  tail.prepend(rows);
  while (tail.children.length > MAX_ROWS) tail.lastChild.remove();
}
function receive(e) {
  if (e.position <= lastId) return;
  lastId = e.position;
  events.push(e); if (events.length > MAX_EVENTS) events.splice(0, events.length - MAX_EVENTS);
  remember(e);
  if (paused) { held.push(e); $("pause").textContent = "Resume (" + held.length + ")"; }
  else show([e]);
  draw();
}
function connect() {
  if (source) source.close();
  const params = {after: String(lastId)};
  if (key) params.access_token = key;
  source = new EventSource("/events/stream?" + query(params));
  source.addEventListener("open", () => setStatus("live", true));
  source.addEventListener("event", (m) => receive(JSON.parse(m.data)));
  source.addEventListener("error", () => {
    setStatus("reconnecting", false);
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, 3000);  // else the browser retries with Last-Event-ID
  });
}
async function start() {
  if (source) source.close();
  lastId = 0; events = []; held = []; workflows.clear(); $("tail").textContent = "";
  const page = await api("/events/?" + query({limit: "500"}));
  const history = page.events.reverse();
  for (const e of history) { events.push(e); remember(e); lastId = Math.max(lastId, e.position); }
  show(history); draw(); connect();
}
$("pause").addEventListener("click", () => {
  paused = !paused;
  if (!paused) { show(held); held = []; }
  $("pause").textContent = paused ? "Resume" : "Pause";
});
let debounce = null;
for (const id of ["f-type", "f-aggregate", "f-workflow", "f-name"])
  $(id).addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(start, 300); });
start().catch((err) => setStatus(String(err), false));
</script>
</body></html>
"""


# =============================================================================
# 7. CLI
# =============================================================================

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventuali-api-server",
        description="Append-only event log for AI-agent workflows, over REST and Server-Sent Events. "
                    "Every option can also be set by the environment variable named in brackets; "
                    "an option given here beats its variable.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for field, env, flag, parse, help_text in SETTINGS:
        extra = {"nargs": "?", "const": "true"} if parse is _parse_bool else {}
        parser.add_argument(flag, dest=field, default=None, metavar=env, help=f"{help_text} [{env}]", **extra)
    return parser


def resolve_config(argv: Sequence[str] | None, environ: dict | None = None) -> APIServerConfig:
    """Flags beat environment variables, which beat defaults. ConfigError names the setting."""
    args = build_parser().parse_args(argv)
    overrides = {}
    for field, env, flag, parse, _help in SETTINGS:
        text = getattr(args, field)
        if text is not None:
            try:
                overrides[field] = parse(text)
            except ValueError as exc:
                raise ConfigError(f"{flag} {text!r}: {exc}") from None
    return config_from_env(environ, **overrides)


def backup(source: str, dest: str, timeout: float) -> int:
    """Copy the live database to `dest` with SQLite's online backup API; returns the event
    count of the copy. Writers go on meanwhile: the copy holds every event committed when
    it began, consistent as of one moment."""
    if os.path.exists(dest):
        raise StoreError(f"{dest} exists; backup writes a new file")
    if not os.path.exists(source):
        raise StoreError(f"no database at {source}")
    src = connect(source, timeout, readonly=True)
    os.close(os.open(dest, os.O_CREAT | os.O_WRONLY, 0o600))
    dst = sqlite3.connect(dest)
    try:
        src.backup(dst)
        return last_position(dst)
    finally:
        dst.close()
        src.close()


def backup_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="eventuali-api-server backup",
        description="Write a consistent copy of the live database to DEST while the server keeps serving. "
                    "To restore: stop the server, put the copy in place as DATA_DIR/events.db "
                    "(removing events.db-wal and events.db-shm), start the server.")
    parser.add_argument("dest", help="file to create")
    parser.add_argument("--data-dir", default=None, metavar="DATA_DIR", help="folder of events.db [DATA_DIR]")
    args = parser.parse_args(argv)
    try:
        config = config_from_env(data_dir=args.data_dir)
        events = backup(config.database_path, args.dest, config.database_timeout)
    except (ConfigError, StoreError, sqlite3.Error, OSError) as exc:
        print(f"eventuali-api-server backup: error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"backed up {events} events from {os.path.abspath(config.database_path)} to {args.dest}")


def main(argv: Sequence[str] | None = None) -> None:
    """The `eventuali-api-server` command (and `eventuali-api-server backup DEST`)."""
    import uvicorn

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["backup"]:
        return backup_main(argv[1:])
    try:
        config = resolve_config(argv)
    except ConfigError as exc:
        print(f"eventuali-api-server: error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        conn = open_database(config.database_path, config.database_timeout, config.durability)
        conn.close()
    except (OSError, sqlite3.Error, StoreError) as exc:
        print(f"eventuali-api-server: error: cannot use data dir {config.data_dir!r}: {exc}", file=sys.stderr)
        sys.exit(1)
    set_config(config)
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s:     %(message)s")
    if config.reload:
        # The reloader imports the module afresh in a child: hand it the settings.
        os.environ.update(config_to_env(config))
        uvicorn.run("eventuali_api_server:app", host=config.host, port=config.port, reload=True,
                    log_level=config.log_level, timeout_graceful_shutdown=1,
                    reload_dirs=[os.path.dirname(os.path.abspath(__file__))])
    else:
        uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                    timeout_graceful_shutdown=1)


app = lazy_app()

if __name__ == "__main__":
    main()
