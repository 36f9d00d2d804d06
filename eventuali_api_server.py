"""Eventuali API Server: an append-only event log for AI-agent workflows.

One module, two dependencies (starlette, uvicorn). Agents and hooks POST lifecycle events;
dashboards and scripts query them over REST and watch them live over Server-Sent Events.
The log is kept in SQLite (one file, WAL mode) or, for many servers, in PostgreSQL; one
writer thread per process commits every waiting request in one transaction.

Sections, in dependency order (each opens with what it holds):
    1. Configuration: the settings, from flags, the environment and defaults
    2. Validation: field specs, which also make the OpenAPI schemas
    3. Storage: the EventStore interface, the commit both backends share (with the rollups of
       runs: workflows, agents' states, usage), SQLite, PostgreSQL
    4. Live broadcasting: the Hub, which follows the log and feeds the streams
    5. OpenTelemetry in: OTLP trace exports read (protobuf or JSON) and mapped to events
    6. HTTP: endpoints, metrics, logs, the gate every request passes, the application
    7. OpenAPI: the document, built from ROUTES and the field specs
    8. Running: uvicorn's protocol and the command line
    9. Assets: the HTML of /docs and /ui (the runs page and the live view)

Where to start: `create_app` (6.11) builds the application from `ROUTES`, the one table of
routes, each served through its `gate` (6.9). `EventStore` (3.1) is all the handlers know of
the log; `ThreadedStore.commit` (3.2) is how every append is stored, and `roll_up` what it
keeps of each workflow; the `Hub` (4) follows
the log for the streams; `span_events` (5.3) maps a span to events; `main` (8.2) is the
command line.

Vendoring: copy this file into your project; `pip install starlette uvicorn`.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import base64
import bisect
import collections
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import platform
import queue
import re
import signal
import sqlite3
import struct
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, NamedTuple, Protocol, TypedDict, Union

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__version__ = "1.3.0"
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
    database_url: str = ""
    database_timeout: float = 10.0
    cors_origins: list = dataclasses.field(default_factory=lambda: list(DEFAULT_CORS_ORIGINS))
    cors_allow_credentials: bool = True
    title: str = "Eventuali API Server"
    description: str = "Append-only event log for AI-agent workflows, over REST and Server-Sent Events"
    version: str = __version__
    durability: str = "full"
    api_key: str = ""
    read_api_key: str = ""
    allowed_hosts: list = dataclasses.field(default_factory=list)
    sse_ping: float = 15.0
    max_streams: int = 1000
    max_batch: int = 1000
    max_body: int = 1024 * 1024
    otlp_max_body: int = 16 * 1024 * 1024
    max_depth: int = 32
    max_id_length: int = 256
    read_chunk: int = 4 * 1024 * 1024
    request_timeout: float = 10.0
    limit_concurrency: int = 4096
    stream_buffer: int = 8 * 1024 * 1024
    stream_memory: int = 64 * 1024 * 1024
    docs_assets_url: str = DOCS_ASSETS_URL
    retain: float = 0.0  # seconds events are kept; 0: for ever
    max_future: float = 86400.0  # seconds an event's timestamp may be ahead of the server's clock; 0: any
    metrics: bool = True
    workers: int = 1
    log_format: str = "text"
    prices: str = ""  # a JSON file of USD per million tokens by model (load_prices)
    price_list: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.prices and not self.price_list:
            self.price_list = load_prices(self.prices)
        if self.read_api_key and not self.api_key:
            raise ConfigError("--read-api-key (READ_API_KEY) needs --api-key (API_KEY): the key that may write")
        if "*" in self.cors_origins:
            self.cors_allow_credentials = False  # browsers refuse credentials with a wildcard origin
        # Host names match in any case and on any port: entries are kept as host_name reads a Host
        self.allowed_hosts = [host_name(name.encode("latin-1")) for name in self.allowed_hosts]

    @property
    def database_path(self) -> str:
        return os.path.join(self.data_dir, "events.db")

    @classmethod
    def from_env(cls, environ: dict | None = None) -> APIServerConfig:
        """Settings from the environment (kept from the original's API)."""
        return config_from_env(environ)


class ConfigError(ValueError):
    """A setting has a value it cannot take; the message names the setting."""


PRICE_KINDS = ("input", "output", "cache_read", "cache_creation")


def load_prices(path: str) -> dict:
    """The price list of --prices: {model: {"input": USD per million tokens, "output": …,
    optionally "cache_read" and "cache_creation" (else priced as input)}}."""
    try:
        with open(path, encoding="utf-8") as file:
            prices = json.load(file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--prices {path}: cannot be read as JSON ({exc})") from None
    if not isinstance(prices, dict):
        raise ConfigError(f"--prices {path}: expected an object of model names")
    for model, price in prices.items():
        if not isinstance(price, dict) or not {"input", "output"} <= price.keys() <= set(PRICE_KINDS):
            raise ConfigError(
                f"--prices {path}: {model!r} must be an object with input and output (and optionally "
                "cache_read and cache_creation): USD per million tokens"
            )
        for kind, value in price.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
                raise ConfigError(f"--prices {path}: {model!r} {kind} must be a number of USD, 0 or more")
    return prices


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


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in `30d`, `12h`, `90m`, `45s`, `2w` (or a plain number of seconds)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError("expected a duration above 0 such as 30d, 12h, 90m or 45s")
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def _parse_retain(text: str) -> float:
    return 0.0 if text.strip().lower() in ("0", "0.0", "off", "forever", "") else parse_duration(text)


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
SETTINGS: list[tuple[str, str, str, Callable[[str], Any], str]] = [
    ("host", "HOST", "--host", str, "address to bind (default 127.0.0.1)"),
    ("port", "PORT", "--port", _parse_int(0, 65535), "port to bind (default 8765)"),
    ("reload", "RELOAD", "--reload", _parse_bool, "restart when the code changes"),
    ("log_level", "LOG_LEVEL", "--log-level", _parse_choice(*LOG_LEVELS), "debug|info|warning|error|critical"),
    ("data_dir", "DATA_DIR", "--data-dir", str, "folder of the SQLite database (default .events)"),
    (
        "database_url",
        "DATABASE_URL",
        "--database-url",
        str,
        "a PostgreSQL database instead of SQLite: postgresql://user:password@host:port/dbname",
    ),
    ("cors_origins", "CORS_ORIGINS", "--cors-origins", _parse_origins, "comma-separated allowed origins, or *"),
    (
        "cors_allow_credentials",
        "CORS_ALLOW_CREDENTIALS",
        "--cors-allow-credentials",
        _parse_bool,
        "allow credentials in CORS requests (never with *)",
    ),
    (
        "database_timeout",
        "DATABASE_TIMEOUT",
        "--database-timeout",
        _parse_seconds,
        "seconds to wait for a database lock before answering 503 (default 10)",
    ),
    (
        "durability",
        "DURABILITY",
        "--durability",
        _parse_choice("full", "normal"),
        "full: an acknowledged event survives power loss; normal: it survives a process crash",
    ),
    (
        "api_key",
        "API_KEY",
        "--api-key",
        str,
        "require 'Authorization: Bearer KEY' on event routes (several keys: comma-separated)",
    ),
    (
        "read_api_key",
        "READ_API_KEY",
        "--read-api-key",
        str,
        "keys that may read (list, query, stream) but not emit (comma-separated; needs --api-key)",
    ),
    (
        "allowed_hosts",
        "ALLOWED_HOSTS",
        "--allowed-hosts",
        _parse_origins,
        "comma-separated Host names to answer besides localhost (*.example.com for subdomains; * for any); "
        "without it, a server bound to loopback answers loopback names only",
    ),
    ("sse_ping", "SSE_PING", "--sse-ping", _parse_seconds, "seconds between stream heartbeats (default 15)"),
    ("max_streams", "MAX_STREAMS", "--max-streams", _parse_int(1), "open streams at most (default 1000)"),
    ("max_batch", "MAX_BATCH", "--max-batch", _parse_int(1, 100000), "events per batch at most (default 1000)"),
    ("max_body", "MAX_BODY", "--max-body", _parse_int(1024), "request body bytes at most (default 1 MiB)"),
    (
        "otlp_max_body",
        "OTLP_MAX_BODY",
        "--otlp-max-body",
        _parse_int(1024),
        "bytes of an OTLP export at most, compressed and not (default 16 MiB)",
    ),
    ("max_depth", "MAX_DEPTH", "--max-depth", _parse_int(1, 1000), "attributes nesting depth at most (default 32)"),
    (
        "max_id_length",
        "MAX_ID_LENGTH",
        "--max-id-length",
        _parse_int(1, 65536),
        "characters in a name or id at most (default 256)",
    ),
    (
        "request_timeout",
        "REQUEST_TIMEOUT",
        "--request-timeout",
        _parse_seconds,
        "seconds a client may take to send a request's head, or between two parts of its body, "
        "before the connection is closed (default 10)",
    ),
    (
        "limit_concurrency",
        "LIMIT_CONCURRENCY",
        "--limit-concurrency",
        _parse_int(16),
        "connections and requests at most at once; beyond it, 503 (default 4096)",
    ),
    (
        "read_chunk",
        "READ_CHUNK",
        "--read-chunk",
        _parse_int(64 * 1024),
        "bytes of events one read of the store brings into memory, about (default 4 MiB)",
    ),
    (
        "stream_buffer",
        "STREAM_BUFFER",
        "--stream-buffer",
        _parse_int(64 * 1024),
        "bytes of events a stream may have waiting before it catches up from the store (default 8 MiB)",
    ),
    (
        "stream_memory",
        "STREAM_MEMORY",
        "--stream-memory",
        _parse_int(1024 * 1024),
        "bytes of events all streams catching up from the store hold at once, about (default 64 MiB)",
    ),
    (
        "docs_assets_url",
        "DOCS_ASSETS_URL",
        "--docs-assets-url",
        str,
        "where /docs loads swagger-ui-dist from (default: a CDN)",
    ),
    (
        "retain",
        "RETAIN",
        "--retain",
        _parse_retain,
        "remove events older than this (30d, 12h, 90m; default 0: keep every event)",
    ),
    (
        "max_future",
        "MAX_FUTURE",
        "--max-future",
        _parse_retain,
        "how far ahead of the server's clock an event's timestamp may be (default 1d; 0: any)",
    ),
    ("metrics", "METRICS", "--metrics", _parse_bool, "serve /metrics for Prometheus (on|off, default on)"),
    ("workers", "WORKERS", "--workers", _parse_int(1, 256), "server processes (default 1)"),
    ("log_format", "LOG_FORMAT", "--log-format", _parse_choice("text", "json"), "text|json (default text)"),
    (
        "prices",
        "PRICES",
        "--prices",
        str,
        'a JSON file of model prices in USD per million tokens: {"MODEL": {"input": 2.5, "output": 10}}',
    ),
]


def config_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> APIServerConfig:
    """Settings from environment variables, then `overrides` (already parsed) on top."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
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
    make = getattr(json.encoder, "c_make_encoder", None)  # None where json has no C accelerator
    if make is None:
        return encoder.encode
    try:  # the arguments JSONEncoder.iterencode passes; no cycle check: values come from JSON
        encode = make(None, encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, False)
    except TypeError:  # a C encoder of other arguments than this code knows
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


# The patterns of the specs, and how each is checked. Text the stores keep cannot hold NUL
# (PostgreSQL's text cannot); an id that a route reads back (/events/agents/{id},
# /events/workflows/{id}) cannot hold "/" either, which would split its path.
NO_NUL = "^[^\\u0000]*$"
PATH_ID = "^[^\\u0000/]*$"
# No leading dot: HTTP clients rewrite /consumers/. and /consumers/.. before sending them.
CONSUMER_NAME = "^[A-Za-z0-9_:-][A-Za-z0-9._:-]*$"  # minLength and maxLength say how many
PATTERNS = {
    NO_NUL: (lambda value: "\x00" not in value, "must not contain the NUL character (U+0000)"),
    CONSUMER_NAME: (
        lambda value: re.fullmatch(CONSUMER_NAME[1:-1], value) is not None,
        "must be 1 to 128 of the characters A-Z, a-z, 0-9, '.', '_', ':' and '-'",
    ),
    PATH_ID: (
        lambda value: "\x00" not in value and "/" not in value,
        "must not contain '/' (it is read back as a segment of a path) or the NUL character (U+0000)",
    ),
}


def id_field(description: str, limit: int, example: str | None = None, pattern: str | None = NO_NUL) -> dict:
    """A name or id: a string, non-empty, bounded, and for one that is stored, a pattern."""
    spec = {"type": "string", "minLength": 1, "maxLength": limit, "description": description}
    if pattern:
        spec["pattern"] = pattern
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
            "properties": {key: {"pattern": NO_NUL} for key in ATTRIBUTE_FIELDS},
            "default": {},
        },
        "timestamp": {
            "type": "string",
            "format": "date-time",
            "description": "When it happened; default: when the server stores it. Accepted forms: "
            + TIMESTAMP_FORMS
            + (
                f". At most {config.max_future:g} s ahead of the server's clock (--max-future)."
                if config.max_future
                else ""
            ),
            **({"x-max-future": config.max_future} if config.max_future else {}),
        },
        "aggregate_id": id_field(
            "The agent, workflow or session this event belongs to. Default: a new "
            "UUID for agents and workflows, `system` for system events. No `/`: routes read it back.",
            n,
            pattern=PATH_ID,
        ),
        "causation_id": id_field("What caused it; for agents, the parent agent's id.", n),
        "correlation_id": id_field(
            "What it belongs to; for agents and system events, the workflow id. No `/`: routes read it back.",
            n,
            pattern=PATH_ID,
        ),
        "event_id": {
            "type": "string",
            "format": "uuid",
            "description": "A client-chosen UUID that makes "
            "retries idempotent: the same id with the same content returns the original reply "
            "and stores nothing; with other content it is a 409. Default: a new UUID.",
        },
        "expected_version": {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_INT,
            "description": "Optimistic concurrency: the aggregate's current version must be this "
            "(0: the aggregate must not exist yet), else 409 and nothing is stored.",
        },
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
        if int(oh) >= 24 or int(om) >= 60:
            raise ValueError("offset out of range")
        offset = timedelta(hours=int(oh), minutes=int(om))
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
                    moment = parse_timestamp(value)
                    ahead = spec.get("x-max-future")
                    if ahead and (moment - datetime.now(timezone.utc)).total_seconds() > ahead:
                        problem = (
                            f"is more than {ahead:g} s ahead of the server's clock (--max-future, MAX_FUTURE)",
                            "value_error.datetime.future",
                        )
                    else:
                        return format_timestamp(moment)
                else:
                    return str(uuid.UUID(value))
            except (ValueError, OverflowError) as exc:
                problem = (
                    (f"invalid timestamp ({exc}); accepted: {TIMESTAMP_FORMS}", "value_error.datetime")
                    if spec["format"] == "date-time"
                    else ("must be a UUID", "value_error.uuid")
                )
        elif not value:
            if spec.get("minLength"):
                problem = ("must not be empty", "value_error.any_str.min_length")
        elif len(value) > spec.get("maxLength", len(value)):
            problem = (f"must be at most {spec['maxLength']} characters", "value_error.any_str.max_length")
        elif "pattern" in spec and not PATTERNS[spec["pattern"]][0](value):
            problem = (PATTERNS[spec["pattern"]][1], "value_error.str.regex")
    elif kind == "integer":
        if isinstance(value, float) and value.is_integer():  # JSON Schema: 3.0 is an integer
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            problem = ("must be an integer", "type_error.integer")
        elif not spec.get("minimum", value) <= value <= spec.get("maximum", value):
            problem = (
                f"must be from {spec.get('minimum')} to {spec.get('maximum')}",
                "value_error.number.not_in_range",
            )
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


NUL_MESSAGE = PATTERNS[NO_NUL][1]


def check_object(body: Any, fields: dict, required: Iterable[str], loc: Sequence, errors: list) -> dict:
    """Validate a JSON object: unknown fields, missing fields, then each value."""
    if not isinstance(body, dict):
        errors.append(invalid(loc, "must be a JSON object", "type_error.dict"))
        return {}
    clean = {}
    for key, value in body.items():
        spec = fields.get(key)
        if spec is None:
            errors.append(invalid([*loc, key], "unknown field; allowed: " + ", ".join(fields), "value_error.extra"))
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


def _object(pairs: list) -> dict:
    """A JSON object, refused if a key appears twice (which would let one value hide another)."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} appears more than once in an object")
            seen.add(key)
    return value


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_decode = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float, object_pairs_hook=_object).decode


def parse_json(body: bytes | bytearray, max_depth: int) -> Any:
    """Strict JSON: UTF-8 only, no NaN or Infinity, no lone surrogates, bounded nesting."""
    try:
        text = body.decode("utf-8")
        value = _decode(text)
        if "\\u" in text and _SURROGATE.search(text):
            json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    except UnicodeError:
        raise Problem(
            422, [invalid(["body"], "not valid UTF-8 or has a lone surrogate", "value_error.unicode")]
        ) from None
    except RecursionError:
        raise Problem(422, [invalid(["body"], f"nested deeper than {max_depth} levels", "value_error.depth")]) from None
    except ValueError as exc:
        raise Problem(422, [invalid(["body"], f"invalid JSON: {exc}", "value_error.jsondecode")]) from None
    return value


@dataclasses.dataclass
class NewEvent:
    """A validated event to append, mapped to the stored fields as the original mapped them."""

    kind: str
    event_id: str
    client_event_id: bool  # the client chose event_id: a retry must find the original
    aggregate_type: str
    aggregate_id: str
    fresh: bool  # aggregate_id was made here: it has no history to look up
    event_type: str
    name: str
    timestamp: str | None  # None: the time the writer stores it
    attributes: str  # JSON text
    correlation_id: str | None
    causation_id: str | None
    agent_name: str | None
    user_prompt: str | None
    session_id: str | None
    expected_version: int | None
    content_hash: str | None  # of what the client sent, when it chose event_id
    # The stored row after position, version and timestamp (Row), laid out here, on the
    # event loop, which leaves the writer less to do while it holds the write lock.
    values: tuple = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.values = (
            self.event_id,
            self.aggregate_type,
            self.aggregate_id,
            self.event_type,
            self.name,
            self.attributes,
            self.correlation_id,
            self.causation_id,
            self.agent_name,
            self.user_prompt,
            self.session_id,
            self.content_hash,
        )


def prepare_event(kind: str, body: Any, loc: Sequence, errors: list, fields: dict) -> NewEvent | None:
    """Validate one emitted event and map it to a NewEvent; problems go to `errors`."""
    clean = check_object(body, fields, REQUIRED_FIELDS, loc, errors)
    if errors:
        return None
    aggregate_type, event_type, _label = KINDS[kind]
    attributes = clean.get("attributes", {})
    for key in ATTRIBUTE_FIELDS:  # shown as fields of their own: stored as text
        if "\x00" in (_string_attr(attributes, key) or ""):
            errors.append(invalid([*loc, "attributes", key], NUL_MESSAGE, "value_error.str.regex"))
            return None
    attributes_json = compact_json(attributes)
    given_id = clean.get("aggregate_id")
    content_hash = None
    if "event_id" in clean:
        content = [
            kind,
            clean["name"],
            attributes_json,
            clean.get("timestamp"),
            given_id,
            clean.get("correlation_id"),
            clean.get("causation_id"),
        ]
        content_hash = hashlib.sha256(json.dumps(content).encode()).hexdigest()
    return NewEvent(
        kind=kind,
        event_id=clean.get("event_id") or uuid7(),
        client_event_id="event_id" in clean,
        aggregate_type=aggregate_type,
        aggregate_id=given_id or ("system" if kind == "system" else uuid7()),
        fresh=given_id is None and kind != "system",
        event_type=event_type,
        name=clean["name"],
        timestamp=clean.get("timestamp"),
        attributes=attributes_json,
        correlation_id=clean.get("correlation_id"),
        causation_id=clean.get("causation_id"),
        agent_name=_string_attr(attributes, "agent_name") if kind == "agent" else None,
        user_prompt=_string_attr(attributes, "user_prompt") if kind == "workflow" else None,
        session_id=given_id if kind == "system" else None,
        expected_version=clean.get("expected_version"),
        content_hash=content_hash,
    )


ATTRIBUTE_FIELDS = ("agent_name", "user_prompt")  # attributes an item shows as fields of its own


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


WORKFLOW_SCOPE = (
    "Only the workflow's timeline: its own events (`aggregate_id` = this id) and every event correlated "
    "with it (`correlation_id` = this id), as `/events/workflows/{workflow_id}` lists them."
)


# Query parameters of the list routes: name -> JSON Schema (also the OpenAPI parameters).
def list_params(config: APIServerConfig) -> dict:
    n = config.max_id_length
    params = {
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100, "description": "Events per page."},
        "offset": {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_INT,
            "default": 0,
            "description": "Events to skip. Deep offsets get slow: prefer the `after`/`before` cursor.",
        },
        "order": {
            "type": "string",
            "enum": ["desc", "asc"],
            "default": "desc",
            "description": "By position: `desc` newest first, `asc` oldest first.",
        },
        "after": {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_INT,
            "description": "Cursor: only events with a position above this (use with order=asc).",
        },
        "before": {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_INT,
            "description": "Cursor: only events with a position below this (use with order=desc).",
        },
        "event_type": {
            "type": "string",
            "enum": [event_type for _, event_type, _ in KINDS.values()],
            "description": "Only events of this type.",
        },
        "aggregate_type": {
            "type": "string",
            "enum": list(AGGREGATE_KINDS),
            "description": "Only events of this aggregate type.",
        },
        "aggregate_id": id_field("Only this aggregate's events.", n, pattern=None),
        "correlation_id": id_field("Only events with this correlation id.", n, pattern=None),
        "workflow_id": id_field(WORKFLOW_SCOPE, n, pattern=None),
        "event_name": id_field("Only events with this name, e.g. `agent.started`.", n, pattern=None),
        "since": {
            "type": "string",
            "format": "date-time",
            "description": "Only events whose timestamp is after this instant. " + TIMESTAMP_FORMS,
        },
        "until": {
            "type": "string",
            "format": "date-time",
            "description": "Only events whose timestamp is at or before this instant.",
        },
    }
    params["consumer"] = {
        **CONSUMER_FIELD,
        "description": "Page on from the position this consumer acknowledged (from the beginning if it has none), "
        'oldest first, unless `after` is given: `?consumer=NAME` alone is "what is new since I last looked".',
    }
    return params


STREAM_FILTERS = ("event_type", "aggregate_type", "aggregate_id", "correlation_id", "event_name")
WORKFLOW_STATES = ("running", "completed", "failed")
WORKFLOW_INDEX_PARAMS = {
    "state": {"type": "string", "enum": list(WORKFLOW_STATES), "description": "Only workflows in this state."},
    "since": {
        "type": "string",
        "format": "date-time",
        "description": "Only workflows whose latest event's timestamp is after this instant. " + TIMESTAMP_FORMS,
    },
    "until": {
        "type": "string",
        "format": "date-time",
        "description": "Only workflows whose latest event's timestamp is at or before this instant.",
    },
    "before": {
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_INT,
        "description": "Cursor: only workflows whose latest activity (`last_position`) is below this position; "
        "a page's `next` is the cursor of the page after it.",
    },
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50, "description": "Workflows per page."},
    "offset": {
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_INT,
        "default": 0,
        "description": "Workflows to skip. Prefer the `before` cursor for deep pages.",
    },
}


def stream_params(config: APIServerConfig) -> dict:
    params = {name: spec for name, spec in list_params(config).items() if name in (*STREAM_FILTERS, "workflow_id")}
    params["after"] = {
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_INT,
        "description": "Resume: first send the stored events after this position "
        "(the `Last-Event-ID` header does the same).",
    }
    params["access_token"] = {
        "type": "string",
        "description": "The API key, for browsers' EventSource, which cannot send an Authorization header.",
    }
    params["consumer"] = {
        **CONSUMER_FIELD,
        "description": "Start right after the position this consumer acknowledged (from the beginning if it has "
        "none) when neither `Last-Event-ID` nor `after` is given.",
    }
    return params


CONSUMER_FIELD = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": CONSUMER_NAME}
ACK_FIELDS = {
    "position": {
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_INT,
        "description": "The consumer has handled every event up to this position.",
    }
}


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
            if not re.fullmatch(r"[+-]?[0-9]{1,19}", text):  # ASCII digits: int() takes any script's
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
# 3. Storage
# =============================================================================
# The log behind one interface, EventStore: handlers and the Hub use nothing else. Every
# backend commits a group of appends the same way (ThreadedStore.commit: lock, read, plan,
# insert, count, publish) and owns only its SQL and connections, as pyeventsourcing's
# recorders do; the contract tests (test_server.py, "the store contract") hold both to it.
#   3.1 The interface and planning: what goes in and comes out, and plan_appends, pure.
#   3.2 What both backends share: the SQL of counters, retention and queries; ThreadedStore
#       (the writer thread, the commit, reader threads); copying a log between stores.
#   3.3 SQLite: schema and migrations, connections, SQLiteStore.
#   3.4 PostgreSQL: schema, connections, the listener, PostgresStore.

# -- 3.1 the interface and planning -------------------------------------------------------


class Receipt(NamedTuple):
    """What an append tells about each stored event."""

    event_id: str
    position: int
    version: int
    timestamp: str
    aggregate_id: str


class StoredEvent(NamedTuple):
    """An event read back: the fields streams filter on, and its item as JSON text."""

    position: int
    event_type: str
    aggregate_type: str
    aggregate_id: str
    correlation_id: str | None
    event_name: str
    json: str


class Row(NamedTuple):
    """An event as stored: a row of the table `events`, in the order of its columns here
    (ROW_COLUMNS). Both schemas, the commit, the reads and `copy` use it."""

    position: int
    aggregate_version: int
    timestamp: str
    event_id: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    event_name: str
    attributes: str  # JSON text
    correlation_id: str | None
    causation_id: str | None
    agent_name: str | None
    user_prompt: str | None
    session_id: str | None
    content_hash: str | None  # of what the client sent, when it chose event_id


ROW_COLUMNS = Row._fields


@dataclasses.dataclass(frozen=True)
class Match:
    """Which events: equality filters (STREAM_FILTERS; None means any value), within one
    agent's events or one workflow's timeline (its own events and those correlated with it).
    `nothing`: the request contradicts itself, and no event matches."""

    filters: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    agent: str | None = None
    workflow: str | None = None
    nothing: bool = False


@dataclasses.dataclass
class Query:
    """A page of the log: the events that `match`, in a time window, after or before a
    position cursor, in an order, paged."""

    match: Match = dataclasses.field(default_factory=Match)
    since: str | None = None  # timestamp > since
    until: str | None = None  # timestamp <= until
    after: int | None = None
    before: int | None = None
    order: str = "desc"
    limit: int = 100
    offset: int = 0
    index_hints: bool = False  # the backend takes SQLite's INDEXED BY: the store sets it


class Consumer(NamedTuple):
    """A reader whose place in the log the store keeps: it has handled every event up to
    `position`."""

    name: str
    position: int
    updated_at: str


class Page(NamedTuple):
    positions: list[int]  # the page's events, in its order: events_at() reads them
    total: int  # every event the query matches, cursor and paging aside
    next: int | None  # the cursor for the next page, when this one is full


class Extent(NamedTuple):
    """Where the log begins and ends, and what it takes."""

    last_position: int  # the newest event's (0 for an empty log)
    oldest_position: int | None  # the oldest kept event's (None: no event is kept)
    oldest_timestamp: str | None
    pruned_through: int  # retention has removed every event up to this position
    size_bytes: int | None  # on disk, as the backend counts it
    events: int = 0  # kept: the last position less what retention removed


ModelUsage = list  # [(model, request_model, figures by ROLLUP_FIGURES)]: what a store reads of usage


class AgentSummary(TypedDict):
    """An agent of a workflow, as /events/workflows/{id}/agents lists it."""

    agent_id: str
    agent_name: str | None
    workflow_id: str
    parent_agent_id: str | None
    first_event_time: str
    last_event_time: str
    event_count: int
    call_count: int
    failed_calls: int
    status: str
    state: str
    usage: ModelUsage


class WorkflowSummary(TypedDict):
    workflow_id: str
    status: str | None
    state: str
    start_time: str | None
    end_time: str | None
    last_event_time: str | None
    last_position: int
    duration_seconds: float | None
    event_count: int
    agent_count: int
    failed_agents: int
    name: str | None
    service: str | None
    user_prompt: str | None
    usage: ModelUsage


class WorkflowView(TypedDict):
    """What /events/workflows/{id}/agents answers."""

    workflow: WorkflowSummary
    agents: list[AgentSummary]


@dataclasses.dataclass(frozen=True)
class WorkflowIndex:
    """Which workflows GET /events/workflows asks for: by state and latest activity, paged."""

    state: str | None = None
    since: str | None = None
    until: str | None = None
    before: int | None = None  # cursor: latest activity before this position
    limit: int = 50
    offset: int = 0


class WorkflowPage(NamedTuple):
    total: int  # every workflow the filters match, the cursor and paging aside
    workflows: list[WorkflowSummary]
    next: int | None  # the cursor for the next page, when this one is full


class StoreError(Exception):
    """The store did not do what was asked; the subclass says why."""


class StoreUnavailable(StoreError):
    """The store cannot serve now (locked, read-only, full, unreachable); it may recover."""


class Conflict(StoreError):
    """The append contradicts the log; nothing of it was stored."""


class VersionConflict(Conflict):
    def __init__(self, message: str, current_version: int) -> None:
        super().__init__(message)
        self.current_version = current_version


Outcome = Union[list[Receipt], StoreError]  # of one append request in a commit: its receipts, or why it failed


class EventStore(abc.ABC):
    """The event log in domain terms. A backend implements these; the handlers and the Hub
    use nothing else. Methods are called on the event loop and never block it."""

    location = ""  # where the log is, for /health/database (never a password)
    backend = ""  # its kind: sqlite, postgresql
    timeout = 10.0  # seconds a request may wait for the store, from its arrival (--database-timeout)
    stats: StoreStats  # what it has done, for /metrics

    @abc.abstractmethod
    def prepare(self) -> None:
        """Create or migrate the log now, blocking: the command checks this before it serves."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Open (creating or migrating the log if needed) and start serving."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Finish what was acknowledged as accepted, then release everything."""

    @abc.abstractmethod
    async def append(self, events: list[NewEvent]) -> list[Receipt]:
        """Store the NewEvents atomically, in order; return a Receipt for each once they are
        committed. Raises Conflict (nothing stored) or StoreUnavailable."""

    @abc.abstractmethod
    async def check_writable(self) -> None:
        """Raise StoreUnavailable unless the store can commit a write now (it commits one)."""

    def write_problem(self) -> str | None:
        """Why the last append of events failed, until one succeeds again (None: it did not)."""
        return None

    @abc.abstractmethod
    async def query(self, query: Query) -> Page:
        """A page of events (their positions) and the exact total."""

    @abc.abstractmethod
    async def events_at(self, positions: list[int]) -> list[StoredEvent]:
        """The stored events at these positions, in the same order."""

    @abc.abstractmethod
    async def events_after(self, position: int, match: Match, limit: int) -> list[StoredEvent]:
        """Up to `limit` StoredEvents after `position` that `match`, oldest first."""

    @abc.abstractmethod
    async def rows_after(self, position: int, limit: int) -> list[Row]:
        """Up to `limit` stored Rows after `position`, oldest first: the log as it is stored."""

    @abc.abstractmethod
    async def last_position(self) -> int:
        """The position of the newest committed event (0 for an empty log)."""

    @abc.abstractmethod
    async def extent(self) -> Extent:
        """Where the log begins and ends, and its size."""

    @abc.abstractmethod
    async def prune(self, before: str) -> int:
        """Remove the oldest events, in position order, up to the first whose timestamp is not
        before `before` (an ISO timestamp), in short transactions; how many it removed."""

    @abc.abstractmethod
    async def workflow_summary(self, workflow_id: str) -> WorkflowView | None:
        """The workflow's state and figures, and its agents in order of their first correlated
        event (see workflow_summary in 3.2); None where it has no events."""

    @abc.abstractmethod
    async def workflows(self, index: WorkflowIndex) -> WorkflowPage:
        """A page of the workflows, most recent activity first (see workflow_index in 3.2)."""

    @abc.abstractmethod
    async def ack(self, name: str, position: int) -> tuple[Consumer, bool]:
        """Record that the consumer `name` (created on first use) has handled every event up to
        `position`; positions only move forward. The consumer as it is now, and whether it moved.
        Conflict when `position` is past the log's last position."""

    @abc.abstractmethod
    async def consumer(self, name: str) -> Consumer | None:
        """The consumer of this name, or None."""

    @abc.abstractmethod
    async def consumers(self) -> list[Consumer]:
        """Every consumer, by name."""

    @abc.abstractmethod
    async def delete_consumer(self, name: str) -> bool:
        """Remove the consumer; whether there was one."""

    @abc.abstractmethod
    async def wait_for_commit(self, timeout: float) -> None:
        """Return soon after a commit to the log, by any process, or after `timeout` seconds;
        it may also return early. Readers then read by position: nothing is missed."""

    @abc.abstractmethod
    def backup(self, dest: str) -> int:
        """Write a consistent copy of the log to `dest`; the events it holds (blocking)."""


class Chore(NamedTuple):
    """Work for the writer thread besides appends (a consumer's position): fn(conn), alone, in a
    transaction that holds the write lock, so that it is ordered with the commits."""

    fn: Callable[[Any], Any]
    future: asyncio.Future


class LostBeforeWriting(Exception):
    """The writer's connection was found lost at the start of a transaction, before anything
    of it was sent (a backend raises it from write_lock): trying again cannot store twice."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class LogState(NamedTuple):
    """What a commit reads under the write lock before it plans."""

    position: int  # where the log ends
    counted_through: int  # the counters count the events up to here (COUNTED_THROUGH)
    versions: dict[tuple[str, str], int]  # (aggregate_type, aggregate_id) -> current version
    pruned_through: int = 0  # retention has removed the events up to here (PRUNED_THROUGH)


def plan_appends(
    requests: Sequence[list[NewEvent]],
    position: int,
    versions: dict[tuple[str, str], int],
    stored: dict[str, tuple[str | None, Receipt]],
    now: str,
) -> tuple[list[Outcome], list[Row]]:
    """Decide each request's outcome, given the log's last position, the current version of
    every aggregate the requests name ({(aggregate_type, aggregate_id): version}, missing
    means 0) and the receipts of their client-chosen event_ids already stored ({event_id:
    (content_hash, Receipt)}). Returns (outcomes, rows): for each request its Receipts or
    the Conflict that rejects it whole, and the Rows to insert, in order."""
    versions, stored = dict(versions), dict(stored)
    outcomes: list[Outcome] = []
    rows: list[Row] = []
    for events in requests:
        staged_versions: dict = {}
        staged_ids: dict = {}
        staged_rows: list = []
        receipts: list = []
        try:
            for event in events:
                if event.client_event_id:
                    earlier = staged_ids.get(event.event_id) or stored.get(event.event_id)
                    if earlier:
                        if earlier[0] != event.content_hash:
                            raise Conflict(
                                f"event_id {event.event_id} was already used for an event with other content"
                            )
                        receipts.append(earlier[1])
                        continue
                key = (event.aggregate_type, event.aggregate_id)
                current = staged_versions.get(key, versions.get(key, 0))
                if event.expected_version is not None and event.expected_version != current:
                    raise VersionConflict(
                        f"{key[0]} {key[1]!r} is at version {current}, not the expected {event.expected_version}",
                        current,
                    )
                version = staged_versions[key] = current + 1
                receipt = Receipt(
                    event.event_id,
                    position + len(rows) + len(staged_rows) + 1,
                    version,
                    event.timestamp or now,
                    event.aggregate_id,
                )
                staged_rows.append(Row(receipt.position, version, receipt.timestamp, *event.values))
                if event.client_event_id:
                    staged_ids[event.event_id] = (event.content_hash, receipt)
                receipts.append(receipt)
        except Conflict as conflict:
            outcomes.append(conflict)
            continue
        versions.update(staged_versions)
        stored.update(staged_ids)
        rows.extend(staged_rows)
        outcomes.append(receipts)
    return outcomes, rows


def commit_apart(
    commit: Callable[[list[list[NewEvent]]], list[Outcome]],
    requests: list[list[NewEvent]],
    broken: type[Exception],
    fault: type[Exception] | tuple[type[Exception], ...],
    describe: Callable[[Any], StoreUnavailable],
) -> list[Outcome]:
    """commit(requests), one transaction, with what every backend does when it fails: a broken
    constraint (`broken`: nothing was stored) sends the requests again one by one, so that the
    one that broke it fails alone; a fault of the store (`fault`) fails them all with its reason."""
    try:
        return commit(requests)
    except broken:
        if len(requests) > 1:
            return [
                outcome for events in requests for outcome in commit_apart(commit, [events], broken, fault, describe)
            ]
        return [Conflict("event conflicts with a stored event")]
    except fault as exc:
        error = describe(exc)
        logger.warning("write failed: %s", error)
        return [error] * len(requests)


def lookups(requests: Sequence[list[NewEvent]]) -> tuple[list[tuple[str, str]], list[str]]:
    """What planning needs from the log: the aggregates whose versions matter, and the
    client-chosen event_ids to look for."""
    keys = {(e.aggregate_type, e.aggregate_id) for events in requests for e in events if not e.fresh}
    return sorted(keys), [e.event_id for events in requests for e in events if e.client_event_id]


# -- 3.2 what both backends share ---------------------------------------------------------
# The SQL here is what SQLite and PostgreSQL both understand, with `?` placeholders
# (PgConnection turns them into psycopg's). The queries run on reader threads as
# fn(conn, ...); the writes take the backend's insert (ThreadedStore.insert).

# Parameters per statement: SQLite's limit since 3.32, and before it.
MAX_PARAMS = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


EVENTS_TABLE = f"events ({', '.join(ROW_COLUMNS)})"
READ_COLUMNS = ", ".join(ROW_COLUMNS)
COUNTS_UPSERT = " ON CONFLICT (field, value, aggregate_type) DO UPDATE SET n = counts.n + excluded.n"


# The counters and the workflow membership are written by the writers, in the transaction
# that appends the events: counted in Python per group, each key once, which costs far less
# than a trigger's upsert per row. A row of `counts` holds the position up to which they
# count, so that events stored by anything else (a script) are counted by the next commit.
COUNTED_THROUGH = "field = 'log' AND value = 'counted_through' AND aggregate_type = ''"
# Retention removes the oldest events (prune_batch); a row of `counts` holds the position up
# to which it has, and `pruned` each aggregate's highest removed version: so that positions
# and versions are never used again, and an aggregate's count stays exact.
PRUNED_THROUGH = "field = 'log' AND value = 'pruned_through' AND aggregate_type = ''"
LAST_POSITION = f"coalesce((SELECT max(position) FROM events), (SELECT n FROM counts WHERE {PRUNED_THROUGH}), 0)"
PRUNED_VERSION = "(SELECT version FROM pruned p WHERE p.aggregate_type = {t} AND p.aggregate_id = {id})"
CURRENT_VERSION = (
    "coalesce((SELECT max(aggregate_version) FROM events WHERE aggregate_type = {t} AND aggregate_id = {id}), "
    + PRUNED_VERSION
    + ", 0)"
)
Inserter = Callable[[Any, str, list, str], None]  # a backend's insert(conn, table, rows, tail)
Write = tuple  # (table, rows, tail): what a backend's insert takes after its connection

# Time buckets: the events of each minute and of each hour, by aggregate_type and event_name,
# so that a time window's exact total is the sum of the whole buckets it covers and exact
# counts of its two edge minutes (count_window), whatever its size. A bucket's `start` is the
# prefix of the stored timestamps it holds (`2026-12-03T21:28`, `2026-12-03T21`: stored
# timestamps have one fixed width, format_timestamp); an event counts in the buckets of its
# own timestamp, however late it comes. Kept with the counters, by the writers and retention.
# A bucket also holds the least and the greatest position of its events (or bounds of them,
# once retention has removed some), so that a page of a window is looked for only there.
BUCKET_WIDTHS = {60: 16, 3600: 13}  # seconds: the length of the prefix
BUCKETS_TABLE = """
CREATE TABLE IF NOT EXISTS buckets (
    width BIGINT NOT NULL, start TEXT NOT NULL, aggregate_type TEXT NOT NULL, event_name TEXT NOT NULL,
    n BIGINT NOT NULL, first_position BIGINT NOT NULL, last_position BIGINT NOT NULL,
    PRIMARY KEY (width, start, aggregate_type, event_name)
);
CREATE INDEX IF NOT EXISTS buckets_name ON buckets (event_name, width, start);
"""
BUCKETS_UPSERT = (
    " ON CONFLICT (width, start, aggregate_type, event_name) DO UPDATE SET n = buckets.n + excluded.n, "
    "first_position = CASE WHEN excluded.first_position < buckets.first_position "
    "THEN excluded.first_position ELSE buckets.first_position END, "
    "last_position = CASE WHEN excluded.last_position > buckets.last_position "
    "THEN excluded.last_position ELSE buckets.last_position END"
)
# The buckets of the events the counters count, for a log made before them.
FILL_BUCKETS = "".join(
    f"INSERT INTO buckets SELECT {width}, substr(timestamp, 1, {length}), aggregate_type, event_name, count(*), "
    "min(position), max(position) "
    f"FROM events WHERE position <= coalesce((SELECT n FROM counts WHERE {COUNTED_THROUGH}), 0) GROUP BY 2, 3, 4;\n"
    for width, length in BUCKET_WIDTHS.items()
)


def summaries(
    conn: Any, rows: Sequence[Row], through: int, counted_through: int, seen: SeenVersions | None = None
) -> tuple[list[Write], list[Call]]:
    """What the writer adds to the summaries for new events, which take the counters from
    position `counted_through` to `through`: the writes (for the backend's insert) and the
    calls the events report. It reads what it needs first (roll_up), so that the writes can
    go in one pipeline."""
    counts: collections.Counter = collections.Counter({("log", "counted_through", ""): through - counted_through})
    buckets: dict[tuple, list] = {}  # key -> [n, first position, last position]
    for row in rows:
        aggregate_type, name, moment = row.aggregate_type, row.event_name, row.timestamp
        counts["aggregate_type", aggregate_type, aggregate_type] += 1
        counts["event_name", name, aggregate_type] += 1
        if row.correlation_id is not None:
            counts["correlation_id", row.correlation_id, aggregate_type] += 1
        for width, length in BUCKET_WIDTHS.items():
            bucket = buckets.setdefault((width, moment[:length], aggregate_type, name), [0, row.position, 0])
            bucket[0] += 1
            bucket[2] = row.position
    writes, calls = roll_up(conn, rows, seen=seen)
    return [
        ("counts", [(*key, n) for key, n in counts.items()], COUNTS_UPSERT),
        ("buckets", [(*key, *figures) for key, figures in buckets.items()], BUCKETS_UPSERT),
        *writes,
    ], calls


def count_stored(insert: Inserter, conn: Any, counted_through: int, position: int) -> None:
    """Count the events after `counted_through` up to `position` that no writer of ours counted."""
    while counted_through < position:
        rows = [
            Row(*values)
            for values in conn.execute(
                f"SELECT {READ_COLUMNS} FROM events WHERE position > ? AND position <= ? ORDER BY position LIMIT 10000",
                (counted_through, position),
            ).fetchall()
        ]
        through = rows[-1].position if rows else position
        for write in summaries(conn, rows, through, counted_through)[0]:
            insert(conn, *write)
        counted_through = through


def select_in(conn: Any, sql: str, values: Sequence, chunk: int = 500) -> list:
    """The rows of `sql`, whose `{}` is filled with placeholders for a part of `values`, for
    all the parts; none without values."""
    rows: list = []
    for start in range(0, len(values), chunk):
        part = list(values[start : start + chunk])
        rows += conn.execute(sql.format(", ".join("?" * len(part))), part).fetchall()
    return rows


# -- runs at a glance: workflows, their agents' states, usage -----------------------------
# The writers keep, in the transaction that appends the events (roll_up): a row for each
# workflow in `workflows` (its times, its event count, its own latest event and lifecycle
# event, its agents by state, its state, name, service and first user prompt), each member
# agent's state in `workflow_agents`, and in `rollups` what the events of each of its
# aggregates report (USAGE_RULES), by model. Retention takes the events it removes out of
# them (unroll); prices apply when read, so that a new price list needs no rewrite.

USAGE_KINDS = (
    "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
    "reasoning_output_tokens",
)  # fmt: skip
# The attributes each figure is read from, the first given wins: the GenAI conventions' names,
# then names that older instrumentations send.
USAGE_NAMES = (
    ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"),
    ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"),
    ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens"),
    ("gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.cache_creation_input_tokens"),
    ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens"),
)
CONTAINER_OPERATIONS = ("invoke_agent", "invoke_workflow", "create_agent")
MODEL_OPERATIONS = ("chat", "text_completion", "generate_content", "embeddings")
TOOL_OPERATIONS = ("execute_tool",)
START_WORDS = ("started", "start", "begin", "began")
USAGE_RULES = (
    "Usage comes from the event's attributes, named as the OpenTelemetry GenAI conventions name them "
    "(`gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`, `gen_ai.usage.cache_read.input_tokens`, "
    "`gen_ai.usage.cache_creation.input_tokens`, `gen_ai.usage.reasoning.output_tokens`; the older "
    "`gen_ai.usage.prompt_tokens` and `gen_ai.usage.completion_tokens` too), on OTLP spans and emitted events "
    "alike. An event whose `gen_ai.operation.name` is `execute_tool` is a tool call; one whose operation is "
    "`chat`, `text_completion`, `generate_content` or `embeddings`, or that reports tokens under another "
    "operation or none, is a model call. Its tokens and the call are counted once, on the event that ends it: "
    "an emitted event whose name ends in `started`, `start`, `begin` or `began` counts nothing. Containers "
    "(`invoke_agent`, `invoke_workflow`, `create_agent`) repeat their children's usage and count nothing. "
    "Failed events are those whose name's last word is a failure (STATE_RULES). The model is "
    "`gen_ai.response.model`, else `gen_ai.request.model`. An agent's usage is that of its own events and of "
    "the calls that belong to it; a workflow's, that of all its events."
)


class Call(NamedTuple):
    """What an event reports of a model or tool call (USAGE_RULES)."""

    model: str  # gen_ai.response.model, "" where not given
    request_model: str  # gen_ai.request.model
    tokens: tuple  # by USAGE_KINDS
    model_call: bool
    tool_call: bool


class Facts(NamedTuple):
    """What the rollups take from an event's attributes."""

    call: Call | None
    name: str | None  # the workflow's name, on its own events
    service: str | None


NO_FACTS = Facts(None, None, None)


def usage_count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.isdigit() and len(value) < 19:
        value = int(value)
    return value if isinstance(value, int) and 0 <= value <= MAX_INT else None


def plain_text(value: Any, limit: int = 200) -> str | None:
    return value[:limit] if isinstance(value, str) and value and "\x00" not in value else None


def event_facts(name: str, attributes: str) -> Facts:
    """The call, workflow name and service an event's attributes report (USAGE_RULES)."""
    if "gen_ai." not in attributes and ".name" not in attributes:  # service.name, workflow.name, otel.span.name
        return NO_FACTS
    try:
        values = json.loads(attributes)
    except ValueError:  # attributes stored by another program
        return NO_FACTS
    if not isinstance(values, dict):
        return NO_FACTS
    workflow_name = next(
        filter(
            None, (plain_text(values.get(key)) for key in ("workflow.name", "gen_ai.workflow.name", "otel.span.name"))
        ),
        None,
    )
    facts = Facts(None, workflow_name, plain_text(values.get("service.name")))
    operation = values.get("gen_ai.operation.name")
    if operation in CONTAINER_OPERATIONS:
        return facts
    if "otel.span_id" not in values and _LAST_WORD.split(name.lower())[-1] in START_WORDS:
        return facts
    tokens = tuple(
        next((n for n in (usage_count(values.get(key)) for key in keys) if n is not None), 0) for keys in USAGE_NAMES
    )
    tool_call = operation in TOOL_OPERATIONS
    model_call = not tool_call and (operation in MODEL_OPERATIONS or any(tokens))
    if not (tool_call or model_call):
        return facts
    model = plain_text(values.get("gen_ai.response.model")) or ""
    call = Call(model, plain_text(values.get("gen_ai.request.model")) or "", tokens, model_call, tool_call)
    return facts._replace(call=call)


@functools.lru_cache(maxsize=4096)
def lifecycle_state(kind: str, name: str) -> str | None:
    """The state an event of an agent (`kind` "agent") or a workflow ("workflow") gives it:
    None unless the name's first word is the kind (a lifecycle event), else by STATE_RULES."""
    return event_state(name) if _LAST_WORD.split(name.lower(), 1)[0] == kind else None


@dataclasses.dataclass
class WorkflowRow:
    """A row of the table `workflows`, as roll_up keeps it and the reads show it."""

    workflow_id: str
    start_time: str | None = None  # its timeline's earliest timestamp
    last_time: str | None = None  # and latest
    last_position: int = 0  # its latest event's: its latest activity
    event_count: int = 0
    status: str | None = None  # its own latest event's name
    lifecycle: str | None = None  # its own latest lifecycle event's name
    agents_running: int = 0  # its member agents by state
    agents_completed: int = 0
    agents_failed: int = 0
    state: str = "running"  # workflow_state(): kept, for the index's filter
    name: str | None = None
    service: str | None = None
    user_prompt: str | None = None

    def values(self) -> tuple:
        return tuple(vars(self).values())


WORKFLOW_COLUMNS = tuple(field.name for field in dataclasses.fields(WorkflowRow))
WORKFLOWS = f"SELECT {', '.join(WORKFLOW_COLUMNS)} FROM workflows"
WORKFLOW_UPSERT = " ON CONFLICT (workflow_id) DO UPDATE SET " + ", ".join(
    f"{column} = excluded.{column}" for column in WORKFLOW_COLUMNS[1:]
)
MEMBER_UPSERT = " ON CONFLICT (workflow_id, agent_id) DO UPDATE SET state = excluded.state"
ROLLUP_KEY = ("workflow_id", "aggregate_type", "aggregate_id", "model", "request_model")
ROLLUP_FIGURES = (*USAGE_KINDS, "model_calls", "tool_calls", "failed_events")
ROLLUP_UPSERT = f" ON CONFLICT ({', '.join(ROLLUP_KEY)}) DO UPDATE SET " + ", ".join(
    f"{figure} = rollups.{figure} + excluded.{figure}" for figure in ROLLUP_FIGURES
)
# Both backends' tables for them (SQLite's INTEGER holds 64 bits, as PostgreSQL's bigint).
ROLLUP_TABLES = f"""
CREATE TABLE IF NOT EXISTS workflow_agents (
    workflow_id TEXT NOT NULL, agent_id TEXT NOT NULL, first_position BIGINT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (workflow_id, agent_id)
);
CREATE INDEX IF NOT EXISTS workflow_agents_agent ON workflow_agents (agent_id);
CREATE TABLE IF NOT EXISTS workflows (
    workflow_id TEXT PRIMARY KEY, start_time TEXT, last_time TEXT, last_position BIGINT NOT NULL,
    event_count BIGINT NOT NULL, status TEXT, lifecycle TEXT, agents_running BIGINT NOT NULL,
    agents_completed BIGINT NOT NULL, agents_failed BIGINT NOT NULL, state TEXT NOT NULL, name TEXT,
    service TEXT, user_prompt TEXT
);
CREATE INDEX IF NOT EXISTS workflows_recent ON workflows (last_position);
CREATE INDEX IF NOT EXISTS workflows_state ON workflows (state, last_position);
CREATE INDEX IF NOT EXISTS workflows_time ON workflows (last_time);
CREATE TABLE IF NOT EXISTS rollups (
    {", ".join(f"{column} TEXT NOT NULL" for column in ROLLUP_KEY)},
    {", ".join(f"{figure} BIGINT NOT NULL" for figure in ROLLUP_FIGURES)},
    PRIMARY KEY ({", ".join(ROLLUP_KEY)})
);
"""


def workflow_state(row: WorkflowRow) -> str:
    """A workflow's state: by its own latest lifecycle event; without one, running while an
    agent runs or while it has none, else failed if an agent failed, else completed."""
    if row.lifecycle is not None:
        return event_state(row.lifecycle)
    if row.agents_running or not (row.agents_completed or row.agents_failed):
        return "running"
    return "failed" if row.agents_failed else "completed"


def roll_up(conn: Any, rows: Sequence[Row], seen: SeenVersions | None = None) -> tuple[list[Write], list[Call]]:
    """The writes that bring `workflows`, `workflow_agents` and `rollups` up to date with new
    events (`rows`, in position order), and the calls they report. Reads the rows it changes
    first, but those `seen` holds, and leaves them there as they will be once the writes are
    committed."""
    facts = [event_facts(row.event_name, row.attributes) for row in rows]
    scopes = [workflows_of(row) for row in rows]
    members: dict[str, dict[str, str]] = seen.members if seen else {}  # agent -> {workflow: its state there}
    found: dict[str, WorkflowRow] = seen.workflows if seen else {}
    mine = {row.aggregate_id for row in rows if row.aggregate_type == "agent_aggregate"}
    agents = sorted(mine - members.keys())
    members.update({agent_id: {} for agent_id in agents})
    for workflow_id, agent_id, state in select_in(
        conn, "SELECT workflow_id, agent_id, state FROM workflow_agents WHERE agent_id IN ({})", agents
    ):
        members[agent_id][workflow_id] = state
    touched = {w for scope in scopes for w in scope}
    touched |= {w for agent_id in mine for w in members[agent_id]}
    for values in select_in(
        conn,
        WORKFLOWS + " WHERE workflow_id IN ({})",
        sorted(touched - found.keys()),
    ):
        found[values[0]] = WorkflowRow(*values)
    changed: dict[str, WorkflowRow] = {}  # the rows this group changes
    states = {agent_id: next(iter(members[agent_id].values()), None) for agent_id in mine}
    joined: dict[tuple, list] = {}  # (workflow, agent) -> [first_position, state]: new or changed members
    usage: dict[tuple, list] = {}
    calls = []

    def workflow(workflow_id: str) -> WorkflowRow:
        if workflow_id not in found:
            found[workflow_id] = WorkflowRow(workflow_id)
        changed[workflow_id] = found[workflow_id]
        return found[workflow_id]

    def shift(workflow_id: str, old: str | None, new: str) -> None:
        w = workflow(workflow_id)
        if old is not None:
            setattr(w, f"agents_{old}", getattr(w, f"agents_{old}") - 1)
        setattr(w, f"agents_{new}", getattr(w, f"agents_{new}") + 1)

    for row, fact, scope in zip(rows, facts, scopes):
        failed = event_state(row.event_name) == "failed"
        if row.aggregate_type == "agent_aggregate":
            agent_id, theirs = row.aggregate_id, members[row.aggregate_id]
            state = lifecycle_state("agent", row.event_name)
            if state is not None and state != states[agent_id]:
                states[agent_id] = state
                for workflow_id, old in theirs.items():
                    shift(workflow_id, old, state)
                    theirs[workflow_id] = state
                    joined.setdefault((workflow_id, agent_id), [row.position, state])[1] = state
            correlated = row.correlation_id
            if correlated is not None and correlated in scope and correlated not in theirs:
                state = theirs[correlated] = states[agent_id] = states[agent_id] or "running"
                shift(correlated, None, state)
                joined[correlated, agent_id] = [row.position, state]
        for workflow_id in scope:
            w = workflow(workflow_id)
            w.start_time = row.timestamp if w.start_time is None else min(w.start_time, row.timestamp)
            w.last_time = row.timestamp if w.last_time is None else max(w.last_time, row.timestamp)
            w.last_position, w.event_count = row.position, w.event_count + 1
            if row.aggregate_type == "workflow_aggregate" and row.aggregate_id == workflow_id:
                w.status = row.event_name
                if lifecycle_state("workflow", row.event_name) is not None:
                    w.lifecycle = row.event_name
                w.name = w.name or fact.name
            w.service = w.service or fact.service
            w.user_prompt = w.user_prompt or (row.user_prompt[:1000] if row.user_prompt else None)
            tally(usage, (workflow_id, row.aggregate_type, row.aggregate_id), fact.call, failed)
        if fact.call is not None:
            calls.append(fact.call)
    for w in changed.values():
        w.state = workflow_state(w)
    writes: list[Write] = [("workflows", [w.values() for w in changed.values()], WORKFLOW_UPSERT)]
    writes.append(("workflow_agents", [(*key, *value) for key, value in joined.items()], MEMBER_UPSERT))
    writes.append(("rollups", [(*key, *figures) for key, figures in usage.items()], ROLLUP_UPSERT))
    return [write for write in writes if write[1]], calls


def workflows_of(row: Row) -> tuple:
    """The workflows an event is of: the one it is an event of, and the one it is correlated with."""
    own = row.aggregate_id if row.aggregate_type == "workflow_aggregate" else None
    correlated = row.correlation_id
    if correlated is None or correlated == own:
        return () if own is None else (own,)
    return (correlated,) if own is None else (own, correlated)


def tally(usage: dict, key: tuple, call: Call | None, failed: bool, sign: int = 1) -> None:
    """Add (or, with sign -1, take away) what an event reports to usage[key + its models]
    (ROLLUP_FIGURES)."""
    if call is None and not failed:
        return
    figures = usage.setdefault((*key, *((call.model, call.request_model) if call else ("", ""))), [0] * 8)
    if call is not None:
        for i, n in enumerate(call.tokens):
            figures[i] += sign * n
        figures[5] += sign * call.model_call
        figures[6] += sign * call.tool_call
    figures[7] += sign * failed


WORKFLOW_TIMELINE = (
    "SELECT min(timestamp), max(timestamp), count(*) FROM events "
    "WHERE (aggregate_type = 'workflow_aggregate' AND aggregate_id = ?) OR correlation_id = ?"
)
NO_USAGE_LEFT = " AND ".join(f"{figure} = 0" for figure in ROLLUP_FIGURES)


def latest_lifecycle(conn: Any, kind: str, aggregate_id: str) -> tuple[str | None, str | None]:
    """(the latest event's name, the latest lifecycle event's name) of the kind's aggregate."""
    events = "FROM events WHERE aggregate_type = ? AND aggregate_id = ?"
    key = (f"{kind}_aggregate", aggregate_id)
    latest = conn.execute(f"SELECT event_name {events} ORDER BY position DESC LIMIT 1", key).fetchone()
    for (name,) in conn.execute(  # the names that may be lifecycle events: they begin with the kind
        f"SELECT event_name {events} AND lower(event_name) LIKE ? ORDER BY position DESC", (*key, kind + "%")
    ):
        if lifecycle_state(kind, name) is not None:
            return latest[0], name
    return latest and latest[0], None


def unroll(insert: Inserter, conn: Any, removed: list[Row]) -> None:
    """Take events that retention has just deleted (in its transaction) out of the workflows:
    their usage is subtracted; what is not a sum (a workflow's times and count, its own latest
    and lifecycle events, its agents' memberships and states) is read again from the events
    that remain, for the workflows and agents they were of. A workflow with no events left is
    forgotten. Its name, service and prompt stay as they were."""
    usage: dict = {}
    touched: set = set()  # workflows
    own: set = set()  # workflows that lost events of their own
    pairs: set = set()  # (workflow, agent) that lost correlated events
    ended: set = set()  # agents that lost lifecycle events
    for row in removed:
        scope = workflows_of(row)
        touched.update(scope)
        call, failed = event_facts(row.event_name, row.attributes).call, event_state(row.event_name) == "failed"
        for workflow_id in scope:
            tally(usage, (workflow_id, row.aggregate_type, row.aggregate_id), call, failed, -1)
        if row.aggregate_type == "workflow_aggregate":
            own.add(row.aggregate_id)
        elif row.aggregate_type == "agent_aggregate":
            if row.correlation_id is not None:
                pairs.add((row.correlation_id, row.aggregate_id))
            if lifecycle_state("agent", row.event_name) is not None:
                ended.add(row.aggregate_id)
    insert(conn, "rollups", [(*key, *figures) for key, figures in usage.items()], ROLLUP_UPSERT)
    for workflow_id in sorted(touched):
        conn.execute(f"DELETE FROM rollups WHERE workflow_id = ? AND {NO_USAGE_LEFT}", (workflow_id,))
    for workflow_id, agent_id in sorted(pairs):  # an agent stays a member while it has a correlated event
        first = conn.execute(
            "SELECT min(position) FROM events WHERE aggregate_type = 'agent_aggregate' "
            "AND aggregate_id = ? AND correlation_id = ?",
            (agent_id, workflow_id),
        ).fetchone()[0]
        if first is None:
            conn.execute("DELETE FROM workflow_agents WHERE workflow_id = ? AND agent_id = ?", (workflow_id, agent_id))
        else:
            conn.execute(
                "UPDATE workflow_agents SET first_position = ? WHERE workflow_id = ? AND agent_id = ?",
                (first, workflow_id, agent_id),
            )
    for agent_id in sorted(ended):  # its latest lifecycle event may be gone
        state = event_state(latest_lifecycle(conn, "agent", agent_id)[1] or "running")
        conn.execute("UPDATE workflow_agents SET state = ? WHERE agent_id = ?", (state, agent_id))
    member = "SELECT DISTINCT workflow_id FROM workflow_agents WHERE agent_id IN ({})"
    touched |= {workflow_id for (workflow_id,) in select_in(conn, member, sorted(ended))}
    for workflow_id in sorted(touched):
        found = conn.execute(WORKFLOWS + " WHERE workflow_id = ?", (workflow_id,)).fetchone()
        if found is None:
            continue
        w = WorkflowRow(*found)
        w.start_time, w.last_time, w.event_count = conn.execute(
            WORKFLOW_TIMELINE, (workflow_id, workflow_id)
        ).fetchone()
        if not w.event_count:
            for table in ("workflows", "workflow_agents", "rollups"):
                conn.execute(f"DELETE FROM {table} WHERE workflow_id = ?", (workflow_id,))
            continue
        if workflow_id in own:
            w.status, w.lifecycle = latest_lifecycle(conn, "workflow", workflow_id)
        by_state = dict(
            conn.execute(
                "SELECT state, count(*) FROM workflow_agents WHERE workflow_id = ? GROUP BY state", (workflow_id,)
            ).fetchall()
        )
        w.agents_running, w.agents_completed, w.agents_failed = (by_state.get(s, 0) for s in WORKFLOW_STATES)
        w.state = workflow_state(w)
        insert(conn, "workflows", [w.values()], WORKFLOW_UPSERT)


PRUNE_BATCH = 200  # events a transaction when pruning: each holds the write lock a few milliseconds
PRUNE_SHARE = 0.25  # of the time the pruner may hold the write lock: it pauses 3 times as long as it held it
IN_RANGE = "position > ? AND position <= ?"


def prune_batch(insert: Inserter, conn: Any, before: str) -> tuple[int, bool]:
    """In the caller's transaction (which holds the write lock), remove up to PRUNE_BATCH of
    the oldest events, in position order up to the first one whose timestamp is not before
    `before`, and only events the counters count. Returns (events removed, whether more may
    follow). The counters, the pruned versions, PRUNED_THROUGH and the workflows (unroll) are
    kept exact in the same transaction."""
    done, counted_through = conn.execute(
        f"SELECT coalesce((SELECT n FROM counts WHERE {PRUNED_THROUGH}), 0), "
        f"coalesce((SELECT n FROM counts WHERE {COUNTED_THROUGH}), 0)"
    ).fetchone()
    rows = [
        Row(*values)
        for values in conn.execute(
            f"SELECT {READ_COLUMNS} FROM events WHERE {IN_RANGE} ORDER BY position LIMIT ?",
            (done, counted_through, PRUNE_BATCH),
        )
    ]
    # An event stops the prefix when it is not old enough; one whose timestamp is ahead of the
    # clock (a client's skew, a local time read as UTC) says nothing of its age, and does not.
    now = utc_now()
    old = next((i for i, row in enumerate(rows) if before <= row.timestamp <= now), len(rows))
    if old == 0:
        return 0, False
    through = rows[old - 1].position
    span = (done, through)
    for field in ("aggregate_type", "event_name", "correlation_id"):
        conn.execute(
            f"INSERT INTO counts SELECT '{field}', {field}, aggregate_type, -count(*) FROM events "
            f"WHERE {IN_RANGE} AND {field} IS NOT NULL GROUP BY {field}, aggregate_type" + COUNTS_UPSERT,
            span,
        )
        conn.execute(
            f"DELETE FROM counts WHERE field = '{field}' AND n = 0 "
            f"AND value IN (SELECT {field} FROM events WHERE {IN_RANGE})",
            span,
        )
    for width, length in BUCKET_WIDTHS.items():
        conn.execute(
            f"INSERT INTO buckets SELECT {width}, substr(timestamp, 1, {length}), aggregate_type, event_name, "
            f"-count(*), {MAX_INT}, 0 FROM events WHERE {IN_RANGE} GROUP BY 2, 3, 4" + BUCKETS_UPSERT,
            span,
        )
        conn.execute(
            f"DELETE FROM buckets WHERE width = {width} AND n = 0 "
            f"AND start IN (SELECT substr(timestamp, 1, {length}) FROM events WHERE {IN_RANGE})",
            span,
        )
    conn.execute(
        "INSERT INTO pruned SELECT aggregate_type, aggregate_id, max(aggregate_version) FROM events "
        f"WHERE {IN_RANGE} GROUP BY aggregate_type, aggregate_id "
        "ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = excluded.version",
        span,
    )
    conn.execute(f"DELETE FROM events WHERE {IN_RANGE}", span)
    unroll(insert, conn, rows[:old])
    insert(conn, "counts", [("log", "pruned_through", "", through - done)], COUNTS_UPSERT)
    return old, old == len(rows) == PRUNE_BATCH


def read_receipts(conn: Any, event_ids: list) -> dict:
    """{event_id: (content_hash, Receipt)} for those of `event_ids` already stored."""
    found = {}
    for start in range(0, len(event_ids), MAX_PARAMS):
        chunk = event_ids[start : start + MAX_PARAMS]
        for row in conn.execute(
            "SELECT content_hash, event_id, position, aggregate_version, timestamp, aggregate_id "
            f"FROM events WHERE event_id IN ({', '.join('?' * len(chunk))})",
            chunk,
        ):
            found[row[1]] = (row[0], Receipt(*row[1:]))
    return found


class SeenVersions:
    """The versions a writer has read and written, and the rows of `workflows` and the
    memberships of `workflow_agents` its roll_up has read and written. They stay true while
    no other process writes, that is while the log still ends where this writer left it and
    retention has removed no more, which it checks under the write lock: then it reads only
    what it has not seen."""

    def __init__(self, read_state: Callable[[Any, list], LogState], limit: int = 100_000) -> None:
        self.read_state = read_state  # the backend's
        self.position: int | None = None  # where the log ended after this writer's last commit
        self.pruned_through = 0
        self.versions: dict = {}
        self.workflows: dict[str, WorkflowRow] = {}
        self.members: dict[str, dict[str, str]] = {}  # agent_id -> {workflow_id: its state there}
        self.limit = limit

    def read(self, conn: Any, keys: list) -> LogState:
        """read_state(conn, keys), from what it knows where that is still true."""
        state = self.read_state(conn, [key for key in keys if key not in self.versions])
        if (state.position, state.pruned_through) != (self.position, self.pruned_through):
            self.forget()  # another process has written, or retention has removed events
            return self.read_state(conn, keys)
        known = {key: self.versions[key] for key in keys if key in self.versions}
        return state._replace(versions={**known, **state.versions})

    def commit(self, state: LogState, rows: list[Row]) -> None:
        """Remember what a committed group read and wrote."""
        if len(self.versions) > self.limit:
            self.versions.clear()
        if max(len(self.workflows), len(self.members)) > self.limit // 10:  # rows of up to a kilobyte
            self.workflows.clear()
            self.members.clear()
        self.versions.update(state.versions)
        self.versions.update({(row.aggregate_type, row.aggregate_id): row.aggregate_version for row in rows})
        self.position, self.pruned_through = state.position + len(rows), state.pruned_through

    def forget(self) -> None:
        self.position = None
        self.versions.clear()
        self.workflows.clear()
        self.members.clear()


class Connection(Protocol):
    """What the queries need of a connection: sqlite3's, or PgConnection."""

    def execute(self, sql: str, args: Sequence = ...) -> Any: ...


def item_json(row: Row) -> str:
    """One event item as JSON; the stored attributes text is spliced in, not re-parsed."""
    kind = AGGREGATE_KINDS.get(row.aggregate_type)
    head = compact_json(
        {
            "event_id": row.event_id,
            "position": row.position,
            "aggregate_id": row.aggregate_id,
            "aggregate_type": row.aggregate_type,
            "aggregate_version": row.aggregate_version,
            "event_type": row.event_type,
            "event_name": row.event_name,
            "timestamp": row.timestamp,
        }
    )
    tail = compact_json(
        {
            "correlation_id": row.correlation_id,
            "causation_id": row.causation_id,
            "agent_name": row.agent_name,
            "agent_id": row.aggregate_id if kind == "agent" else None,
            "parent_agent_id": row.causation_id if kind == "agent" else None,
            "workflow_id": row.aggregate_id if kind == "workflow" else row.correlation_id,
            "user_prompt": row.user_prompt,
            "session_id": row.session_id,
        }
    )
    return head[:-1] + ',"attributes":' + row.attributes + "," + tail[1:]


def stored_event(values: Sequence) -> StoredEvent:
    """A row read with SELECT {READ_COLUMNS}, for streams and pages."""
    row = Row(*values)
    return StoredEvent(
        row.position,
        row.event_type,
        row.aggregate_type,
        row.aggregate_id,
        row.correlation_id,
        row.event_name,
        item_json(row),
    )


def normalize_filters(filters: Mapping[str, str | None]) -> dict[str, str] | None:
    """The equality filters on stored columns, None if they can match nothing. An event's
    event_type follows from its aggregate_type (KINDS), so it becomes that filter."""
    clean = {name: value for name, value in filters.items() if value is not None}
    if any("\x00" in value for value in clean.values()):  # no stored text holds NUL (NO_NUL)
        return None
    if "event_type" in clean:
        implied = EVENT_TYPE_AGGREGATES.get(clean.pop("event_type"))
        if implied is None or clean.setdefault("aggregate_type", implied) != implied:
            return None
    return clean


def narrow(filters: dict[str, str] | None, **scope: str) -> dict[str, str] | None:
    """filters AND scope's equalities; None if they contradict each other."""
    if filters is None or any(filters.get(name, value) != value for name, value in scope.items()):
        return None
    return {**filters, **scope}


def where(filters: dict, since: str | None = None, until: str | None = None) -> tuple:
    """SQL conditions and arguments: column equalities and a time window."""
    clauses = [f"{name} = ?" for name in filters]
    args = list(filters.values())
    if since is not None:
        clauses.append("timestamp > ?")
        args.append(since)
    if until is not None:
        clauses.append("timestamp <= ?")
        args.append(until)
    return clauses, args


def count(conn: Connection, clauses: list, args: list, cap: int | None = None) -> int:
    """Events matching every clause; with a cap, counting stops there."""
    sql = "SELECT 1 FROM events" + (" WHERE " + " AND ".join(clauses) if clauses else "")
    if cap is not None:
        sql += f" LIMIT {int(cap)}"
    return conn.execute(f"SELECT count(*) FROM ({sql}) AS matches", args).fetchone()[0]


def counter_total(conn: Connection, filters: dict) -> int | None:
    """The exact total from counters and versions, when they hold it; else None. Counters
    are kept per (column, value, aggregate_type) for event_name and correlation_id, and
    per aggregate_type; an aggregate's events are numbered by its versions."""
    rest = {name: value for name, value in filters.items() if name != "aggregate_type"}
    types = [filters["aggregate_type"]] if "aggregate_type" in filters else list(AGGREGATE_KINDS)
    if len(rest) > 1:
        return None
    if not rest:
        field, value = "aggregate_type", None
    else:
        [(field, value)] = rest.items()
    if field == "aggregate_id":  # its versions less those pruned
        sql = f"SELECT {CURRENT_VERSION}, coalesce({PRUNED_VERSION}, 0)".format(t="?", id="?")
        return sum(
            current - gone
            for current, gone in (conn.execute(sql, (t, value, t, value, t, value)).fetchone() for t in types)
        )
    marks = ", ".join("?" * len(types))
    if value is None:
        sql, args = f"SELECT sum(n) FROM counts WHERE field = 'aggregate_type' AND value IN ({marks})", types
    else:
        sql = f"SELECT sum(n) FROM counts WHERE field = ? AND value = ? AND aggregate_type IN ({marks})"
        args = [field, value, *types]
    return int(conn.execute(sql, args).fetchone()[0] or 0)


FEW = 20000  # time windows with at most this many events are read through a time index


def time_index(filters: dict) -> tuple:
    """The (column, timestamp) index for a window within these filters, and the condition
    that lets SQLite use it; (None, None) when the filters are served better otherwise."""
    if set(filters) - {"aggregate_type", "event_name"}:
        return None, None  # aggregate_id and correlation_id: their own indexes hold few events
    if "event_name" in filters:
        return "events_name_time", None
    if "aggregate_type" in filters:
        return "events_type_time", None
    return "events_type_time", f"aggregate_type IN ({', '.join(repr(t) for t in AGGREGATE_KINDS)})"


class Counted(NamedTuple):
    """How many events match, and the least and greatest of their positions, or bounds of
    them (None where they are not known)."""

    n: int
    first: int | None = None
    last: int | None = None


def counted(conn: Connection, table: str, sql: str, args: list) -> Counted:
    """Counted of what `sql` (a SELECT of n, first and last) finds in `table`."""
    n, first, last = conn.execute(sql.format(table=table), args).fetchone()
    return Counted(int(n or 0), first, last)


def bucket_total(conn: Connection, filters: dict, width: int, after: str, before: str) -> Counted:
    """The events matching `filters` in the buckets of this width whose start is between
    `after` and `before`, both excluded."""
    clauses, args = where(filters)
    return counted(
        conn,
        "buckets",
        " AND ".join(
            [
                "SELECT sum(n), min(first_position), max(last_position) FROM {table} WHERE width = ?",
                "start > ?",
                "start < ?",
                *clauses,
            ]
        ),
        [width, after, before, *args],
    )


def count_window(conn: Connection, filters: dict, since: str | None, until: str | None) -> Counted:
    """Events matching `filters` in the time window (since, until], exact. Filtered on
    aggregate_type or event_name, or not at all: exact counts of the window's two edge minutes,
    through the (column, timestamp) index, and the whole buckets between them (BUCKET_WIDTHS):
    the minutes left of the first edge's hour, the whole hours, the minutes of the last edge's
    hour; with bounds of their positions. Other filters have indexes that hold few events:
    they are counted in the window."""
    clauses, args = where(filters, since, until)
    if set(filters) - {"aggregate_type", "event_name"}:
        return Counted(count(conn, clauses, args))
    if since is not None and until is not None and since >= until:
        return Counted(0)
    _index, condition = time_index(filters)
    extra = [condition] if condition else []
    edge = "SELECT count(*), min(position), max(position) FROM {table} WHERE "
    # `;` sorts right after the `:` that follows a minute or an hour in a timestamp, and `~`
    # after any timestamp: so `minute + ";"` ends a minute, and "" and "~" are open ends.
    first_minute, last_minute = (since or "")[:16], (until or "~")[:16]
    if first_minute == last_minute:
        return counted(conn, "events", edge + " AND ".join(clauses + extra), args)
    parts = []
    base, base_args = where(filters)
    if since is not None:
        sql = edge + " AND ".join(base + extra + ["timestamp > ?", "timestamp < ?"])
        parts.append(counted(conn, "events", sql, [*base_args, since, first_minute + ";"]))
    if until is not None:
        sql = edge + " AND ".join(base + extra + ["timestamp >= ?", "timestamp <= ?"])
        parts.append(counted(conn, "events", sql, [*base_args, last_minute, until]))
    first_hour, last_hour = first_minute[:13], last_minute[:13]
    if first_hour == last_hour:
        parts.append(bucket_total(conn, filters, 60, first_minute, last_minute))
    else:
        if since is not None:
            parts.append(bucket_total(conn, filters, 60, first_minute, first_hour + ";"))
        if until is not None:
            parts.append(bucket_total(conn, filters, 60, last_hour, last_minute))
        parts.append(bucket_total(conn, filters, 3600, first_hour, last_hour))
    found = [part for part in parts if part.n]
    return Counted(
        sum(part.n for part in found),
        min((part.first for part in found if part.first is not None), default=None),
        max((part.last for part in found if part.last is not None), default=None),
    )


def scope_arms(match: Match) -> list:
    """The match as arms (filters, extra clauses, their arguments) whose results are disjoint
    and together make the answer: none, one, or for a workflow's timeline two (its own events;
    the rest of those correlated with it), which SQLite reads as two index-ordered scans and
    merges. No stored id holds NUL (NO_NUL), so an agent or workflow id with one matches nothing."""
    if match.nothing or "\x00" in (match.agent or "") + (match.workflow or ""):
        return []
    arms = []
    filters = normalize_filters(match.filters)
    if match.agent is not None:
        filters = narrow(filters, aggregate_type="agent_aggregate", aggregate_id=match.agent)
    if match.workflow is not None:
        wf = match.workflow
        arms = [
            (narrow(filters, aggregate_type="workflow_aggregate", aggregate_id=wf), [], []),
            (
                narrow(filters, correlation_id=wf),
                ["NOT (aggregate_type = 'workflow_aggregate' AND aggregate_id = ?)"],
                [wf],
            ),
        ]
    else:
        arms = [(filters, [], [])]
    return [arm for arm in arms if arm[0] is not None]


def arm_total(conn: Connection, query: Query, filters: dict, extra: list, extra_args: list) -> Counted:
    timed = query.since is not None or query.until is not None
    if extra:  # a workflow's correlated events but its own: from the counters, less its own
        known = None if timed else counter_total(conn, filters)
        clauses, args = where(filters, query.since, query.until)
        if known is None:
            return Counted(count(conn, clauses + extra, args + extra_args))
        own = where({"aggregate_type": "workflow_aggregate", "aggregate_id": query.match.workflow})
        return Counted(known - count(conn, clauses + own[0], args + own[1]))
    if timed:
        return count_window(conn, filters, query.since, query.until)
    known = counter_total(conn, filters)
    return Counted(count(conn, *where(filters)) if known is None else known)


def read_plan(conn: Connection, query: Query, filters: dict, total: int) -> tuple:
    """How to find a page of `total` matching events: (index hint, extra condition), hints
    where the backend takes them (ThreadedStore.index_hints). By
    aggregate_id or correlation_id, their own indexes. Otherwise whichever reads fewer
    entries: the (column, timestamp) index, all of whose matches are sorted by position, or
    the table in position order, which passes ~(limit + offset) * events / total rows (and
    all those outside a time window at the far end of the page: see the README)."""
    index, condition = time_index(filters)
    if index is None:
        return "", None
    if not query.index_hints:
        return "", condition
    wanted = query.limit + query.offset
    if total <= FEW or total * total <= wanted * (counter_total(conn, {}) or 0):
        return f" INDEXED BY {index}", condition
    return " NOT INDEXED", None


def query_page(conn: Connection, query: Query) -> Page:
    arms = scope_arms(query.match)
    found = [arm_total(conn, query, *arm) for arm in arms]
    total = sum(arm.n for arm in found)
    if total == 0:
        return Page([], 0, None)
    cursor = [
        (clause, value)
        for clause, value in (("position > ?", query.after), ("position < ?", query.before))
        if value is not None
    ]
    order = "ASC" if query.order == "asc" else "DESC"
    parts, args = [], []
    for (filters, extra, extra_args), arm in zip(arms, found):
        clauses, arm_args = where(filters, query.since, query.until)
        hint, condition = read_plan(conn, query, filters, total) if len(arms) == 1 else ("", None)
        # Where the window's buckets bound its positions, only there: a window in the middle of
        # the log is not looked for from an end of it.
        bounds = (("position >= ?", arm.first), ("position <= ?", arm.last))
        limits = cursor + [(clause, value) for clause, value in bounds if value is not None]
        clauses += ([condition] if condition else []) + extra + [clause for clause, _value in limits]
        parts.append(f"SELECT position FROM events{hint}" + (" WHERE " + " AND ".join(clauses) if clauses else ""))
        args += arm_args + extra_args + [value for _clause, value in limits]
    # Positions only, from indexes alone where they serve: the events are read by events_at.
    sql = f"{' UNION ALL '.join(parts)} ORDER BY position {order} LIMIT ? OFFSET ?"
    positions = [row[0] for row in conn.execute(sql, [*args, query.limit, query.offset])]
    return Page(positions, total, positions[-1] if len(positions) == query.limit else None)


def events_at(conn: Connection, positions: list[int]) -> list[StoredEvent]:
    rows = (
        conn.execute(
            f"SELECT {READ_COLUMNS} FROM events WHERE position IN ({', '.join('?' * len(positions))})", positions
        ).fetchall()
        if positions
        else []
    )
    found = {row[0]: stored_event(row) for row in rows}
    return [found[position] for position in positions if position in found]


def read_after(conn: Connection, position: int, match: Match, limit: int) -> list[StoredEvent]:
    arms = scope_arms(match)
    parts, args = [], []
    for arm_filters, extra, extra_args in arms:
        clauses, arm_args = where(arm_filters)
        parts.append(f"SELECT {READ_COLUMNS} FROM events WHERE {' AND '.join(['position > ?', *clauses, *extra])}")
        args += [position, *arm_args, *extra_args]
    if not parts:
        return []
    rows = conn.execute(f"{' UNION ALL '.join(parts)} ORDER BY position LIMIT ?", [*args, limit]).fetchall()
    return [stored_event(row) for row in rows]


def stored_rows(conn: Connection, position: int, limit: int) -> list[Row]:
    rows = conn.execute(
        f"SELECT {READ_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?", (position, limit)
    ).fetchall()
    return [Row(*row) for row in rows]


def log_extent(conn: Connection) -> Extent:
    """Where the log begins and ends (its size is the backend's to tell)."""
    last, oldest, timestamp, pruned = conn.execute(
        f"SELECT {LAST_POSITION}, (SELECT min(position) FROM events), "
        "(SELECT timestamp FROM events ORDER BY position LIMIT 1), "
        f"coalesce((SELECT n FROM counts WHERE {PRUNED_THROUGH}), 0)"
    ).fetchone()
    return Extent(last, oldest, timestamp, pruned, None, counter_total(conn, {}) or 0)


def last_position(conn: Connection) -> int:
    return conn.execute(f"SELECT {LAST_POSITION}").fetchone()[0]


# An agent's or a workflow's state, from its latest event's name: the last word of the name
# (after `.`, `_`, `-`, `:`, `/` or a space), in any case, is looked up here; any other
# name means it is running.
STATE_RULES = {
    "completed": ("completed", "complete", "succeeded", "success", "finished", "done", "ended", "stopped"),
    "failed": (
        "failed", "failure", "error", "errored", "crashed", "aborted", "cancelled", "canceled",
        "timeout", "timed_out", "killed", "rejected",
    ),
}  # fmt: skip
STATES = {word: state for state, words in STATE_RULES.items() for word in words}
_LAST_WORD = re.compile(r"[._:/ -]")


@functools.lru_cache(maxsize=4096)  # names repeat: the writers ask for every event
def event_state(name: str) -> str:
    """`completed`, `failed` or `running`, by STATE_RULES."""
    words = _LAST_WORD.split(name.lower())
    return STATES.get(words[-1], STATES.get("_".join(words[-2:]), "running"))


PARENT_RULES = (
    "An agent's parent comes from the `causation_id`s of its events, oldest first: the first that "
    "names another agent of the workflow, or an event of another agent, makes that agent the parent; "
    "one that names the workflow itself, or an event of the workflow, makes the agent a root "
    "(`parent_agent_id` null). A cause that names a call of the workflow (the `aggregate_id` of a "
    "system event correlated with it, as every OpenTelemetry span that is not an agent is stored) "
    "stands for that call's own cause, and so on up. The agent's own id and its own events are "
    "passed over. Without any of those, the first cause that names nothing stored is shown as it "
    "is; a cycle is cut. A call belongs to the agent its cause leads to in the same way."
)


AGENT_EVENTS = "FROM events WHERE aggregate_type = 'agent_aggregate' AND aggregate_id = m.agent_id"
AGENT_PRUNED = PRUNED_VERSION.format(t="'agent_aggregate'", id="m.agent_id")
WORKFLOW_AGENTS = f"""
SELECT m.agent_id,
    (SELECT agent_name {AGENT_EVENTS} AND agent_name IS NOT NULL ORDER BY position DESC LIMIT 1),
    (SELECT timestamp {AGENT_EVENTS} ORDER BY position LIMIT 1),
    (SELECT timestamp {AGENT_EVENTS} ORDER BY position DESC LIMIT 1),
    (SELECT max(aggregate_version) {AGENT_EVENTS}) - coalesce({AGENT_PRUNED}, 0),
    (SELECT event_name {AGENT_EVENTS} ORDER BY position DESC LIMIT 1),
    m.state
FROM workflow_agents m WHERE m.workflow_id = ? ORDER BY m.first_position
"""


def causations(conn: Connection, agent_ids: list[str]) -> list:
    """(agent_id, causation_id) of the agents' events that name a cause, oldest first."""
    rows = select_in(
        conn,
        "SELECT position, aggregate_id, causation_id FROM events WHERE aggregate_type = 'agent_aggregate' "
        "AND aggregate_id IN ({}) AND causation_id IS NOT NULL",
        agent_ids,
    )
    return [(agent_id, cause) for _position, agent_id, cause in sorted(rows)]


def owners(conn: Connection, event_ids: list[str]) -> dict:
    """event_id -> (aggregate_type, aggregate_id) of those of these ids that are stored."""
    sql = "SELECT event_id, aggregate_type, aggregate_id FROM events WHERE event_id IN ({})"
    return {event_id: (kind, owner) for event_id, kind, owner in select_in(conn, sql, event_ids)}


WORKFLOW_CALLS = (
    "SELECT aggregate_id, causation_id, event_name FROM events WHERE correlation_id = ? "
    "AND aggregate_type = 'system_aggregate' AND causation_id IS NOT NULL ORDER BY position"
)


def workflow_calls(conn: Connection, workflow_id: str) -> dict[str, tuple[str, str]]:
    """The workflow's calls: {aggregate_id: (cause, latest event name)} of its correlated
    system events, the cause their first event names."""
    calls: dict[str, tuple[str, str]] = {}
    for call_id, cause, name in conn.execute(WORKFLOW_CALLS, (workflow_id,)):
        calls[call_id] = (calls[call_id][0] if call_id in calls else cause, name)
    return calls


def through_calls(cause: str, calls: dict[str, tuple[str, str]], members: set, known: dict | None = None) -> str:
    """The cause a chain of calls leads to: the first link that is not a call (PARENT_RULES).
    `known` remembers the ends of chains already walked, so that walking every call of a
    workflow costs the number of calls, however deep they nest."""
    known = {} if known is None else known
    path: list = []
    walked: set = set()
    while cause in calls and cause not in members and cause not in known and cause not in walked:
        path.append(cause)
        walked.add(cause)
        cause = calls[cause][0]
    end = known.get(cause, cause)
    for link in path:
        known[link] = end
    return end


def resolve_parents(conn: Connection, workflow_id: str, agent_ids: list[str], calls: dict) -> dict:
    """agent_id -> its parent agent's id or None (PARENT_RULES): the first cause named by
    the agent's events (through calls) that is the workflow or one of its events (a root:
    None), another agent or an event of one; else the first cause that names nothing
    stored. A cycle is cut at the agent that joined the workflow first."""
    members = set(agent_ids)
    ends: dict = {}
    named = [(agent_id, through_calls(cause, calls, members, ends)) for agent_id, cause in causations(conn, agent_ids)]
    stored = owners(conn, sorted({cause for _, cause in named if cause not in members and cause != workflow_id}))
    parents: dict = {}
    unknown: dict = {}
    for agent_id, cause in named:
        if agent_id in parents:
            continue
        kind, owner = stored.get(cause, ("agent_aggregate", cause) if cause in members else (None, None))
        if cause == workflow_id or (kind == "workflow_aggregate" and owner == workflow_id):
            parents[agent_id] = None
        elif kind == "agent_aggregate" and owner != agent_id:
            parents[agent_id] = owner
        elif kind is None:
            unknown.setdefault(agent_id, cause)
    for agent_id in agent_ids:
        parents.setdefault(agent_id, unknown.get(agent_id))
    cut_cycles(parents, agent_ids)
    return parents


def cut_cycles(parents: dict, order: list[str]) -> None:
    """Make each cycle of parents a tree, cut at its member first in `order` (whose parent
    becomes None); every agent is walked once, so a chain of any length costs its length."""
    rank = {agent_id: i for i, agent_id in enumerate(order)}
    done: set = set()
    for start in order:
        path: list = []
        on_path: set = set()
        node = start
        while node in parents and node not in done and node not in on_path:
            path.append(node)
            on_path.add(node)
            node = parents[node]
        if node in on_path:  # the walk came back: path[path.index(node):] is a cycle
            cycle = path[path.index(node) :]
            parents[min(cycle, key=rank.__getitem__)] = None
        done.update(path)


def usage_by_model(rows: Iterable) -> list:
    """[(model, request_model, figures)] from rows of ROLLUP_SUMS, summed by model."""
    sums: dict = {}
    for model, request_model, *figures in rows:
        key = (model, request_model)
        sums[key] = [a + b for a, b in zip(sums[key], figures)] if key in sums else list(figures)
    return [(model, request_model, figures) for (model, request_model), figures in sums.items()]


ROLLUP_SUMS = ", ".join(f"CAST(sum({figure}) AS BIGINT)" for figure in ROLLUP_FIGURES)  # PostgreSQL: not numeric


def workflow_item(values: Sequence, usage: list) -> WorkflowSummary:
    """A row of `workflows` (WORKFLOW_COLUMNS) as the API shows it: a running workflow's
    duration runs to now."""
    row = WorkflowRow(*values)
    ended = row.last_time if row.state != "running" else None
    return {
        "workflow_id": row.workflow_id,
        "status": row.status,
        "state": row.state,
        "start_time": row.start_time,
        "end_time": ended,
        "last_event_time": row.last_time,
        "last_position": row.last_position,
        "duration_seconds": seconds_between(row.start_time, ended or utc_now()),
        "event_count": row.event_count,
        "agent_count": row.agents_running + row.agents_completed + row.agents_failed,
        "failed_agents": row.agents_failed,
        "name": row.name,
        "service": row.service,
        "user_prompt": row.user_prompt,
        "usage": usage,
    }


def workflow_summary(conn: Connection, workflow_id: str) -> WorkflowView | None:
    """The workflow and its agents (those with an event correlated to it, in order of their
    first such event), or None where it has no events. An agent's figures cover all its
    events: the first's and the latest's times, the count, the latest event's name as status;
    its state (from its lifecycle events, roll_up), the calls that belong to it (PARENT_RULES)
    with those that failed, and its usage and that of its calls, by model."""
    if "\x00" in workflow_id:  # no stored id holds NUL
        return None
    row = conn.execute(WORKFLOWS + " WHERE workflow_id = ?", (workflow_id,)).fetchone()
    if row is None:
        return None
    rows = conn.execute(WORKFLOW_AGENTS, (workflow_id,)).fetchall()
    calls = workflow_calls(conn, workflow_id)
    members = {row[0] for row in rows}
    parents = resolve_parents(conn, workflow_id, [row[0] for row in rows], calls) if rows else {}
    call_counts: collections.Counter = collections.Counter()
    ends: dict = {}
    for cause, name in calls.values():
        owner = through_calls(cause, calls, members, ends)
        if owner in members:
            call_counts[owner, "calls"] += 1
            call_counts[owner, "failed"] += event_state(name) == "failed"
    rollups: dict = {}
    everything = []
    for aggregate_type, aggregate_id, *figures in conn.execute(
        f"SELECT aggregate_type, aggregate_id, model, request_model, {', '.join(ROLLUP_FIGURES)} "
        "FROM rollups WHERE workflow_id = ?",
        (workflow_id,),
    ):
        everything.append(figures)
        holder = aggregate_id if aggregate_type == "agent_aggregate" else None
        if aggregate_type == "system_aggregate" and aggregate_id in calls:
            holder = through_calls(aggregate_id, calls, members, ends)
        if holder in members:
            rollups.setdefault(holder, []).append(figures)
    agents: list[AgentSummary] = [
        {
            "agent_id": agent_id,
            "agent_name": name,
            "workflow_id": workflow_id,
            "parent_agent_id": parents[agent_id],
            "first_event_time": first_time,
            "last_event_time": last_time,
            "event_count": count,
            "call_count": call_counts[agent_id, "calls"],
            "failed_calls": call_counts[agent_id, "failed"],
            "status": status,
            "state": state,
            "usage": usage_by_model(rollups.get(agent_id, [])),
        }
        for agent_id, name, first_time, last_time, count, status, state in rows
    ]
    return {"workflow": workflow_item(row, usage_by_model(everything)), "agents": agents}


def workflow_index(conn: Connection, index: WorkflowIndex) -> WorkflowPage:
    """A page of the workflows, most recent activity first, with their usage by model."""
    clauses: list[str] = []
    args: list = []
    for clause, value in (("state = ?", index.state), ("last_time > ?", index.since), ("last_time <= ?", index.until)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    total = conn.execute("SELECT count(*) FROM workflows" + where_all(clauses), args).fetchone()[0]
    if index.before is not None:
        clauses.append("last_position < ?")
        args.append(index.before)
    rows = conn.execute(
        WORKFLOWS + where_all(clauses) + " ORDER BY last_position DESC LIMIT ? OFFSET ?",
        [*args, index.limit, index.offset],
    ).fetchall()
    usage: dict = {}
    for workflow_id, *figures in select_in(
        conn,
        f"SELECT workflow_id, model, request_model, {ROLLUP_SUMS} FROM rollups WHERE workflow_id IN ({{}}) "
        "GROUP BY workflow_id, model, request_model",
        [row[0] for row in rows],
    ):
        usage.setdefault(workflow_id, []).append(figures)
    items = [workflow_item(row, usage_by_model(usage.get(row[0], []))) for row in rows]
    return WorkflowPage(total, items, items[-1]["last_position"] if len(items) == index.limit else None)


def where_all(clauses: list) -> str:
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def seconds_between(start: str | None, end: str | None) -> float | None:
    if start is None or end is None:
        return None
    return round((parse_timestamp(end) - parse_timestamp(start)).total_seconds(), 6)


class ReadSize:
    """How many events one read takes, so that it brings about `budget` bytes into memory
    whatever their size: as many as the sizes it has seen allow, and at first as many as the
    sizes the process saw last allow (few, before it has seen any)."""

    typical = 1024 * 1024.0  # bytes an event had in this process's last read; at first, as big as one may be
    big_reads = False  # a read brought a megabyte or more since give_back_memory last looked

    def __init__(self, budget: int, most: int) -> None:
        self.budget, self.most = budget, most
        self.count = max(1, min(most, int(budget / ReadSize.typical)))

    def saw(self, sizes: list[int]) -> None:
        """Take the sizes in bytes of the events the last read brought."""
        if sizes:
            total = sum(sizes)
            average = max(1.0, total / len(sizes))
            ReadSize.typical = average
            ReadSize.big_reads = ReadSize.big_reads or total >= 1024 * 1024
            self.count = max(1, min(self.most, int(self.budget / average)))


# Every waiting request joins a group, up to GROUP_EVENTS events and half of the events in
# flight: the event loop then answers one group and reads the next requests while the
# writer commits the other, instead of idling through each commit.
GROUP_EVENTS = 4096


class Pending:
    """A request in the writer's queue. `taken` (the writer has it) and `expired` (its wait
    ran out first) change under the store's claim lock: one of them wins."""

    __slots__ = ("events", "future", "deadline", "taken", "expired")

    def __init__(self, events: list[NewEvent], future: asyncio.Future[list[Receipt]], deadline: float) -> None:
        self.events, self.future, self.deadline = events, future, deadline
        self.taken = self.expired = False


CONSUMER_COLUMNS = "name, position, updated_at"


def read_consumer(conn: Connection, name: str) -> Consumer | None:
    row = conn.execute(f"SELECT {CONSUMER_COLUMNS} FROM consumers WHERE name = ?", (name,)).fetchone()
    return Consumer(*row) if row else None


def read_consumers(conn: Connection) -> list[Consumer]:
    return [Consumer(*row) for row in conn.execute(f"SELECT {CONSUMER_COLUMNS} FROM consumers ORDER BY name")]


def move_consumer(conn: Connection, last: int, name: str, position: int, now: str) -> tuple[Consumer, bool]:
    """In a transaction that holds the write lock: the consumer at `position` unless it is past
    the log's `last` position (Conflict) or the consumer is there or further already."""
    if position > last:
        raise Conflict(f"position {position} is past the log's last position {last}")
    known = read_consumer(conn, name)
    if known is not None and known.position >= position:
        return known, False
    conn.execute(
        "INSERT INTO consumers VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
        (name, position, now),
    )
    return Consumer(name, position, now), True


class ThreadedStore(EventStore):
    """What both backends share: one writer thread that commits each waiting group of
    requests in one transaction (GROUP_EVENTS, `commit`), reader threads that each keep a
    connection and run the queries above, and retention in short transactions. A backend
    provides its connections and the SQL of its writes (the abstract methods below), as
    pyeventsourcing's recorders do: the steps of a commit are the same for all."""

    errors: tuple[type[Exception], ...] = ()  # the driver's exceptions, which become StoreUnavailable
    broken: type[Exception] = Exception  # the driver's exception for a broken constraint
    poll: float | None = None  # seconds between looks for other processes' commits, if it must look
    index_hints = False  # whether reads may name the index to use (SQLite's planner needs them)
    _loop: asyncio.AbstractEventLoop  # the server's, from start() on
    _committed: asyncio.Event  # set at every commit this process hears of

    def __init__(self, location: str, timeout: float) -> None:
        self.location = location
        self.timeout = timeout  # seconds a request may wait for the store, from its arrival
        self.stats = StoreStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="eventuali-read")
        self._local = threading.local()
        self._read_conns: list = []
        # After a fault of the store in a write, every connection is opened anew: SQLite shares a
        # file's shared memory among a process's connections, and one opened while the files
        # were read-only keeps it so for all. Readers not in a read are closed at once, the others
        # when their read ends (under _idle_lock).
        self._generation = 0
        self._idle: set = set()  # reader connections not in a read
        self._idle_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._next: Chore | None = None  # what the writer found behind a group, for its next turn
        self._conn: Any = None  # the writer's connection, opened by the writer when it has none
        self._seen = SeenVersions(self.read_state)
        self._write_problem: str | None = None  # set and cleared by the writer thread
        self._in_flight = 0  # events queued and not yet answered; changed on the event loop only
        self._waiting: set[Pending] = set()  # requests not yet answered (on the event loop)
        self._claim = threading.Lock()  # for Pending.taken and Pending.expired
        self._expiry: asyncio.Future | None = None
        self._stopping = threading.Event()  # set by stop(): a prune ends after its transaction

    # -- what a backend provides
    @abc.abstractmethod
    def open_log(self) -> Any:
        """Create or migrate the log; a connection that may write (blocking). Raises
        StoreUnavailable, with the reason, when it cannot."""

    @abc.abstractmethod
    def connect(self, writes: bool = False) -> Any:
        """A connection to the log, read-only unless `writes`."""

    @abc.abstractmethod
    def write_lock(self, conn: Any) -> contextlib.AbstractContextManager[None]:
        """A transaction that holds the log's write lock, so that what it reads stays true
        until it commits: it commits when the block ends, and rolls back if it raises."""

    @abc.abstractmethod
    def read_state(self, conn: Any, keys: list) -> LogState:
        """Where the log ends, how far the counters count, and the current versions of the
        aggregates `keys` names (under the write lock)."""

    @abc.abstractmethod
    def insert(self, conn: Any, table: str, rows: list, tail: str = "") -> None:
        """INSERT the rows into `table` (its name and columns), `tail` after the values."""

    @abc.abstractmethod
    def insert_events(self, conn: Any, rows: list[Row]) -> None:
        """Insert a group's rows into the table `events`."""

    @abc.abstractmethod
    def publish(self, conn: Any, before: int, after: int) -> None:
        """Last in a commit's transaction: the log that ended at `before` now ends at `after`.
        Where the two are the same the transaction must still write (a writability check)."""

    def pipeline(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """Statements whose results nobody reads until the block ends go in one round trip,
        where the backend can."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def unavailable(self, exc: Exception) -> StoreUnavailable:
        """One of `errors` as StoreUnavailable, naming the fault (never a password)."""

    @abc.abstractmethod
    def size_bytes(self, conn: Any) -> int | None:
        """The log's size on disk (on a reader thread)."""

    # -- lifecycle
    def prepare(self) -> None:
        self.open_log().close()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._committed = asyncio.Event()
        self._conn = await self._loop.run_in_executor(self._readers, self.open_log)
        self._writer = threading.Thread(target=self._write_loop, name="eventuali-write", daemon=True)
        self._writer.start()
        self._expiry = asyncio.ensure_future(self._expire())

    async def stop(self) -> None:
        self._stopping.set()
        if self._expiry is not None:
            self._expiry.cancel()
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
            self._writer = None
        self._readers.shutdown(wait=True)
        for conn in self._read_conns:
            conn.close()

    # -- reading
    def read_now(self, fn: Callable, *args: Any) -> Any:
        """fn(connection, *args) with this thread's reader connection (a query of 3.2). A
        connection found lost (the database restarted, or ended it while idle) is replaced,
        and the read tried once more on the new one."""
        for attempt in (1, 2):
            conn = self._reader()
            try:
                if conn is None:
                    conn = self._local.conn = self.connect()
                    self._local.generation = self._generation
                    self._read_conns.append(conn)
                return fn(conn, *args)
            except self.errors as exc:
                lost = getattr(conn, "closed", False)
                if lost:  # the next read opens another
                    self._local.conn = None
                    self._read_conns.remove(conn)
                if lost and attempt == 1:
                    continue
                problem = self.unavailable(exc)
                self.stats.error("read", problem)
                raise problem from None
            finally:
                conn = getattr(self._local, "conn", None)
                if conn is not None:
                    with self._idle_lock:
                        self._idle.add(conn)
        raise AssertionError("unreachable")

    def _reader(self) -> Any:
        """This thread's reader connection, taken out of the idle ones; None where it has none,
        or where the one it had is of an older generation (then it is closed here)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return None
        with self._idle_lock:
            idle = conn in self._idle
            self._idle.discard(conn)
        if idle and getattr(self._local, "generation", 0) == self._generation:
            return conn
        if idle:  # reset_connections did not get to it
            conn.close()
        self._local.conn = None
        self._read_conns.remove(conn)
        return None

    def reset_connections(self) -> None:
        """Have every connection opened anew: the writer's at its next group, readers not in a
        read now, the others after theirs."""
        self.close_writer()
        with self._idle_lock:
            self._generation += 1
            idle, self._idle = self._idle, set()
        for conn in idle:
            conn.close()

    async def _read(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self._readers, functools.partial(self.read_now, fn, *args)
        )

    async def query(self, query: Query) -> Page:
        return await self._read(query_page, dataclasses.replace(query, index_hints=self.index_hints))

    async def events_at(self, positions: list[int]) -> list[StoredEvent]:
        return await self._read(events_at, positions)

    async def events_after(self, position: int, match: Match, limit: int) -> list[StoredEvent]:
        return await self._read(read_after, position, match, limit)

    async def rows_after(self, position: int, limit: int) -> list[Row]:
        return await self._read(stored_rows, position, limit)

    async def last_position(self) -> int:
        return await self._read(last_position)

    async def workflow_summary(self, workflow_id: str) -> WorkflowView | None:
        return await self._read(workflow_summary, workflow_id)

    async def workflows(self, index: WorkflowIndex) -> WorkflowPage:
        return await self._read(workflow_index, index)

    async def consumer(self, name: str) -> Consumer | None:
        return await self._read(read_consumer, name)

    async def consumers(self) -> list[Consumer]:
        return await self._read(read_consumers)

    async def ack(self, name: str, position: int) -> tuple[Consumer, bool]:
        def move(conn: Any) -> tuple[Consumer, bool]:
            return move_consumer(conn, self.read_state(conn, []).position, name, position, utc_now())

        return await self._chore(move)

    async def delete_consumer(self, name: str) -> bool:
        def delete(conn: Any) -> bool:
            return conn.execute("DELETE FROM consumers WHERE name = ?", (name,)).rowcount > 0

        return await self._chore(delete)

    async def _chore(self, fn: Callable[[Any], Any]) -> Any:
        chore = Chore(fn, self._loop.create_future())
        self._queue.put(chore)
        try:
            return await asyncio.wait_for(asyncio.shield(chore.future), 2 * self.timeout)
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"the database did not answer within {2 * self.timeout:g} s") from None

    async def extent(self) -> Extent:
        return await self._read(lambda conn: log_extent(conn)._replace(size_bytes=self.size_bytes(conn)))

    # -- retention
    def prune_now(self, before: str) -> int:
        """prune(), blocking: one short transaction after another, with pauses between them
        (PRUNE_SHARE)."""
        conn = None
        removed = 0
        try:
            conn = self.connect(writes=True)
            while True:
                started = time.perf_counter()
                with self.write_lock(conn):
                    count, more = prune_batch(self.insert, conn, before)
                removed += count
                if not more or self._stopping.is_set():
                    return removed
                # Writers waiting for the lock retry after growing sleeps (SQLite's busy handler):
                # a pause three times as long as the transaction lets them in before the next.
                held = time.perf_counter() - started
                time.sleep(max(0.005, held * (1 - PRUNE_SHARE) / PRUNE_SHARE))
        except self.errors as exc:
            raise self.unavailable(exc) from None
        finally:
            if conn is not None:
                conn.close()

    async def prune(self, before: str) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.prune_now, before)

    async def wait_for_commit(self, timeout: float) -> None:
        # This process's commits set the event, and so does a backend that hears of others';
        # one that cannot hear of them looks every `poll` seconds.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._committed.wait(), min(timeout, self.poll or timeout))
        self._committed.clear()

    def write_problem(self) -> str | None:
        return self._write_problem

    @property
    def in_flight(self) -> int:
        """Events of appends queued or being committed, not yet answered (a writability check
        counts one)."""
        return self._in_flight

    def _wake_followers(self) -> None:
        """Say that the log has grown (from any thread)."""
        self._loop.call_soon_threadsafe(self._committed.set)

    # -- writing
    async def append(self, events: list[NewEvent]) -> list[Receipt]:
        if not events:
            return []
        return await self._enqueue(events)

    async def check_writable(self) -> None:
        await self._enqueue([])  # a group with nothing to store still commits a write (publish)

    async def _enqueue(self, events: list[NewEvent]) -> list[Receipt]:
        pending = Pending(events, self._loop.create_future(), self._loop.time() + self.timeout)
        self._in_flight += len(events) or 1
        self._waiting.add(pending)
        self._queue.put(pending)
        return await pending.future

    async def _expire(self) -> None:
        """Answer 503 to every request still queued `timeout` after it arrived, whatever is ahead
        of it (a lock held elsewhere, a store that does not answer): it is dropped, nothing of it
        is stored. One the writer is committing gets a timeout more, since the store's own error
        (which names the fault) comes within one; past that it may still commit."""
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 4))
            now = self._loop.time()
            overdue = [
                pending
                for pending in self._waiting
                if pending.deadline <= now and (not pending.taken or pending.deadline + self.timeout <= now)
            ]
            with self._claim:
                for pending in overdue:
                    pending.expired = not pending.taken
            for pending in overdue:
                self._waiting.discard(pending)
                if pending.expired:
                    self._in_flight -= len(pending.events) or 1
                    reason = "nothing was stored"
                else:
                    reason = "the events may yet be stored: send them again with the same event_id to be sure"
                problem = StoreUnavailable(f"the database did not answer within {self.timeout:g} s; {reason}")
                self.stats.error("append", problem)
                if not pending.future.done():
                    pending.future.set_exception(problem)

    def _take_group(self) -> list[Pending] | Chore | None:
        """Wait for a request, then take those queued behind it (see GROUP_EVENTS), less those
        whose wait ran out; a chore alone; None to stop."""
        group: list[Pending] = []
        while not group:
            first = self._next or self._queue.get()
            self._next = None
            if first is None or isinstance(first, Chore):
                return first
            candidates, events = [first], len(first.events)
            while events < min(GROUP_EVENTS, self._in_flight // 2):
                try:
                    pending = self._queue.get_nowait()
                except queue.Empty:
                    break
                if pending is None:
                    self._queue.put(None)  # stop after this group
                    break
                if isinstance(pending, Chore):
                    self._next = pending  # after this group
                    break
                candidates.append(pending)
                events += len(pending.events)
            with self._claim:
                for pending in candidates:
                    pending.taken = not pending.expired
            group = [pending for pending in candidates if pending.taken]
        return group

    def _write_loop(self) -> None:
        while True:
            group = self._take_group()
            if group is None:
                break
            if isinstance(group, Chore):
                self._do_chore(group)
                continue
            started = time.perf_counter()
            try:
                outcomes = self.write_group([pending.events for pending in group])
            except Exception as exc:  # a bug: fail this group (500), keep the writer alive
                logger.exception("writer failed")
                outcomes = [StoreError(f"the writer failed: {exc!r}")] * len(group)
            self._count(group, outcomes, time.perf_counter() - started)
            failed = next((o for o in outcomes if isinstance(o, StoreUnavailable)), None)
            if failed is not None:
                self._write_problem = str(failed)
            elif any(isinstance(o, list) and o for o in outcomes):  # events stored: writes work again
                self._write_problem = None
            self._loop.call_soon_threadsafe(self._settle, group, outcomes)
        self.close_writer()

    def _do_chore(self, chore: Chore) -> None:
        """A chore in a transaction of its own that holds the write lock (on the writer thread)."""
        outcome: Any
        try:
            if self._conn is None:
                self._conn = self.open_log()
                self._seen.forget()
            with self.write_lock(self._conn):
                outcome = chore.fn(self._conn)
        except StoreError as exc:
            outcome = exc
        except LostBeforeWriting as exc:
            self.close_writer()
            outcome = self.unavailable(exc.cause)
        except self.errors as exc:
            outcome = self.unavailable(exc)
            self.reset_connections()
        except Exception as exc:  # a bug: fail the chore (500), keep the writer alive
            logger.exception("writer failed")
            outcome = StoreError(f"the writer failed: {exc!r}")

        def settle() -> None:
            if chore.future.done():
                return
            if isinstance(outcome, BaseException):
                chore.future.set_exception(outcome)
            else:
                chore.future.set_result(outcome)

        self._loop.call_soon_threadsafe(settle)

    def write_group(self, requests: list[list[NewEvent]]) -> list[Outcome]:
        """Commit the requests (commit_apart), opening the writer's connection first where it
        has none. After a fault of the store the connection is dropped and the next group
        opens another: one opened while the file could not be written stays read-only for
        good, and a lost PostgreSQL connection does not come back."""
        for attempt in (1, 2):
            if self._conn is None:
                try:
                    self._conn = self.open_log()
                except StoreUnavailable as exc:
                    return [exc] * len(requests)
                self._seen.forget()
            try:
                outcomes = commit_apart(
                    functools.partial(self.commit, self._conn), requests, self.broken, self.errors, self.unavailable
                )
                break
            except LostBeforeWriting as exc:  # nothing was sent: open another and try once more
                self.close_writer()
                if attempt == 2:
                    return [self.unavailable(exc.cause)] * len(requests)
        if any(isinstance(outcome, StoreUnavailable) for outcome in outcomes):
            self.reset_connections()
        return outcomes

    def commit(self, conn: Any, requests: list[list[NewEvent]]) -> list[Outcome]:
        """Store a group of requests in one transaction, under the write lock: read where the
        log ends and the versions and stored event_ids the group names, count what another
        program stored, plan each request's outcome (plan_appends), insert the rows, count
        and roll them up (summaries), publish the new end; each request's outcome."""
        try:
            with self.write_lock(conn):
                keys, event_ids = lookups(requests)
                state = self._seen.read(conn, keys)
                count_stored(self.insert, conn, state.counted_through, state.position)
                stored = read_receipts(conn, event_ids) if event_ids else {}
                outcomes, rows = plan_appends(requests, state.position, state.versions, stored, utc_now())
                self.insert_events(conn, rows)
                last = state.position + len(rows)
                writes, calls = summaries(conn, rows, last, state.position, self._seen)
                with self.pipeline(conn):
                    for write in writes:
                        self.insert(conn, *write)
                    self.publish(conn, state.position, last)
        except BaseException:
            self._seen.forget()
            raise
        self._seen.commit(state, rows)
        self.stats.used(calls)
        return outcomes

    def close_writer(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _count(self, group: list[Pending], outcomes: list[Outcome], seconds: float) -> None:
        stats, events = self.stats, sum(len(pending.events) for pending in group)
        if events:  # not only writability checks
            stats.group_events.observe(events)
            stats.commit_seconds.observe(seconds)
        for pending, outcome in zip(group, outcomes):
            if isinstance(outcome, BaseException):
                stats.error("append", outcome)
            else:
                stats.appended.update(event.event_type for event in pending.events)

    def _settle(self, group: list[Pending], outcomes: list[Outcome]) -> None:
        """Complete a group's requests (on the event loop)."""
        self._committed.set()
        for pending, outcome in zip(group, outcomes):
            self._in_flight -= len(pending.events) or 1
            self._waiting.discard(pending)
            if pending.future.done():
                continue  # the client went away, or its wait ran out: the events are stored all the same
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)


def copied_event(row: Row) -> NewEvent:
    """A stored row as an event to append elsewhere, the same in every field: its event_id
    makes a second copy of it a retry, and expected_version checks that the target holds the
    same history before it."""
    return NewEvent(
        AGGREGATE_KINDS.get(row.aggregate_type, "system"),
        row.event_id,
        True,
        row.aggregate_type,
        row.aggregate_id,
        False,
        row.event_type,
        row.event_name,
        row.timestamp,
        row.attributes,
        row.correlation_id,
        row.causation_id,
        row.agent_name,
        row.user_prompt,
        row.session_id,
        row.aggregate_version - 1,
        row.content_hash,
    )


COPY_PAGE = 5000  # events a transaction when copying, at most
COPY_CHUNK = 64 * 1024 * 1024  # bytes of events a transaction when copying, about


async def copy_log(source: EventStore, target: EventStore, progress: Callable[[int, int], None]) -> int:
    """Append the source's events to the target, each in the same position with the same
    version, id, timestamp and content, a page a transaction. The target must be empty, or
    hold a beginning of the source's log (an interrupted copy, which this resumes): that is
    checked before anything is written. Returns the events the target holds."""
    extent = await source.extent()
    if extent.pruned_through:  # its first events, and their versions, are gone: no copy would match it
        raise StoreUnavailable(
            f"retention has removed the events up to position {extent.pruned_through} from the source, and "
            "copy copies whole logs only: back it up with `backup` (SQLite) or pg_dump instead"
        )
    held = await target.last_position()
    if held:
        ours = await source.rows_after(held - 1, 1)
        theirs = await target.rows_after(held - 1, 1)
        if held > extent.last_position or [r.event_id for r in ours] != [r.event_id for r in theirs]:
            raise StoreUnavailable(
                f"the target holds another log ({held:,} events that are not the beginning of the source's): "
                "copy into an empty log"
            )
    position = 0
    size = ReadSize(COPY_CHUNK, COPY_PAGE)
    while True:
        rows = await source.rows_after(position, size.count)
        if not rows:
            return position
        size.saw([len(row.attributes) for row in rows])
        receipts = await target.append([copied_event(row) for row in rows])
        if [receipt.position for receipt in receipts] != [row.position for row in rows]:
            raise StoreUnavailable(
                f"the target holds other events than the source from position {rows[0].position} on: "
                "copy into an empty log"
            )
        position = rows[-1].position
        progress(position, extent.last_position)


async def copy_stores(source: EventStore, target: EventStore, progress: Callable[[int, int], None]) -> int:
    """copy_log between two stores it starts and stops."""
    await source.start()
    try:
        await target.start()
        try:
            return await copy_log(source, target, progress)
        finally:
            await target.stop()
    finally:
        await source.stop()


# -- 3.3 SQLite ---------------------------------------------------------------------------

SCHEMA_VERSION = 9
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
    # event_type and aggregate_type map one to one (KINDS): one index serves both filters.
    1: "DROP INDEX events_event_type",
    2: "DELETE FROM counts WHERE field IN ('event_type', 'aggregate_id')",
    # Counters by aggregate_type too, so that a pair of filters has an exact total at once;
    # the writers count every event, from position 0 on (see count_stored). The two
    # low-cardinality columns get (column, timestamp) indexes, which count time windows and
    # find rare values (read_plan), in place of their (column, position) indexes and the
    # timestamp index: one index fewer for every append.
    3: """
    DROP TABLE counts;
    CREATE TABLE counts (
        field TEXT NOT NULL, value TEXT NOT NULL, aggregate_type TEXT NOT NULL, n INTEGER NOT NULL,
        PRIMARY KEY (field, value, aggregate_type)
    ) WITHOUT ROWID;
    DELETE FROM workflow_agents;
    DROP INDEX events_timestamp;
    DROP INDEX events_aggregate_type;
    DROP INDEX events_event_name;
    CREATE INDEX events_type_time ON events (aggregate_type, timestamp);
    CREATE INDEX events_name_time ON events (event_name, timestamp);
    DELETE FROM sqlite_stat1 WHERE idx IN ('events_timestamp', 'events_aggregate_type', 'events_event_name');
    INSERT INTO sqlite_stat1 VALUES
        ('events', 'events_type_time', '1000000 333333 2'),
        ('events', 'events_name_time', '1000000 20000 2');
    """,
    # Retention (prune_batch): the highest version of each aggregate that lost events, which
    # keeps its versions from being used again and its count exact.
    4: """
    CREATE TABLE pruned (
        aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, version INTEGER NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id)
    ) WITHOUT ROWID;
    """,
    5: """
    CREATE TABLE consumers (name TEXT PRIMARY KEY, position INTEGER NOT NULL, updated_at TEXT NOT NULL) WITHOUT ROWID;
    """,
    # Runs at a glance (roll_up): the workflows, their agents' states and the usage rollups,
    # made for the events already stored by counting them all again when the log is opened.
    6: f"""
    DROP TABLE workflow_agents;
    {ROLLUP_TABLES}
    DELETE FROM counts WHERE NOT ({PRUNED_THROUGH});
    """,
    7: BUCKETS_TABLE + FILL_BUCKETS,
    # The buckets do not hold workflows: with the timestamp in the workflow's index entries, its
    # events in a window are counted, and its page found, without reading their rows. DROP INDEX
    # takes the index's statistics with it, so they are written again.
    8: """
    DROP INDEX events_correlation;
    CREATE INDEX events_correlation ON events (correlation_id, position, timestamp);
    INSERT INTO sqlite_stat1 VALUES ('events', 'events_correlation', '1000000 200 1 1');
    """,
}


def sql_statements(script: str) -> list:
    """The statements of a script, a trigger's body kept whole."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    return [s for s in statements + [pending.strip()] if s.strip(" ;\n")]


# SQLite's primary result codes for faults of the environment, which may clear by themselves.
SQLITE_FAULTS = {
    5: "database is locked by another process",  # SQLITE_BUSY
    6: "database is locked",  # SQLITE_LOCKED
    8: "database is read-only",  # SQLITE_READONLY
    10: "the database files cannot be written or read: read-only or failing storage?",  # SQLITE_IOERR
    11: "the database file is damaged",  # SQLITE_CORRUPT
    13: "disk is full",  # SQLITE_FULL
    14: "the database file cannot be opened",  # SQLITE_CANTOPEN
    26: "the file is not an SQLite database",  # SQLITE_NOTADB
}
# sqlite3_errstr() of those codes, for Python before 3.11, whose errors carry no code.
SQLITE_MESSAGES = {
    "database is locked": 5,
    "database table is locked": 6,
    "attempt to write a readonly database": 8,
    "disk I/O error": 10,
    "database disk image is malformed": 11,
    "database or disk is full": 13,
    "unable to open database file": 14,
    "file is not a database": 26,
}


def unavailable(exc: Exception) -> StoreUnavailable:
    """A StoreUnavailable that names the fault and keeps SQLite's own words."""
    code = getattr(exc, "sqlite_errorcode", None)
    code = SQLITE_MESSAGES.get(str(exc), 0) if code is None else code & 0xFF
    return StoreUnavailable(f"{SQLITE_FAULTS.get(code, 'database error')} ({exc})")


def connect(path: str, timeout: float, durability: str = "full", readonly: bool = False) -> sqlite3.Connection:
    # The writer keeps a statement of each size insert_rows uses, for three tables.
    conn = sqlite3.connect(
        path, timeout=timeout, isolation_level=None, check_same_thread=False, cached_statements=64 if readonly else 512
    )
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA cache_size = -8192")  # KiB: a reader holds this much of the log in memory, at most
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
        raise StoreUnavailable(
            f"{path} has schema version {version}; this server ({__version__}) "
            f"knows versions up to {SCHEMA_VERSION}: upgrade the server"
        )
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("PRAGMA user_version").fetchone()[0] == version:  # another process may have migrated
            for statement in sql_statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        conn.execute("COMMIT")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    state = read_state(conn, [])
    if state.counted_through < state.position:  # events the counters do not count yet (after schema 4's, all)
        conn.execute("BEGIN IMMEDIATE")
        state = read_state(conn, [])
        count_stored(insert_rows, conn, state.counted_through, state.position)
        conn.execute("COMMIT")
    return conn


# Rows go in multi-row statements: few statements per group (each one costs the writer a
# turn for the GIL against the busy event loop), and few distinct statements to compile and
# keep: up to EXACT_ROWS rows in one statement of that size; more in statements of the
# largest power of two that fits, then the rest.
EXACT_ROWS = 64


@functools.cache
def values_sql(head: str, width: int, rows: int, tail: str) -> str:
    return f"{head} VALUES " + ", ".join(["(" + ", ".join("?" * width) + ")"] * rows) + tail


def insert_rows(conn: sqlite3.Connection, table: str, rows: list, tail: str = "") -> None:
    """INSERT the rows into `table` (its name and columns) in few statements (see EXACT_ROWS).
    OR ROLLBACK: a broken constraint ends the transaction (the writer then retries the group's
    requests one by one), so SQLite keeps no statement journal to undo a single statement."""
    head = f"INSERT OR ROLLBACK INTO {table}"
    width = len(rows[0]) if rows else 1
    most = 1 << ((MAX_PARAMS // width).bit_length() - 1)
    start = 0
    while start < len(rows):
        left = len(rows) - start
        size = left if left <= min(EXACT_ROWS, most) else min(1 << (left.bit_length() - 1), most)
        conn.execute(
            values_sql(head, width, size, tail), [value for row in rows[start : start + size] for value in row]
        )
        start += size


def read_state(conn: sqlite3.Connection, keys: list) -> LogState:
    """The last position, the position up to which the counters count (COUNTED_THROUGH),
    {(aggregate_type, aggregate_id): current version} for `keys`, and the position up to
    which retention has removed events: in one statement for each MAX_PARAMS // 3 keys."""
    position, counted_through, pruned_through, versions = 0, 0, 0, {}
    step = MAX_PARAMS // 3
    for start in range(0, max(len(keys), 1), step):
        chunk = keys[start : start + step]
        sql = (
            f"SELECT {LAST_POSITION}, (SELECT n FROM counts WHERE {COUNTED_THROUGH}), "
            f"(SELECT n FROM counts WHERE {PRUNED_THROUGH})"
        )
        if chunk:
            sql = (
                "WITH k (i, t, id) AS (VALUES "
                + ", ".join(["(?, ?, ?)"] * len(chunk))
                + ") "
                + sql
                + f", (SELECT group_concat(i || ' ' || {CURRENT_VERSION.format(t='k.t', id='k.id')}) FROM k)"
            )
        row = conn.execute(sql, [value for i, key in enumerate(chunk) for value in (i, *key)]).fetchone()
        position, counted_through, pruned_through = row[0] or 0, row[1] or 0, row[2] or 0
        for pair in row[3].split(",") if chunk else ():
            i, version = pair.split(" ")
            versions[chunk[int(i)]] = int(version)
    return LogState(position, counted_through, versions, pruned_through)


def backup_database(source: str, dest: str, timeout: float) -> int:
    """Copy the live database to `dest` with SQLite's online backup API; returns the event
    count of the copy. Writers go on meanwhile: the copy holds every event committed when
    it began, consistent as of one moment."""
    if os.path.lexists(dest):  # a file, or a link to one: never written through
        raise StoreUnavailable(f"{dest} exists; backup writes a new file")
    if not os.path.exists(source):
        raise StoreUnavailable(f"no database at {source}")
    # Written beside the destination under another name, and linked into place only when whole:
    # a failed backup (a full disk) leaves nothing behind, and a retry finds the name free.
    fd, partial = tempfile.mkstemp(prefix=".backup-", suffix=".partial", dir=os.path.dirname(os.path.abspath(dest)))
    os.close(fd)
    try:
        src, dst = connect(source, timeout, readonly=True), sqlite3.connect(partial)
        try:
            src.backup(dst)
            events = last_position(dst)
        finally:
            dst.close()
            src.close()
        os.link(partial, dest)  # fails rather than replace a file that appeared meanwhile
    finally:
        for leftover in (partial, partial + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return events


POLL = 0.05  # seconds between looks for commits of other processes


def open_turns(path: str) -> int | None:
    """The file whose lock writers of every process take before SQLite's write lock (see
    SQLiteStore.write_lock), opened anew: flock excludes other opens of the file, not holders
    of the same one. None where there is none to be had (no fcntl, a folder that cannot be
    written): then SQLite's lock alone orders the writers."""
    if fcntl is None:
        return None
    try:
        return os.open(path + "-writer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None


class SQLiteStore(ThreadedStore):
    """The log in one SQLite file (WAL mode), which several processes may share: their writers
    take turns (write_lock), and each looks for the others' commits every POLL seconds."""

    errors = (sqlite3.Error,)
    broken = sqlite3.IntegrityError
    poll = POLL
    index_hints = True
    backend = "sqlite"

    def __init__(self, config: APIServerConfig, path: str | None = None) -> None:
        self.path = path or config.database_path  # by default events.db in the data dir
        super().__init__(os.path.abspath(self.path), config.database_timeout)
        self.durability = config.durability
        self._turns = threading.local()  # each writing thread's open_turns (the writer's, a prune's)
        self._turn_files: list[int] = []

    def open_log(self) -> sqlite3.Connection:
        try:
            return open_database(self.path, self.timeout, self.durability)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {unavailable(exc)}") from None

    def connect(self, writes: bool = False) -> sqlite3.Connection:
        return connect(self.path, self.timeout, self.durability, readonly=not writes)

    @contextlib.contextmanager
    def write_lock(self, conn: sqlite3.Connection) -> Iterator[None]:
        """SQLite's write lock, taken after a lock on a file beside the log that the writers of
        every process take first. A writer waiting for that one wakes when it is released;
        one waiting in SQLite's busy handler sleeps 1, 2, 5, … up to 100 ms between tries, and
        with two busy processes mostly sleeps past the moment the lock was free. Writers that
        do not take it (scripts, older servers) still meet SQLite's lock, with its timeout."""
        turns = getattr(self._turns, "fd", None)
        if turns is None:
            turns = self._turns.fd = open_turns(self.path)
            self._turn_files += [turns] if turns is not None else []
        if turns is not None:
            fcntl.flock(turns, fcntl.LOCK_EX)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # a failed COMMIT (disk full, I/O error) has rolled back already
                    conn.execute("ROLLBACK")
                raise
        finally:
            if turns is not None:
                fcntl.flock(turns, fcntl.LOCK_UN)

    async def stop(self) -> None:
        await super().stop()
        for fd in self._turn_files:
            os.close(fd)
        self._turn_files.clear()

    def read_state(self, conn: sqlite3.Connection, keys: list) -> LogState:
        return read_state(conn, keys)

    def insert(self, conn: sqlite3.Connection, table: str, rows: list, tail: str = "") -> None:
        insert_rows(conn, table, rows, tail)

    def insert_events(self, conn: sqlite3.Connection, rows: list[Row]) -> None:
        insert_rows(conn, EVENTS_TABLE, rows)

    def publish(self, conn: sqlite3.Connection, before: int, after: int) -> None:
        if after == before:  # the rows are the write; without any, this
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('checked', ?)", (utc_now(),))

    def unavailable(self, exc: Exception) -> StoreUnavailable:
        return unavailable(exc)

    def size_bytes(self, conn: Any) -> int | None:
        return sum(os.path.getsize(name) for name in (self.path, self.path + "-wal") if os.path.exists(name))

    def backup(self, dest: str) -> int:
        try:
            return backup_database(self.path, dest, self.timeout)
        except sqlite3.Error as exc:
            raise unavailable(exc) from None


# -- 3.4 PostgreSQL -----------------------------------------------------------------------
# The same log in a PostgreSQL database, shared by server processes on any hosts. Positions
# come from one head row, updated in the transaction that inserts the events: its row lock
# makes commits take turns, a rollback undoes it, and PostgreSQL makes a commit visible before
# it releases its locks, so a reader that sees position p sees every position below p. Each
# commit NOTIFYs the new last position; every process LISTENs on a connection of its own and
# then reads the new events by position, so a lost notification delays an event, never loses it.
# Tables live in the schema `eventuali`, beside whatever else the database holds.

# 2: the table pruned (retention); 3: consumers; 4: runs at a glance; 5: buckets;
# 6: timestamps in the workflow index's entries
PG_SCHEMA_VERSION = 6
PG_SCHEMA = (
    """
CREATE SCHEMA IF NOT EXISTS eventuali;
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    position          bigint PRIMARY KEY,
    event_id          text NOT NULL,
    aggregate_type    text NOT NULL,
    aggregate_id      text NOT NULL,
    aggregate_version bigint NOT NULL,
    event_type        text NOT NULL,
    event_name        text NOT NULL,
    timestamp         text NOT NULL,
    attributes        text NOT NULL,
    correlation_id    text,
    causation_id      text,
    agent_name        text,
    user_prompt       text,
    session_id        text,
    content_hash      text
);
CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events (event_id);
CREATE UNIQUE INDEX IF NOT EXISTS events_stream ON events (aggregate_type, aggregate_id, aggregate_version);
CREATE INDEX IF NOT EXISTS events_aggregate_id ON events (aggregate_id, position);
CREATE INDEX IF NOT EXISTS events_correlation ON events (correlation_id, position, timestamp);
CREATE INDEX IF NOT EXISTS events_type_time ON events (aggregate_type, timestamp);
CREATE INDEX IF NOT EXISTS events_name_time ON events (event_name, timestamp);
CREATE TABLE IF NOT EXISTS head (id integer PRIMARY KEY CHECK (id = 1), position bigint NOT NULL);
INSERT INTO head VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS counts (
    field text NOT NULL, value text NOT NULL, aggregate_type text NOT NULL, n bigint NOT NULL,
    PRIMARY KEY (field, value, aggregate_type)
);
CREATE TABLE IF NOT EXISTS pruned (
    aggregate_type text NOT NULL, aggregate_id text NOT NULL, version bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
CREATE TABLE IF NOT EXISTS consumers (name text PRIMARY KEY, position bigint NOT NULL, updated_at text NOT NULL);
"""
    + ROLLUP_TABLES
    + BUCKETS_TABLE
    + """
ALTER TABLE workflow_agents ADD COLUMN IF NOT EXISTS state text NOT NULL DEFAULT 'running';
"""
)
PG_CHANNEL = "eventuali"
# The sessions that hold the head row's lock (a row lock takes a lock on its table) and have
# waited for their client longer than the timeout. (Ended one by one, apart: a WHERE clause
# may call its functions before it has filtered.)
LOST_WRITERS = """
SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.relation = 'eventuali.head'::regclass AND l.granted AND a.pid <> pg_backend_pid()
AND a.wait_event = 'ClientRead' AND a.state <> 'idle' AND now() - a.state_change > make_interval(secs => ?)
"""


def pg_driver() -> Any:
    """psycopg, imported only when a database URL is given."""
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            "--database-url needs the PostgreSQL driver: pip install 'eventuali-api-server[postgres]'"
        ) from None
    return psycopg


def redact_url(url: str) -> str:
    """The URL without its password, for logs and replies."""
    return re.sub(r"(password=)[^&]*", r"\1***", re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url))


def redact_secrets(text: str, url: str) -> str:
    """`text` (a driver's message) without the password of `url`, however malformed the URL
    is (libpq quotes the whole URL it could not parse): the password as given and decoded,
    any `scheme://user:…@` and any `password=…` are hidden."""
    from urllib.parse import unquote

    secrets = []
    given = re.match(r"\s*[^:]*://[^:/@]*:(.*)@", url, re.S)  # to the last @: a raw @ may be in it
    if given:
        secrets.append(given.group(1))
    secrets += [m.group(1) for m in re.finditer(r"password\s*=\s*('[^']*'|\"[^\"]*\"|[^&\s]+)", url, re.I)]
    for secret in secrets:
        for form in {secret, unquote(secret), secret.strip("'\"")}:
            if len(form) >= 3:
                text = text.replace(form, "***")
    text = re.sub(r"([A-Za-z][\w+.-]*://[^:/@\s]*:)[^\s\"']*@", r"\1***@", text)
    return re.sub(r"(password\s*=\s*)('[^']*'|\"[^\"]*\"|[^&\s\"']+)", r"\1***", text, flags=re.I)


class PgConnection:
    """A psycopg connection that takes the `?` placeholders of the queries (section 3.2)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, args: Sequence = ()) -> Any:
        return self.raw.execute(sql.replace("?", "%s"), args)

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def close(self) -> None:
        self.raw.close()


def pg_connect(url: str, timeout: float, autocommit: bool = True, durability: str = "full") -> PgConnection:
    psycopg = pg_driver()
    ms = max(1000, int(timeout * 1000))
    # TCP keepalives and a user timeout: a connection to a host that vanished fails in about
    # `timeout` seconds instead of when TCP gives up (hours).
    raw = psycopg.connect(
        url,
        autocommit=autocommit,
        connect_timeout=max(1, int(timeout)),
        keepalives=1,
        keepalives_idle=max(1, int(timeout)),
        keepalives_interval=1,
        keepalives_count=3,
        tcp_user_timeout=ms,
    )
    raw.execute("SET search_path TO eventuali")
    # A statement that waits longer than --database-timeout (for a lock, a slow disk) fails
    # with a 503 rather than holding its request; and a server that stops in the middle of a
    # transaction (frozen, paused, cut off) has it ended by PostgreSQL after as long, which
    # frees the head row's lock for the other servers.
    raw.execute(f"SET statement_timeout = {ms}")
    raw.execute(f"SET lock_timeout = {ms}")
    raw.execute(f"SET idle_in_transaction_session_timeout = {ms}")
    if durability == "normal":  # an acknowledged commit may be lost if PostgreSQL's host fails
        raw.execute("SET synchronous_commit = off")
    if not autocommit:
        raw.commit()
    return PgConnection(raw)


# SQLSTATE classes and codes of faults that may clear by themselves.
PG_FAULTS = {
    "08": "PostgreSQL cannot be reached",
    "53": "PostgreSQL is out of resources (disk, memory, connections)",
    "57P": "PostgreSQL is shutting down or starting",
    "25006": "the database is read-only",
    "57014": "the database took longer than --database-timeout",
    "55P03": "the database is locked",
}


def pg_unavailable(exc: Exception, url: str) -> StoreUnavailable:
    """The driver's error as StoreUnavailable, its reason named, never the password of `url`."""
    code = getattr(exc, "sqlstate", None) or ("08" if isinstance(exc, pg_driver().OperationalError) else "")
    reason = next((text for prefix, text in PG_FAULTS.items() if code.startswith(prefix)), "database error")
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreUnavailable(f"{reason} ({redact_secrets(detail, url)})")


def pg_insert(conn: PgConnection, table: str, rows: list, tail: str = "") -> None:
    # One short statement executed for each row, in a pipeline: psycopg parses a long
    # statement's placeholders anew each time.
    if rows:
        marks = ", ".join(["%s"] * len(rows[0]))
        conn.raw.cursor().executemany(f"INSERT INTO {table} VALUES ({marks}){tail}", rows)


def open_pg_database(url: str, timeout: float, durability: str) -> PgConnection:
    """Create the schema if needed (one process at a time) and return the writer's connection."""
    conn = pg_connect(url, timeout, autocommit=False, durability=durability)
    with conn.raw.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('eventuali schema'))")
        for statement in PG_SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING", (str(PG_SCHEMA_VERSION),))
        version = int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        if version < PG_SCHEMA_VERSION:  # the statements above have brought it up to date
            if version < 4:  # the workflows and usage of the events stored: count them all again
                conn.execute("DELETE FROM workflow_agents")
                conn.execute(f"DELETE FROM counts WHERE NOT ({PRUNED_THROUGH})")
                position = conn.execute("SELECT position FROM head").fetchone()[0]
                count_stored(pg_insert, conn, 0, position)
            elif version < 5:  # the time buckets of the events stored
                for statement in FILL_BUCKETS.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if version < 6:  # the timestamp in the workflow index's entries (see MIGRATIONS[8])
                conn.execute("DROP INDEX events_correlation")
                conn.execute("CREATE INDEX events_correlation ON events (correlation_id, position, timestamp)")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(PG_SCHEMA_VERSION),))
            version = PG_SCHEMA_VERSION
    if version > PG_SCHEMA_VERSION:
        conn.close()
        raise StoreUnavailable(
            f"the database has schema version {version}; this server ({__version__}) knows "
            f"versions up to {PG_SCHEMA_VERSION}: upgrade the server"
        )
    return conn


class PostgresStore(ThreadedStore):
    """The log in a PostgreSQL database (see above), for any number of server processes."""

    poll = None  # the listener hears of every commit
    backend = "postgresql"

    def __init__(self, config: APIServerConfig) -> None:
        super().__init__(redact_url(config.database_url), config.database_timeout)
        psycopg = pg_driver()
        self.errors, self.broken = (psycopg.Error,), psycopg.IntegrityError
        self.url = config.database_url
        self.durability = config.durability
        self._listening = threading.Event()  # cleared to stop the listener
        self._listener: threading.Thread | None = None

    def open_log(self) -> PgConnection:
        try:
            return open_pg_database(self.url, self.timeout, self.durability)
        except self.errors as exc:
            raise StoreUnavailable(f"cannot open {self.location}: {pg_unavailable(exc, self.url)}") from None

    def connect(self, writes: bool = False) -> PgConnection:
        return pg_connect(self.url, self.timeout, autocommit=not writes, durability=self.durability)

    @contextlib.contextmanager
    def write_lock(self, conn: PgConnection) -> Iterator[None]:
        locked = False
        try:
            with conn.raw.transaction():
                conn.execute("SELECT position FROM head WHERE id = 1 FOR UPDATE")
                locked = True
                yield
        except pg_driver().OperationalError as exc:
            if not locked and conn.closed:  # ended while idle (a restart, a timeout): nothing was sent
                raise LostBeforeWriting(exc) from exc
            if not locked and getattr(exc, "sqlstate", "") in ("55P03", "57014"):  # waited too long
                self.end_lost_writers()
            raise

    def end_lost_writers(self) -> None:
        """End the sessions that hold the write lock while they wait for their own client
        longer than the timeout: a server stopped inside a commit (frozen, paused, cut off),
        which PostgreSQL cannot tell from a slow one (its kernel still answers TCP), and whose
        timeouts do not run while a statement waits for the client. A working writer never
        waits that long for itself. Best effort: the next commit tries again."""
        try:
            with contextlib.closing(self.connect()) as conn:
                for (pid,) in conn.execute(LOST_WRITERS, (self.timeout,)).fetchall():
                    logger.warning(
                        "ending PostgreSQL session %s: it holds the write lock and its client is silent", pid
                    )
                    conn.execute("SELECT pg_terminate_backend(?)", (pid,))
        except self.errors as exc:
            logger.warning("could not end a silent writer's session: %s", self.unavailable(exc))

    def read_state(self, conn: PgConnection, keys: list) -> LogState:
        position, counted_through, pruned_through = conn.execute(
            f"SELECT (SELECT position FROM head WHERE id = 1), (SELECT n FROM counts WHERE {COUNTED_THROUGH}), "
            f"(SELECT n FROM counts WHERE {PRUNED_THROUGH})"
        ).fetchone()
        versions = {}
        if keys:
            rows = conn.execute(
                f"SELECT k.t, k.id, {CURRENT_VERSION.format(t='k.t', id='k.id')} "
                "FROM unnest(?::text[], ?::text[]) AS k (t, id)",
                ([t for t, _ in keys], [i for _, i in keys]),
            ).fetchall()
            versions = {(t, i): version for t, i, version in rows}
        return LogState(position, counted_through or 0, versions, pruned_through or 0)

    def insert(self, conn: PgConnection, table: str, rows: list, tail: str = "") -> None:
        pg_insert(conn, table, rows, tail)

    def insert_events(self, conn: PgConnection, rows: list[Row]) -> None:
        with conn.raw.cursor().copy(f"COPY {EVENTS_TABLE} FROM STDIN") as copy:  # PostgreSQL's fastest way in
            for row in rows:
                copy.write_row(row)

    def pipeline(self, conn: PgConnection) -> contextlib.AbstractContextManager[Any]:
        return conn.raw.pipeline()

    def publish(self, conn: PgConnection, before: int, after: int) -> None:
        # The head row's update is the transaction's write even when no row was inserted.
        conn.execute("UPDATE head SET position = ? WHERE id = 1", (after,))
        if after > before:
            conn.execute(f"SELECT pg_notify('{PG_CHANNEL}', ?)", (str(after),))

    def unavailable(self, exc: Exception) -> StoreUnavailable:
        return pg_unavailable(exc, self.url)

    def size_bytes(self, conn: PgConnection) -> int | None:
        return int(
            conn.execute(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'eventuali' AND c.relkind = 'r'"
            ).fetchone()[0]
        )

    async def start(self) -> None:
        await super().start()
        self._listening.set()
        self._listener = threading.Thread(target=self._listen, name="eventuali-listen", daemon=True)
        self._listener.start()

    async def stop(self) -> None:
        self._listening.clear()
        if self._listener is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._listener.join)
        await super().stop()

    def _listen(self) -> None:
        """Wake the followers at every commit of any process. After a lost connection it
        listens again and wakes them, so that they read what they may have missed."""
        psycopg = pg_driver()
        while self._listening.is_set():
            try:
                # A short connect timeout: stopping the server waits for this thread.
                with psycopg.connect(self.url, autocommit=True, connect_timeout=2) as conn:
                    conn.execute(f"LISTEN {PG_CHANNEL}")
                    self._wake_followers()
                    while self._listening.is_set():
                        for _notify in conn.notifies(timeout=0.1):
                            self._wake_followers()
            except psycopg.Error as exc:
                if self._listening.is_set():
                    logger.warning("listening for commits: %s; trying again", pg_unavailable(exc, self.url))
                    time.sleep(0.5)

    def backup(self, dest: str) -> int:
        raise StoreUnavailable(
            f"on PostgreSQL, back up with pg_dump: pg_dump --format=custom --schema=eventuali "
            f"--file={dest} '{self.location}' (with the password in PGPASSWORD or ~/.pgpass)"
        )


def make_store(config: APIServerConfig) -> EventStore:
    """The store the settings name: PostgreSQL with a database URL, else SQLite in the data dir."""
    return PostgresStore(config) if config.database_url else SQLiteStore(config)


# =============================================================================
# 4. Live broadcasting
# =============================================================================

# One task follows the log: woken by the store after each commit (of any process),
# it reads the new events once, by position, and appends each one's SSE bytes to
# every matching subscriber's bounded buffer. A subscriber whose buffer overflows
# is marked `behind` and catches up from the store by position, so a slow reader
# neither blocks anyone nor loses events.

PAGE = 500  # events per read when following the log or catching a stream up
FOLLOW_WAIT = 1.0  # seconds the follower waits for a commit before it looks anyway
CLOSE_GRACE = 0.3  # seconds a stream stuck on a slow client gets to finish when the server stops
MARK_EVERY = 1.0  # seconds between a filtered stream's progress marks, at least
TICK_SLICES = 10  # the parts of the streams the Hub's ticker looks at in turn
FILTER_FIELDS = {name: StoredEvent._fields.index(name) for name in STREAM_FILTERS}
# The filter a stream is found by, most selective first: an event is offered to the streams
# filtered on its own values (and to those with no filter), not to every stream.
KEY_ORDER = [FILTER_FIELDS[name] for name in ("aggregate_id", "correlation_id", "event_name")]
WORKFLOW_KEY = -1  # a stream of a workflow's timeline: found by the event's workflows


def in_workflow(event: StoredEvent, workflow_id: str) -> bool:
    """Whether the event belongs to the workflow's timeline (see scope_arms)."""
    return event.correlation_id == workflow_id or (
        event.aggregate_id == workflow_id and event.aggregate_type == "workflow_aggregate"
    )


def sse_bytes(event: StoredEvent) -> bytes:
    return f"id: {event.position}\nevent: event\ndata: {event.json}\n\n".encode()


async def stored_after(
    store: EventStore, position: int, match: Match, read_chunk: int
) -> AsyncIterator[list[StoredEvent]]:
    """The stored events after `position` that `match`, oldest first, in reads of about
    `read_chunk` bytes each (see ReadSize)."""
    size = ReadSize(read_chunk, PAGE)
    while True:
        events = await store.events_after(position, match, size.count)
        if events:
            position = events[-1].position
            yield events
        if len(events) < size.count:
            return
        size.saw([len(event.json) for event in events])


class ByteBudget:
    """Bytes of events that streams catching up from the store may hold at once, all
    together (on the event loop). A stream takes before each read and gives back once the
    read is sent. It gets what is free, but never less than `least`, so that it never waits:
    a stream whose client stopped reading keeps its grant, and the others read less at a time."""

    def __init__(self, total: int, least: int) -> None:
        self.free, self.least = total, least

    def take(self, wanted: int) -> int:
        grant = min(wanted, max(self.free, self.least))
        self.free -= grant
        return grant

    def give(self, grant: int) -> None:
        self.free += grant


class Subscriber:
    __slots__ = (
        "filters", "workflow", "key", "live_from", "buffer", "buffered", "wake", "behind", "closed", "pump",
        "sent", "sent_at", "marked_at", "due",
    )  # fmt: skip

    def __init__(self, match: Match) -> None:
        self.filters = [(FILTER_FIELDS[k], v) for k, v in match.filters.items() if v is not None]
        self.workflow = match.workflow  # its timeline: its own events and those correlated
        fields = dict(self.filters)
        field = next((f for f in KEY_ORDER if f in fields), None)
        if field is not None:
            self.key: tuple | None = (field, fields[field])
        elif self.workflow is not None:
            self.key = (WORKFLOW_KEY, self.workflow)
        else:  # by type alone (three values) or by nothing: offered every event
            self.key = None
        self.live_from: int | None = None  # the log's last position just after it subscribed, once read
        self.buffer: deque = deque()  # (position, SSE bytes)
        self.buffered = 0  # bytes in the buffer
        self.wake = asyncio.Event()
        self.behind = True  # it starts by reading the stored events after its start position
        self.closed = False
        self.pump: asyncio.Future | None = None  # the task that sends to the client
        # For the Hub's ticker (Hub._tick), which wakes an idle stream when a mark or a ping is due:
        self.sent = 0  # the position the client has been told of, by an event or a mark
        self.sent_at = self.marked_at = time.monotonic()  # when it was last sent anything, a mark
        self.due = False  # a mark or a ping may be due

    @property
    def filtered(self) -> bool:
        return bool(self.filters or self.workflow)


class Hub:
    """Subscribers of this process and the task that feeds them."""

    def __init__(self, store: EventStore, read_chunk: int, buffer_bytes: int, catchup_bytes: int, ping: float) -> None:
        self.store, self.ping = store, ping
        self.read_chunk, self.buffer_bytes = read_chunk, buffer_bytes
        self.catchup = ByteBudget(catchup_bytes, min(read_chunk, 64 * 1024))
        self.subscribers: set = set()
        self.keyed: dict[tuple, set] = {}  # Subscriber.key -> those with it
        self.unkeyed: set = set()  # the others, offered every event
        self.overflows = 0  # times a subscriber fell behind and was caught up from the store
        self.delivered = 0  # events handed to streams
        self.fanned_out = 0  # the position up to which events have been handed to the streams
        self._task: asyncio.Future | None = None
        self._ticker: asyncio.Future | None = None
        # from start() on:
        self.loop: asyncio.AbstractEventLoop
        self._wanted: asyncio.Event  # set while there are subscribers to feed

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._wanted = asyncio.Event()
        self._task = asyncio.ensure_future(self._follow())
        self._ticker = asyncio.ensure_future(self._tick())

    async def stop(self) -> None:
        self.close_all()
        for task in (self._ticker, self._task):  # before the store closes
            if task is not None:
                task.cancel()
                await asyncio.wait([task])

    def close_all(self) -> None:
        """End every stream: at once where it waits for events, and after CLOSE_GRACE
        where it is stuck sending to a client that does not read."""
        for sub in self.subscribers:
            sub.closed = True
            sub.wake.set()
            if sub.pump is not None:
                asyncio.get_running_loop().call_later(CLOSE_GRACE, sub.pump.cancel)

    def subscribe(self, match: Match) -> Subscriber:
        """A new subscriber; once its live_from is set, every event after it committed from
        now on reaches it."""
        sub = Subscriber(match)
        self.subscribers.add(sub)
        if sub.key is None:
            self.unkeyed.add(sub)
        else:
            self.keyed.setdefault(sub.key, set()).add(sub)
        self._wanted.set()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        if sub.key is None:
            self.unkeyed.discard(sub)
        elif sub in self.keyed.get(sub.key, ()):
            self.keyed[sub.key].discard(sub)
            if not self.keyed[sub.key]:
                del self.keyed[sub.key]

    async def _follow(self) -> None:
        cursor = None
        while True:
            if not self.subscribers:  # with nobody listening, it sleeps: emits pay nothing for it
                cursor = None
                self._wanted.clear()
                await self._wanted.wait()
                continue
            # Events up to every subscriber's live_from reach it by its own catch-up read,
            # so the cursor may start there; a later one only re-reads events nobody skips.
            known = [sub.live_from for sub in self.subscribers if sub.live_from is not None]
            if not known:  # subscribers that are still being set up
                # Soon ready: look again shortly, as a commit heard meanwhile wakes nobody later.
                await self.store.wait_for_commit(POLL)
                continue
            floor = min(known)
            cursor = floor if cursor is None else max(cursor, floor)
            try:
                async for events in stored_after(self.store, cursor, Match(), self.read_chunk):
                    cursor = events[-1].position
                    self._fan_out(events)
                    self.fanned_out = cursor  # every stream has what matched up to here
            except StoreError as exc:  # the store is failing: streams wait, then go on from the cursor
                logger.warning("stream follower: %s", exc)
            except Exception:  # a bug: say so, and keep following
                logger.exception("stream follower failed")
            await self.store.wait_for_commit(FOLLOW_WAIT)

    async def _tick(self) -> None:
        """Progress marks and pings, from one timer for every stream: each period, each idle
        stream is looked at once, a slice at a time so that they are spread over the period,
        and woken if a mark is due (it is filtered, events it did not want have gone by since it
        last sent, and it has sent no mark for MARK_EVERY) or a ping (it has sent nothing for
        `ping` seconds). A timer of each stream's own would wake every one of them at once."""
        period = min(MARK_EVERY, self.ping)
        while True:
            if not self.subscribers:
                await self._wanted.wait()
            subs = list(self.subscribers)
            for part in range(TICK_SLICES):
                await asyncio.sleep(period / TICK_SLICES)
                now, fanned_out = time.monotonic(), self.fanned_out
                for sub in subs[part::TICK_SLICES]:
                    if sub.due or sub.closed:
                        continue
                    mark = sub.filtered and fanned_out > sub.sent and now - sub.marked_at >= MARK_EVERY - 0.01
                    if mark or now - sub.sent_at >= self.ping - 0.01:
                        sub.due = True
                        sub.wake.set()

    def candidates(self, event: StoredEvent) -> list:
        """The subscribers that may want the event: those filtered on one of its values, by
        their key, and those without a key. Each is listed once."""
        found = list(self.unkeyed)
        keyed = self.keyed
        if keyed:
            for field in KEY_ORDER:
                found += keyed.get((field, event[field]), ())
            own = event.aggregate_id if event.aggregate_type == "workflow_aggregate" else None
            for workflow_id in {own, event.correlation_id} - {None}:
                found += keyed.get((WORKFLOW_KEY, workflow_id), ())
        return found

    def _fan_out(self, events: list) -> None:
        """Hand each event to the streams it matches, in order: an event costs what its
        candidate streams cost, not what all streams do."""
        offered: dict = {}  # the subscribers given an event, in a stable order
        for event in events:
            message = None
            for sub in self.candidates(event):
                if sub.behind:
                    continue
                for index, value in sub.filters:
                    if event[index] != value:
                        break
                else:
                    if sub.workflow is None or in_workflow(event, sub.workflow):
                        message = message or (event.position, sse_bytes(event))
                        sub.buffer.append(message)
                        sub.buffered += len(message[1])
                        offered[sub] = None
        for sub in offered:
            buffer = sub.buffer
            if sub.buffered > self.buffer_bytes:
                sub.behind = True
                buffer.clear()
                sub.buffered = 0
                self.overflows += 1
            if buffer or sub.behind:
                sub.wake.set()


# =============================================================================
# 5. OpenTelemetry in: OTLP traces as events
# =============================================================================
# POST /v1/traces takes what the stock OTLP/HTTP exporters send, protobuf or JSON, and
# stores each span as events of the log, so that traces of agent frameworks (GenAI semantic
# conventions) show as workflows, agents and their calls:
#   a trace is a workflow (its id: the trace id, 32 hex digits); its root span, when it comes,
#     gives the workflow `workflow.started` and `workflow.completed` or `workflow.failed`;
#   a span of gen_ai.operation.name `invoke_agent` is an agent run (its id: the span id, 16 hex
#     digits): `agent.started` and `agent.completed` or `agent.failed`;
#   any other span is a call, one system event named after its operation and outcome
#     (`execute_tool.completed`, `chat.failed`, `span.completed`), under the span's id.
# Each event names the span's parent in causation_id (the trace id for a root), so that the
# ancestry lives in the log itself: an agent's parent, and the agent a call belongs to, is
# the nearest agent up that chain, found when the workflow is read (resolve_parents,
# call_owners), whatever order the spans came in. Event ids are made from the span's ids,
# and a span's events from its content alone, so a span exported again stores nothing new.
# Both readers check the wire format as they go and raise OtlpError (400) at the first
# thing that is not what the schema says.


class OtlpError(ValueError):
    """The body is not an OTLP export request that can be read."""


class Span(NamedTuple):
    """A span as both readers give it."""

    trace_id: str  # lowercase hex, as sent (checked by span_events)
    span_id: str
    parent_span_id: str  # "" for a root
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict
    events: list  # (time_ns, name, attributes)
    links: list  # (trace_id, span_id, attributes)
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    resource: dict
    scope: dict  # name, version


SPAN_KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
STATUS_CODES = ("UNSET", "OK", "ERROR")
WIRE_DEPTH = 32  # nested arrays and maps in one attribute value, at most
OTLP_JSON_DEPTH = 3 * WIRE_DEPTH + 16  # JSON levels that holds, in OTLP's JSON


# -- 5.1 the protobuf wire format ---------------------------------------------------------


def wire_fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """The fields of the message in buf[pos:end] as (number, wire type, a, b): a varint's
    value in a; where a length-delimited field's bytes begin and end in a and b; where a
    fixed field's bytes begin in a."""
    while pos < end:
        key, pos = varint(buf, pos, end)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, pos = varint(buf, pos, end)
            yield number, 0, value, 0
            continue
        if kind == 2:
            size, start = varint(buf, pos, end)
            pos = start + size
        elif kind == 1 or kind == 5:
            start, pos = pos, pos + (8 if kind == 1 else 4)
        else:
            raise OtlpError(f"field {number} at byte {pos} has wire type {kind}, which OTLP does not use")
        if pos > end:
            raise OtlpError(f"field {number} at byte {start} runs past the end of its message")
        yield number, kind, start, pos


def varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at buf[pos], and the position after it."""
    result = shift = 0
    while True:
        if pos >= end:
            raise OtlpError(f"a number is cut off at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise OtlpError(f"a number at byte {pos} is longer than 10 bytes")


def wire_text(buf: bytes, start: int, end: int) -> str:
    try:
        return buf[start:end].decode()
    except UnicodeDecodeError:
        raise OtlpError(f"a string at byte {start} is not valid UTF-8") from None


def wire_value(buf: bytes, pos: int, end: int, depth: int = 0) -> Any:
    """An AnyValue as a JSON value (bytes as base64 text); None when it holds none."""
    if depth > WIRE_DEPTH:
        raise OtlpError(f"an attribute value is nested deeper than {WIRE_DEPTH} levels")
    value: Any = None
    for number, kind, a, b in wire_fields(buf, pos, end):
        if number == 1 and kind == 2:
            value = wire_text(buf, a, b)
        elif number == 2 and kind == 0:
            value = bool(a)
        elif number == 3 and kind == 0:
            value = a - (1 << 64) if a >= 1 << 63 else a
        elif number == 4 and kind == 1:
            value = finite(struct.unpack_from("<d", buf, a)[0])
        elif number == 5 and kind == 2:
            value = [wire_value(buf, s, e, depth + 1) for n, k, s, e in wire_fields(buf, a, b) if n == 1 and k == 2]
        elif number == 6 and kind == 2:
            value = wire_attributes(buf, a, b, depth + 1)
        elif number == 7 and kind == 2:
            value = base64.b64encode(buf[a:b]).decode()
    return value


def wire_attributes(buf: bytes, pos: int, end: int, depth: int = 0) -> dict:
    """The KeyValues of a KeyValueList (field 1 of the message in buf[pos:end]) as a dict."""
    return dict(wire_key_value(buf, a, b, depth) for n, k, a, b in wire_fields(buf, pos, end) if n == 1 and k == 2)


def wire_key_value(buf: bytes, pos: int, end: int, depth: int = 0) -> tuple[str, Any]:
    # The usual shape first: a short key (field 1), then a value (field 2) that is one short
    # string (field 1), read without walking the fields; anything else walks them.
    if end - pos > 4 and buf[pos] == 0x0A and buf[pos + 1] < 0x80:
        stop = pos + 2 + buf[pos + 1]
        if stop + 3 < end and buf[stop] == 0x12 and buf[stop + 1] < 0x80 and stop + 2 + buf[stop + 1] == end:
            inner = stop + 2
            if buf[inner] == 0x0A and buf[inner + 1] < 0x80 and inner + 2 + buf[inner + 1] == end:
                return wire_text(buf, pos + 2, stop), wire_text(buf, inner + 2, end)
    key, value = "", None
    for number, kind, a, b in wire_fields(buf, pos, end):
        if number == 1 and kind == 2:
            key = wire_text(buf, a, b)
        elif number == 2 and kind == 2:
            value = wire_value(buf, a, b, depth)
    return key, value


def read_protobuf(buf: bytes) -> list[Span]:
    """The spans of an ExportTraceServiceRequest in the protobuf wire format."""
    spans: list[Span] = []
    for number, kind, rs, re_ in wire_fields(buf, 0, len(buf)):
        if number != 1 or kind != 2:  # resource_spans
            continue
        resource: dict = {}
        scopes = []
        for field, kind_, a, b in wire_fields(buf, rs, re_):
            if field == 1 and kind_ == 2:  # the Resource: its attributes are field 1
                resource = wire_attributes(buf, a, b)
            elif field == 2 and kind_ == 2:
                scopes.append((a, b))
        for ss, se in scopes:
            scope = {"name": "", "version": ""}
            for field, kind_, a, b in wire_fields(buf, ss, se):
                if field == 1 and kind_ == 2:
                    for f, k, c, d in wire_fields(buf, a, b):
                        if f in (1, 2) and k == 2:
                            scope["name" if f == 1 else "version"] = wire_text(buf, c, d)
                elif field == 2 and kind_ == 2:
                    spans.append(wire_span(buf, a, b, resource, scope))
    return spans


def wire_span(buf: bytes, pos: int, end: int, resource: dict, scope: dict) -> Span:
    ids = ["", "", "", "", ""]  # by field number: 1 trace_id, 2 span_id, 4 parent_span_id
    name, span_kind, start, stop, code, message = "", 0, 0, 0, 0, ""
    attributes: dict = {}
    events: list = []
    links: list = []
    for number, kind, a, b in wire_fields(buf, pos, end):
        if kind == 2:
            if number in (1, 2, 4):
                ids[number] = buf[a:b].hex()
            elif number == 5:
                name = wire_text(buf, a, b)
            elif number == 9:
                key, value = wire_key_value(buf, a, b)
                attributes[key] = value
            elif number == 11:
                events.append(wire_event(buf, a, b))
            elif number == 13:
                links.append(wire_link(buf, a, b))
            elif number == 15:
                for f, k, c, d in wire_fields(buf, a, b):
                    if f == 2 and k == 2:
                        message = wire_text(buf, c, d)
                    elif f == 3 and k == 0:
                        code = c
        elif number == 6 and kind == 0:
            span_kind = a
        elif number == 7 and kind == 1:
            start = int.from_bytes(buf[a : a + 8], "little")
        elif number == 8 and kind == 1:
            stop = int.from_bytes(buf[a : a + 8], "little")
    return Span(
        ids[1], ids[2], ids[4], name, span_kind, start, stop, attributes, events, links, code, message, resource, scope
    )


def wire_event(buf: bytes, pos: int, end: int) -> tuple[int, str, dict]:
    moment, name, attributes = 0, "", {}
    for number, kind, a, b in wire_fields(buf, pos, end):
        if number == 1 and kind == 1:
            moment = int.from_bytes(buf[a : a + 8], "little")
        elif number == 2 and kind == 2:
            name = wire_text(buf, a, b)
        elif number == 3 and kind == 2:
            key, value = wire_key_value(buf, a, b)
            attributes[key] = value
    return moment, name, attributes


def wire_link(buf: bytes, pos: int, end: int) -> tuple[str, str, dict]:
    trace_id, span_id, attributes = "", "", {}
    for number, kind, a, b in wire_fields(buf, pos, end):
        if number == 1 and kind == 2:
            trace_id = buf[a:b].hex()
        elif number == 2 and kind == 2:
            span_id = buf[a:b].hex()
        elif number == 4 and kind == 2:
            key, value = wire_key_value(buf, a, b)
            attributes[key] = value
    return trace_id, span_id, attributes


def wire_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def wire_message(number: int, payload: bytes) -> bytes:
    """Field `number`, length-delimited, in the wire format (for the replies)."""
    return wire_varint(number << 3 | 2) + wire_varint(len(payload)) + payload


def finite(number: float) -> float | str:
    """A double as JSON holds it: NaN and the infinities as the strings OTLP's JSON uses."""
    if math.isfinite(number):
        return number
    return "NaN" if math.isnan(number) else "Infinity" if number > 0 else "-Infinity"


# -- 5.2 OTLP's JSON mapping --------------------------------------------------------------


def json_field(obj: dict, key: str, kind: type | tuple, where: str, default: Any = None) -> Any:
    """obj[key] if it is of `kind`; `default` where it is missing or null (protobuf's JSON
    says null is the default value)."""
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise OtlpError(f"{where}.{key}: must be {JSON_KINDS.get(kind, 'of another type')}")
    return value


JSON_KINDS = {
    list: "a list",
    dict: "an object",
    str: "a string",
    bool: "true or false",
    (int, str): "an integer or a string of digits",
    (int, float, str): "a number",
}


def json_int(obj: dict, key: str, where: str) -> int:
    """A 64-bit integer, given as a JSON number or a string of digits."""
    value = json_field(obj, key, (int, float, str), where, 0)
    if isinstance(value, float):  # JSON's 5.0 is the integer 5
        if not value.is_integer():
            raise OtlpError(f"{where}.{key}: must be an integer or a string of digits")
        value = int(value)
    if isinstance(value, str):
        if not JSON_DIGITS.fullmatch(value):
            raise OtlpError(f"{where}.{key}: must be an integer or a string of digits")
        value = int(value)
    return value


JSON_DIGITS = re.compile(r"-?[0-9]{1,20}")


def json_enum(obj: dict, key: str, where: str, names: Sequence[str]) -> int:
    """An enum: an integer, as OTLP's JSON says, or its name in the .proto, as protobuf's
    JSON writers give it."""
    value = obj.get(key)
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        if value not in names:
            raise OtlpError(f"{where}.{key}: {value!r} is none of {', '.join(names)}")
        return names.index(value)
    return json_int(obj, key, where)


SPAN_KIND_NAMES = [f"SPAN_KIND_{kind.upper()}" for kind in SPAN_KINDS]
STATUS_CODE_NAMES = [f"STATUS_CODE_{code}" for code in STATUS_CODES]


def json_value(value: Any, where: str, depth: int = 0) -> Any:
    """An AnyValue of OTLP's JSON as a JSON value: each of its fields is checked, the first
    one given is the value (bytes stay base64 text)."""
    if depth > WIRE_DEPTH:
        raise OtlpError(f"{where}: nested deeper than {WIRE_DEPTH} levels")
    if not isinstance(value, dict):
        raise OtlpError(f"{where}: must be an object")
    found = []
    if value.get("stringValue") is not None:
        found.append(json_field(value, "stringValue", str, where))
    if value.get("boolValue") is not None:
        found.append(json_field(value, "boolValue", bool, where))
    if value.get("intValue") is not None:
        found.append(json_int(value, "intValue", where))
    if value.get("doubleValue") is not None:
        number = json_field(value, "doubleValue", (int, float, str), where)
        if isinstance(number, str) and number not in ("NaN", "Infinity", "-Infinity"):
            raise OtlpError(f"{where}.doubleValue: must be a number, NaN, Infinity or -Infinity")
        found.append(number)
    if value.get("arrayValue") is not None:
        items = json_field(json_field(value, "arrayValue", dict, where), "values", list, where + ".arrayValue", [])
        found.append([json_value(item, f"{where}.arrayValue.values[{i}]", depth + 1) for i, item in enumerate(items)])
    if value.get("kvlistValue") is not None:
        pairs = json_field(json_field(value, "kvlistValue", dict, where), "values", list, where + ".kvlistValue", [])
        found.append(json_attributes(pairs, where + ".kvlistValue.values", depth + 1))
    if value.get("bytesValue") is not None:
        found.append(json_field(value, "bytesValue", str, where))
    return found[0] if found else None


def json_attributes(pairs: Any, where: str, depth: int = 0) -> dict:
    if not isinstance(pairs, list):
        raise OtlpError(f"{where}: must be a list")
    attributes = {}
    for i, pair in enumerate(pairs):
        at = f"{where}[{i}]"
        if not isinstance(pair, dict):
            raise OtlpError(f"{at}: must be an object")
        value = pair.get("value")
        attributes[json_field(pair, "key", str, at, "")] = (
            None if value is None else json_value(value, at + ".value", depth)
        )
    return attributes


def read_json(body: Any) -> list[Span]:
    """The spans of an ExportTraceServiceRequest in OTLP's JSON mapping: hex ids, enums as
    integers, 64-bit integers as numbers or strings, unknown keys ignored."""
    if not isinstance(body, dict):
        raise OtlpError("the body must be a JSON object with resourceSpans")
    spans: list[Span] = []
    for r, rs in enumerate(json_field(body, "resourceSpans", list, "body", [])):
        at = f"resourceSpans[{r}]"
        if not isinstance(rs, dict):
            raise OtlpError(f"{at}: must be an object")
        resource_obj = json_field(rs, "resource", dict, at, {})
        resource = json_attributes(
            json_field(resource_obj, "attributes", list, at + ".resource", []), at + ".resource.attributes"
        )
        for s, ss in enumerate(json_field(rs, "scopeSpans", list, at, [])):
            at_scope = f"{at}.scopeSpans[{s}]"
            if not isinstance(ss, dict):
                raise OtlpError(f"{at_scope}: must be an object")
            scope_obj = json_field(ss, "scope", dict, at_scope, {})
            scope = {
                "name": json_field(scope_obj, "name", str, at_scope + ".scope", ""),
                "version": json_field(scope_obj, "version", str, at_scope + ".scope", ""),
            }
            for n, span in enumerate(json_field(ss, "spans", list, at_scope, [])):
                spans.append(json_span(span, f"{at_scope}.spans[{n}]", resource, scope))
    return spans


def json_span(span: Any, at: str, resource: dict, scope: dict) -> Span:
    if not isinstance(span, dict):
        raise OtlpError(f"{at}: must be an object")
    status = json_field(span, "status", dict, at, {})
    events = []
    for i, event in enumerate(json_field(span, "events", list, at, [])):
        where = f"{at}.events[{i}]"
        if not isinstance(event, dict):
            raise OtlpError(f"{where}: must be an object")
        events.append(
            (
                json_int(event, "timeUnixNano", where),
                json_field(event, "name", str, where, ""),
                json_attributes(json_field(event, "attributes", list, where, []), where + ".attributes"),
            )
        )
    links = []
    for i, link in enumerate(json_field(span, "links", list, at, [])):
        where = f"{at}.links[{i}]"
        if not isinstance(link, dict):
            raise OtlpError(f"{where}: must be an object")
        links.append(
            (
                json_field(link, "traceId", str, where, "").lower(),
                json_field(link, "spanId", str, where, "").lower(),
                json_attributes(json_field(link, "attributes", list, where, []), where + ".attributes"),
            )
        )
    return Span(
        json_field(span, "traceId", str, at, "").lower(),
        json_field(span, "spanId", str, at, "").lower(),
        json_field(span, "parentSpanId", str, at, "").lower(),
        json_field(span, "name", str, at, ""),
        json_enum(span, "kind", at, SPAN_KIND_NAMES),
        json_int(span, "startTimeUnixNano", at),
        json_int(span, "endTimeUnixNano", at),
        json_attributes(json_field(span, "attributes", list, at, []), at + ".attributes"),
        events,
        links,
        json_enum(status, "code", at + ".status", STATUS_CODE_NAMES),
        json_field(status, "message", str, at + ".status", ""),
        resource,
        scope,
    )


# -- 5.3 spans as events ------------------------------------------------------------------

HEX_ID = {16: re.compile(r"[0-9a-f]{32}"), 8: re.compile(r"[0-9a-f]{16}")}  # by bytes: trace, span ids
OPERATION = re.compile(r"[a-z][a-z0-9_]{0,63}")  # an operation name that may name an event


def otel_time(nanoseconds: int) -> str:
    seconds, rest = divmod(nanoseconds, 1_000_000_000)
    return format_timestamp(datetime.fromtimestamp(seconds, timezone.utc).replace(microsecond=rest // 1000))


def span_event_id(span: Span, role: str) -> str:
    """The id of a span's event of this role, the same whenever the span is exported again: a
    UUID of version 8 (made by this server's own rule) from a hash of the span's ids."""
    h = hashlib.sha256(f"{span.trace_id}:{span.span_id}:{role}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-8{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def is_agent(span: Span) -> bool:
    operation = span.attributes.get("gen_ai.operation.name")
    return operation == "invoke_agent" or (operation is None and span.name.startswith("invoke_agent"))


def span_problem(span: Span) -> str | None:
    """Why the span cannot be stored, or None."""
    if not HEX_ID[16].fullmatch(span.trace_id) or span.trace_id == "0" * 32:
        return f"span {span.span_id or '?'}: trace_id must be 16 bytes, not all zero"
    if not HEX_ID[8].fullmatch(span.span_id) or span.span_id == "0" * 16:
        return f"span in trace {span.trace_id}: span_id must be 8 bytes, not all zero"
    if span.parent_span_id and not HEX_ID[8].fullmatch(span.parent_span_id):
        return f"span {span.span_id}: parent_span_id must be 8 bytes or empty"
    if not span.start_ns or span.end_ns < span.start_ns:
        return f"span {span.span_id}: it needs a start time, and an end time not before it"
    if not 0 <= span.start_ns < 253402300800 * 10**9 or span.end_ns >= 253402300800 * 10**9:
        return f"span {span.span_id}: its times are past the year 9999"
    name = span.attributes.get("gen_ai.agent.name")
    if isinstance(name, str) and "\x00" in name:
        return f"span {span.span_id}: gen_ai.agent.name holds NUL"
    return None


def span_events(span: Span) -> list[NewEvent]:
    """The events that store `span` (see the start of this section); span_problem(span) must
    be None."""
    ended = STATUS_CODES[span.status_code] if 0 <= span.status_code < 3 else str(span.status_code)
    outcome = "failed" if span.status_code == 2 else "completed"
    start, end = otel_time(span.start_ns), otel_time(span.end_ns)
    cause = span.parent_span_id or span.trace_id  # a root's cause is its workflow
    exceptions = [
        {"type": attributes.get("exception.type"), "message": attributes.get("exception.message")}
        for _, name, attributes in span.events
        if name == "exception"
    ]
    ids = {
        "otel.trace_id": span.trace_id,
        "otel.span_id": span.span_id,
        "otel.parent_span_id": span.parent_span_id or None,
    }
    ending = {
        **ids,
        "otel.end_time": end,
        "otel.duration_ms": round((span.end_ns - span.start_ns) / 1e6, 3),
        "otel.status_code": ended,
        **({"otel.status_description": span.status_message} if span.status_message else {}),
        **({"otel.exceptions": exceptions} if exceptions else {}),
    }
    whole = {
        **span.attributes,
        "otel.span.name": span.name,
        "otel.span.kind": SPAN_KINDS[span.kind] if 0 <= span.kind < 6 else str(span.kind),
        "otel.start_time": start,
        **ending,
        **(
            {"otel.events": [{"name": n, "time": otel_time(t), "attributes": a} for t, n, a in span.events]}
            if span.events
            else {}
        ),
        **(
            {"otel.links": [{"trace_id": t, "span_id": s, "attributes": a} for t, s, a in span.links]}
            if span.links
            else {}
        ),
        "otel.scope": span.scope,
        "otel.resource": span.resource,
    }
    if "service.name" in span.resource:
        whole.setdefault("service.name", span.resource["service.name"])
    events = []

    def event(kind: str, role: str, name: str, moment: str, attributes: dict, aggregate_id: str, **fields: Any) -> None:
        aggregate_type, event_type, _label = KINDS[kind]
        text = compact_json(attributes)
        content = "\x1f".join([kind, name, moment, aggregate_id, span.trace_id, cause, text])  # ids hold no \x1f
        events.append(
            NewEvent(
                kind=kind,
                event_id=span_event_id(span, role),
                client_event_id=True,
                aggregate_type=aggregate_type,
                aggregate_id=aggregate_id,
                fresh=True,
                event_type=event_type,
                name=name,
                timestamp=moment,
                attributes=text,
                correlation_id=None if kind == "workflow" else span.trace_id,
                causation_id=cause,
                agent_name=fields.get("agent_name"),
                user_prompt=None,
                session_id=aggregate_id if kind == "system" else None,
                expected_version=None,
                content_hash=hashlib.sha256(content.encode()).hexdigest(),
            )
        )

    root = not span.parent_span_id
    if root:
        event("workflow", "workflow.started", "workflow.started", start, whole, span.trace_id)
    if is_agent(span):
        name = span.attributes.get("gen_ai.agent.name")
        agent_name = name if isinstance(name, str) else None
        event("agent", "agent.started", "agent.started", start, whole, span.span_id, agent_name=agent_name)
        event("agent", "agent.ended", f"agent.{outcome}", end, ending, span.span_id, agent_name=agent_name)
    elif not root:
        operation = span.attributes.get("gen_ai.operation.name")
        operation = operation if isinstance(operation, str) and OPERATION.fullmatch(operation) else "span"
        event("system", "call", f"{operation}.{outcome}", start, whole, span.span_id)
    if root:
        event("workflow", "workflow.ended", f"workflow.{outcome}", end, ending, span.trace_id)
    return events


def trace_events(spans: list[Span]) -> tuple[list[tuple[str, list[NewEvent]]], list[str]]:
    """Each storable span's id and events, and why each other span is left out."""
    stored, problems = [], []
    for span in spans:
        problem = span_problem(span)
        if problem is None:
            stored.append((span.span_id, span_events(span)))
        else:
            problems.append(problem)
    return stored, problems


# =============================================================================
# 6. HTTP
# =============================================================================
# What a request meets, in the order it meets it, is the end of this section: ROUTES, the
# gate (6.9) and create_app. Before them, the endpoints and what they share.
#   6.1 replies and errors   6.2 the emit routes   6.3 OTLP traces   6.4 reads
#   6.5 health, the root and the pages   6.6 the stream   6.7 metrics   6.8 logs
#   6.9 the gate   6.10 background tasks   6.11 routes and the application

# -- 6.1 replies and errors ---------------------------------------------------------------

JSON_TYPE = "application/json"


def json_response(content: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(compact_json(content), status_code=status, media_type=JSON_TYPE, headers=headers)


# Store errors as HTTP replies: the one place where the store's domain errors get a status.
STORE_ERRORS = ((StoreUnavailable, 503), (Conflict, 409), (StoreError, 500))


def store_problem(exc: StoreError) -> Problem:
    status = next(code for kind, code in STORE_ERRORS if isinstance(exc, kind))
    extra = {"current_version": exc.current_version} if isinstance(exc, VersionConflict) else {}
    return Problem(status, str(exc), **extra)


def problem_json(exc: Problem) -> str:
    return compact_json({"detail": exc.detail, **exc.extra})


def error_reply(exc: Exception) -> tuple[int, str, Sequence]:
    """An endpoint's exception as (status, JSON body, headers): the one place where errors
    become replies."""
    if isinstance(exc, StoreError):
        exc = store_problem(exc)
    if isinstance(exc, Problem):
        return exc.status, problem_json(exc), ()
    if isinstance(exc, HTTPException):
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
        return exc.status_code, compact_json({"detail": exc.detail}), headers
    return 500, '{"detail":"Internal Server Error"}', ()


json_string = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept as is


async def send_json(send: Send, body: str, status: int = 200, headers: Sequence = ()) -> None:
    await send_bytes(send, body.encode(), JSON_TYPE, status, headers)


async def send_bytes(send: Send, body: bytes, content_type: str, status: int = 200, headers: Sequence = ()) -> None:
    """A whole reply in two messages, without Response objects (the emit routes' hot path)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body)), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ASGIEndpoint:
    """An ASGI function that a Route serves as it is (Route takes a function for
    `request -> response`, and passes anything else through as an ASGI app)."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        return self.app(scope, receive, send)


def asgi_endpoint(endpoint: Callable) -> Callable:
    """The route's endpoint as an ASGI function: ASGIEndpoints as they are; a function of a
    Request to a Response called with one."""
    if isinstance(endpoint, ASGIEndpoint):
        return endpoint.app

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        response = await endpoint(Request(scope, receive))
        await response(scope, receive, send)

    return app


# -- 6.2 the emit routes: the hot path ----------------------------------------------------
# Every agent hook POSTs here, so these endpoints are plain ASGI functions (Starlette's
# Route passes an endpoint that is not a function through as an ASGI app): one pass over
# the headers, no Request or Response objects, the reply written as JSON text directly.

BODY_IN_HAND = "eventuali.body_in_hand"  # in the scope: the server has the whole body (see protocol_with_head_timeout)


def body_headers(scope: Scope) -> tuple[bytes, list[bytes], bytes, bytes]:
    """(media type, its options, Content-Length, Content-Encoding), lowercased."""
    content_type = length = encoding = b""
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            length = value
        elif name == b"content-encoding":
            encoding = value.strip().lower()
    media, *options = [part.strip().lower() for part in content_type.split(b";")]
    return media, options, length, encoding


def check_charset(options: list[bytes]) -> None:
    for option in options:
        name, _, charset = option.partition(b"=")
        if name.strip() == b"charset" and charset.strip(b' "') not in (b"utf-8", b"utf8"):
            raise Problem(415, f"the body must be UTF-8, not {charset.strip(b' ').decode('latin-1')!r}")


async def receive_json(scope: Scope, receive: Receive, config: APIServerConfig) -> Any:
    """The request's JSON body: 415 unless it is JSON, 413 as soon as it passes max_body."""
    media, options, length, _encoding = body_headers(scope)
    if media and media != b"application/json" and not media.endswith(b"+json"):
        raise Problem(415, f"content type must be {JSON_TYPE}, not {media.decode('latin-1')!r}")
    check_charset(options)
    body = await receive_body(scope, receive, length, config.max_body, config.request_timeout)
    return parse_json(body, config.max_depth)


async def receive_body(scope: Scope, receive: Receive, length: bytes, limit: int, seconds: float) -> bytearray:
    """The request's body: 413 as soon as it passes `limit` bytes (or says it will), 408 when
    it stalls for `seconds`, 400 when the client leaves before the end."""
    too_large = f"request body is larger than {limit} bytes"
    if length.isdigit() and int(length) > limit:
        raise Problem(413, too_large)
    body = bytearray()

    def take(message: Message) -> bool:
        """Add a part of the body; whether more follows."""
        if message["type"] == "http.disconnect":
            raise Problem(400, "the client closed the connection before sending the whole body")
        body.extend(message.get("body", b""))
        if len(body) > limit:
            raise Problem(413, too_large)
        return bool(message.get("more_body"))

    stalled = f"the body stalled for more than {seconds:g} s"
    if scope.get(BODY_IN_HAND):
        while take(await receive()):
            pass
    elif sys.version_info >= (3, 11):  # one timer for the whole body, moved on at each part
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(seconds) as timer:
                while take(await receive()):
                    timer.reschedule(loop.time() + seconds)
        except TimeoutError:
            raise Problem(408, stalled) from None
    else:
        try:
            while take(await asyncio.wait_for(receive(), seconds)):
                pass
        except asyncio.TimeoutError:
            raise Problem(408, stalled) from None
    return body


def emit_reply(event: NewEvent, receipt: Receipt) -> str:
    """The original's emit reply, as JSON text (ids, timestamps and numbers need no escaping)."""
    message = json_string(f"{KINDS[event.kind][2]} event '{event.name}' emitted successfully")
    return (
        f'{{"success":true,"event_id":"{receipt.event_id}","message":{message},'
        f'"timestamp":"{receipt.timestamp}","position":{receipt.position},'
        f'"aggregate_id":{json_string(receipt.aggregate_id)},"aggregate_version":{receipt.version}}}'
    )


def emit_one(kind: str) -> ASGIEndpoint:
    """POST /events/emit/{kind}: one event."""

    async def emit(scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state
        body = await receive_json(scope, receive, state.config)
        errors: list = []
        event = prepare_event(kind, body, ["body"], errors, state.fields)
        if event is None:
            raise Problem(422, errors)
        [receipt] = await state.store.append([event])
        await send_json(send, emit_reply(event, receipt))

    return ASGIEndpoint(emit)


async def emit_batch(scope: Scope, receive: Receive, send: Send) -> None:
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
        errors.append(invalid(["body", "events"], f"must hold 1 to {config.max_batch} events", "value_error.list.size"))
    if errors:
        raise Problem(422, errors)
    fields = state.batch_fields
    events: list[NewEvent] = []
    for index, item in enumerate(body["events"]):
        loc = ["body", "events", index]
        kind = item.get("kind") if isinstance(item, dict) else None
        if not isinstance(kind, str) or kind not in KINDS:  # the kind's spec names the problem
            check_object(item, fields, ("kind", *REQUIRED_FIELDS), loc, errors)
            continue
        event = prepare_event(kind, item, loc, errors, fields)
        if event is not None:
            events.append(event)
    if errors:
        raise Problem(422, errors)
    receipts = await state.store.append(events)
    replies = ",".join([emit_reply(event, receipt) for event, receipt in zip(events, receipts)])
    await send_json(send, '{"success":true,"events":[' + replies + "]}")


# -- 6.3 OpenTelemetry: POST /v1/traces ---------------------------------------------------

PROTOBUF_TYPE = "application/x-protobuf"
# gRPC's codes, which OTLP's error replies (google.rpc.Status) carry, by HTTP status
STATUS_CODES_RPC = {400: 3, 408: 4, 413: 8, 415: 3, 503: 14}


def read_traces(body: bytes, protobuf: bool, max_depth: int) -> tuple[list[tuple[str, list[NewEvent]]], list[str]]:
    """An export's spans as events, and why any span is left out (off the event loop)."""
    if protobuf:
        spans = read_protobuf(body)
    else:
        try:
            spans = read_json(parse_json(body, max(max_depth, OTLP_JSON_DEPTH)))
        except Problem as exc:
            raise OtlpError(exc.detail[0]["msg"] if isinstance(exc.detail, list) else str(exc.detail)) from None
    return trace_events(spans)


def gunzip(body: bytes | bytearray, limit: int) -> bytes:
    """A gzip (or zlib: HTTP's deflate) body, decompressed up to `limit` bytes (413 beyond: a
    small body may unpack to a huge one)."""
    inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)  # either header
    try:
        data = inflate.decompress(body, limit + 1)
        if not inflate.eof:
            if len(data) > limit:
                raise Problem(413, f"the body unpacks to more than {limit} bytes")
            raise Problem(400, "the compressed body is cut off")
    except zlib.error as exc:
        raise Problem(400, f"the body is not valid gzip or deflate: {exc}") from None
    return data


def otlp_reply(protobuf: bool, rejected: int = 0, message: str = "") -> tuple[str, bytes]:
    """(content type, body) of ExportTraceServiceResponse: empty, or with a partial success."""
    if protobuf:
        inner = wire_varint(1 << 3) + wire_varint(rejected) + wire_message(2, message.encode()) if rejected else b""
        return PROTOBUF_TYPE, wire_message(1, inner) if rejected else b""
    if not rejected:
        return JSON_TYPE, b"{}"
    return JSON_TYPE, compact_json(
        {"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}}
    ).encode()


async def send_otlp_error(send: Send, protobuf: bool, status: int, message: str) -> None:
    """An error as OTLP says: a google.rpc.Status in the request's encoding (with `detail`
    too in JSON, as every error of this server has)."""
    code = STATUS_CODES_RPC.get(status, 2)
    if protobuf:
        body = wire_varint(1 << 3) + wire_varint(code) + wire_message(2, message.encode())
        return await send_bytes(send, body, PROTOBUF_TYPE, status)
    await send_json(send, compact_json({"code": code, "message": message, "detail": message}), status)


async def append_spans(store: EventStore, requests: list[tuple[str, list[NewEvent]]]) -> list[Any]:
    """Each span's outcome: the export in one append (one commit) and, only if that conflicts
    with a stored span, span by span, so that the conflicting ones fail alone."""
    try:
        await store.append([event for _, events in requests for event in events])
        return [None] * len(requests)
    except Conflict:
        return await asyncio.gather(*[store.append(events) for _, events in requests], return_exceptions=True)


async def ingest_traces(scope: Scope, receive: Receive, send: Send) -> None:
    """POST /v1/traces: OTLP/HTTP, protobuf or JSON, gzip or not (see section 5)."""
    state = scope["app"].state
    config: APIServerConfig = state.config
    media, options, length, encoding = body_headers(scope)
    if media == PROTOBUF_TYPE.encode():
        protobuf = True
    elif media == b"application/json":
        protobuf = False
        check_charset(options)
    else:
        raise Problem(415, f"content type must be {PROTOBUF_TYPE} or {JSON_TYPE}, not {media.decode('latin-1')!r}")
    try:
        if encoding not in (b"", b"identity", b"gzip", b"deflate"):
            raise Problem(
                415, f"content encoding must be gzip, deflate or identity, not {encoding.decode('latin-1')!r}"
            )
        body = await receive_body(scope, receive, length, config.otlp_max_body, config.request_timeout)
        data = gunzip(body, config.otlp_max_body) if encoding in (b"gzip", b"deflate") else bytes(body)
        loop = asyncio.get_running_loop()
        requests, problems = await loop.run_in_executor(None, read_traces, data, protobuf, config.max_depth)
        outcomes = await append_spans(state.store, requests)
    except Problem as exc:
        return await send_otlp_error(send, protobuf, exc.status, str(exc.detail))
    except OtlpError as exc:
        return await send_otlp_error(send, protobuf, 400, f"the body is not an OTLP trace export: {exc}")
    except StoreUnavailable as exc:
        return await send_otlp_error(send, protobuf, 503, str(exc))
    failed = next((o for o in outcomes if isinstance(o, StoreUnavailable)), None)
    if failed is not None:  # some spans may be stored: the exporter's retry finds them (idempotent)
        return await send_otlp_error(send, protobuf, 503, str(failed))
    refused = 0
    for (span_id, _events), outcome in zip(requests, outcomes):
        if isinstance(outcome, Conflict):  # the same span ids, other content: stored before
            problems.append(f"span {span_id}: {outcome}")
            refused += 1
        elif isinstance(outcome, BaseException):
            raise outcome
    state.otlp_spans["stored"] += len(requests) - refused
    state.otlp_spans["rejected"] += len(problems)
    message = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
    content_type, reply = otlp_reply(protobuf, len(problems), message)
    await send_bytes(send, reply, content_type)


# -- 6.4 reads: lists of events, the workflows, a workflow's agents ----------------------


async def list_reply(store: EventStore, page: Page, params: dict, read_chunk: int) -> Response:
    """The page's events, read and sent in parts of about `read_chunk` bytes, so that a page of
    big events is never whole in memory; the first part is read before the reply starts, so
    that a store that cannot serve answers 503."""
    reply = {"total": page.total, "limit": params["limit"], "offset": params["offset"], "next": page.next}
    pruned = await pruned_past(store, params.get("after"))
    if pruned is not None:
        reply["pruned_through"] = pruned
    tail = compact_json(reply)
    size = ReadSize(read_chunk, len(page.positions) or 1)
    first = await store.events_at(page.positions[: size.count])
    rest = page.positions[size.count :]
    size.saw([len(event.json) for event in first])
    if not rest:  # the usual page: all of it at once
        return Response('{"events":[' + ",".join([e.json for e in first]) + "]," + tail[1:], media_type=JSON_TYPE)

    async def parts() -> AsyncIterator[bytes]:
        nonlocal rest
        events = first
        yield ('{"events":[' + ",".join([e.json for e in events])).encode()
        while rest:
            events = await store.events_at(rest[: size.count])
            rest = rest[size.count :]
            size.saw([len(event.json) for event in events])
            yield ("," + ",".join([e.json for e in events])).encode()
        yield ("]," + tail[1:]).encode()

    return StreamingResponse(parts(), media_type=JSON_TYPE)


async def pruned_past(store: EventStore, after: int | None) -> int | None:
    """Where retention has removed the log up to, when that is past the cursor `after`: the
    events between them are gone, and the reply says so."""
    if after is None:
        return None
    pruned = (await store.extent()).pruned_through
    return pruned if after < pruned else None


def page_query(params: dict, agent: str | None = None, workflow: str | None = None) -> Query:
    given = params.get("workflow_id")
    return Query(
        Match(
            {name: params.get(name) for name in STREAM_FILTERS},
            agent,
            workflow if workflow is not None else given,
            nothing=None not in (workflow, given) and workflow != given,  # a path's workflow and another
        ),
        since=params.get("since"),
        until=params.get("until"),
        after=params.get("after"),
        before=params.get("before"),
        order=params["order"],
        limit=params["limit"],
        offset=params["offset"],
    )


def path_id(request: Request, name: str) -> str:
    value = request.path_params[name]
    limit = request.app.state.config.max_id_length
    if len(value) > limit:
        raise Problem(
            422, [invalid(["path", name], f"must be at most {limit} characters", "value_error.any_str.max_length")]
        )
    return value


async def from_consumer(store: EventStore, params: dict) -> dict:
    """With ?consumer=NAME and no `after`: the page on from where that consumer is, oldest first."""
    if params.get("consumer") is None or params.get("after") is not None:
        return params
    consumer = await store.consumer(params["consumer"])
    return {**params, "after": consumer.position if consumer else 0, "order": "asc"}


async def list_events(request: Request) -> Response:
    state = request.app.state
    params = await from_consumer(state.store, check_query(request, state.list_params))
    return await list_reply(state.store, await state.store.query(page_query(params)), params, state.config.read_chunk)


async def agent_events(request: Request) -> Response:
    state = request.app.state
    params = await from_consumer(state.store, check_query(request, state.list_params))
    page = await state.store.query(page_query(params, agent=path_id(request, "agent_id")))
    return await list_reply(state.store, page, params, state.config.read_chunk)


async def workflow_events(request: Request) -> Response:
    state = request.app.state
    params = await from_consumer(state.store, check_query(request, state.list_params))
    if params.get("workflow_id") not in (None, request.path_params["workflow_id"]):
        problem = "names another workflow than the path: leave it out here"
        raise Problem(422, [invalid(["query", "workflow_id"], problem, "value_error.conflict")])
    page = await state.store.query(page_query(params, workflow=path_id(request, "workflow_id")))
    return await list_reply(state.store, page, params, state.config.read_chunk)


def token_cost(tokens: Sequence[int], price: dict) -> float:
    """USD for tokens by USAGE_KINDS at a price of --prices (COST_RULES): input tokens count
    the cached ones too, so only the rest is priced as input."""
    given, output, read, created = tokens[0], tokens[1], tokens[2], tokens[3]
    fresh = max(0, given - read - created)
    return (
        fresh * price["input"]
        + read * price.get("cache_read", price["input"])
        + created * price.get("cache_creation", price["input"])
        + output * price["output"]
    ) / 1e6


def usage_reply(models: ModelUsage, prices: dict) -> dict:
    """Usage by model as the API shows it: the figures summed, and the cost of the model calls
    whose model has a price (its response model's, else its request model's); cost is null
    when none has, and `unpriced_calls` says how many model calls had no price."""
    totals = [0] * len(ROLLUP_FIGURES)
    cost: float | None = None
    unpriced = 0
    for model, request_model, figures in models:
        totals = [a + b for a, b in zip(totals, figures)]
        price = prices.get(model) or prices.get(request_model)
        if price is None:
            unpriced += figures[5]
            continue
        cost = (cost or 0.0) + token_cost(figures, price)
    reply: dict = dict(zip(ROLLUP_FIGURES, totals))
    reply["cost"] = None if cost is None else round(cost, 9)
    reply["unpriced_calls"] = unpriced
    return reply


def priced(item: Any, prices: dict) -> dict:
    """A workflow or an agent with its usage as usage_reply makes it."""
    return {**item, "usage": usage_reply(item["usage"], prices)}


async def workflow_agents_handler(request: Request) -> Response:
    state = request.app.state
    check_query(request, {})
    workflow_id = path_id(request, "workflow_id")
    view = await state.store.workflow_summary(workflow_id)
    if view is None:
        raise Problem(404, f"no events of workflow {workflow_id!r}: none of its own, none correlated with it")
    prices = state.config.price_list
    return json_response(
        {"workflow": priced(view["workflow"], prices), "agents": [priced(agent, prices) for agent in view["agents"]]}
    )


async def list_workflows(request: Request) -> Response:
    """GET /events/workflows: the index of workflows, most recent activity first."""
    state = request.app.state
    params = check_query(request, WORKFLOW_INDEX_PARAMS)
    index = WorkflowIndex(
        params.get("state"),
        params.get("since"),
        params.get("until"),
        params.get("before"),
        params["limit"],
        params["offset"],
    )
    page = await state.store.workflows(index)
    prices = state.config.price_list
    return json_response(
        {
            "workflows": [priced(item, prices) for item in page.workflows],
            "total": page.total,
            "limit": index.limit,
            "offset": index.offset,
            "next": page.next,
        }
    )


# -- consumers: the server keeps each reader's place ------------------------------------------


def consumer_name(request: Request) -> str:
    name = request.path_params["name"]
    errors: list = []
    check_value(CONSUMER_FIELD, name, ["path", "name"], errors)
    if errors:
        raise Problem(422, errors)
    return name


def consumer_reply(consumer: Consumer, last: int) -> dict:
    return {
        "name": consumer.name,
        "position": consumer.position,
        "last_position": last,
        "lag": max(0, last - consumer.position),
        "updated_at": consumer.updated_at,
    }


async def ack_consumer(request: Request) -> Response:
    """POST /consumers/{name}/ack: the consumer has handled every event up to `position`."""
    state = request.app.state
    name = consumer_name(request)
    body = await receive_json(request.scope, request.receive, state.config)
    errors: list = []
    clean = check_object(body, ACK_FIELDS, ("position",), ["body"], errors)
    if errors:
        raise Problem(422, errors)
    consumer, moved = await state.store.ack(name, clean["position"])
    reply = {**consumer_reply(consumer, await state.store.last_position()), "moved": moved}
    if not moved:
        reply["detail"] = f"{name} is at {consumer.position} already: an ack of {clean['position']} changes nothing"
    return json_response(reply)


async def get_consumer(request: Request) -> Response:
    state = request.app.state
    check_query(request, {})
    name = consumer_name(request)
    consumer = await state.store.consumer(name)
    if consumer is None:
        raise Problem(404, f"no consumer {name!r}: acknowledge a position to make one")
    return json_response(consumer_reply(consumer, await state.store.last_position()))


async def list_consumers(request: Request) -> Response:
    state = request.app.state
    check_query(request, {})
    consumers, last = await state.store.consumers(), await state.store.last_position()
    return json_response({"consumers": [consumer_reply(c, last) for c in consumers], "last_position": last})


async def delete_consumer(request: Request) -> Response:
    state = request.app.state
    name = consumer_name(request)
    if not await state.store.delete_consumer(name):
        raise Problem(404, f"no consumer {name!r}")
    return json_response({"deleted": name})


# -- 6.5 health, the root and the pages ---------------------------------------------------


async def store_health(store: EventStore) -> tuple:
    """(connected, events, latency_ms, problem): read and commit a write, timed; unhealthy
    too while the last append of events failed (a tiny write may fit where events do not)."""
    started = time.perf_counter()
    timeout = store.timeout
    try:
        try:  # health answers within the timeout, whatever the readers and the queue hold
            events = await asyncio.wait_for(store.last_position(), timeout)
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"the database did not answer within {timeout:g} s") from None
        await store.check_writable()  # bounded by the store's own expiry
        problem = store.write_problem()
        if problem:
            raise StoreUnavailable(f"the last append failed: {problem}")
    except StoreError as exc:
        return False, None, round((time.perf_counter() - started) * 1000, 3), str(exc)
    return True, events, round((time.perf_counter() - started) * 1000, 3), None


async def health(request: Request) -> Response:
    # No check of the query: monitors add parameters of their own to get past caches.
    state = request.app.state
    connected, _events, _latency, problem = await store_health(state.store)
    reply = {
        "status": "healthy" if connected else "unhealthy",
        "timestamp": utc_now(),
        "api_connected": True,
        "database_connected": connected,
        "version": state.config.version,
    }
    if problem:
        reply["detail"] = problem
    return json_response(reply, 200 if connected else 503)


async def health_database(request: Request) -> Response:
    state = request.app.state
    connected, events, latency, problem = await store_health(state.store)
    reply = {
        "status": "healthy" if connected else "unhealthy",
        "timestamp": utc_now(),
        "connected": connected,
        "path": state.store.location,
        "events": None,
        "last_position": events,
        "latency_ms": latency,
        "streams": len(state.hub.subscribers),
        "oldest_position": None,
        "oldest_timestamp": None,
        "pruned_through": None,
        "size_bytes": None,
    }
    if connected:
        with contextlib.suppress(StoreError):
            extent = await state.store.extent()
            reply.update(
                events=extent.events,
                oldest_position=extent.oldest_position,
                oldest_timestamp=extent.oldest_timestamp,
                pruned_through=extent.pruned_through,
                size_bytes=extent.size_bytes,
            )
    if problem:
        reply["detail"] = problem
    return json_response(reply, 200 if connected else 503)


async def root(request: Request) -> Response:
    config = request.app.state.config
    return json_response(
        {
            "name": config.title,
            "version": config.version,
            "description": config.description,
            "endpoints": {
                "events": "/events",
                "workflows": "/events/workflows",
                "health": "/health",
                "docs": "/docs",
                "openapi": "/openapi.json",
                "ui": "/ui",
                "traces": "/v1/traces",
                "consumers": "/consumers",
                **({"metrics": "/metrics"} if config.metrics else {}),
            },
        }
    )


# The pages: the OpenAPI document (section 7) and the HTML of section 9.
async def openapi_handler(request: Request) -> Response:
    return json_response(openapi(request.app.state.config))


async def docs_handler(request: Request) -> Response:
    return HTMLResponse(docs_html(request.app.state.config))


async def ui_handler(request: Request) -> Response:
    calls = {
        "model": MODEL_OPERATIONS,
        "tool": TOOL_OPERATIONS,
        "container": CONTAINER_OPERATIONS,
        "start": START_WORDS,
    }
    return HTMLResponse(UI_PAGE.replace("__STATES__", json.dumps(STATES)).replace("__CALLS__", json.dumps(calls)))


# -- 6.6 the stream -----------------------------------------------------------------------

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no", "connection": "keep-alive"}


async def stream(request: Request) -> Response:
    state = request.app.state
    params = check_query(request, state.stream_params)
    match = Match({name: params.get(name) for name in STREAM_FILTERS}, workflow=params.get("workflow_id"))
    after = params.get("after")
    last_id = request.headers.get("last-event-id", "").strip()
    if last_id:
        if not re.fullmatch(r"[0-9]{1,19}", last_id) or int(last_id) > MAX_INT:
            raise Problem(
                422,
                [
                    invalid(
                        ["header", "last-event-id"],
                        f"must be an event position (an integer from 0 to {MAX_INT})",
                        "type_error.integer",
                    )
                ],
            )
        after = int(last_id)
    if request.method == "HEAD":  # the headers a stream would have; no body, so no subscription
        return Response(headers=SSE_HEADERS, media_type="text/event-stream")
    if after is None and params.get("consumer") is not None:
        consumer = await state.store.consumer(params["consumer"])
        after = consumer.position if consumer else 0
    hub: Hub = state.hub
    if len(hub.subscribers) >= state.config.max_streams:
        raise Problem(503, f"too many open streams (at most {state.config.max_streams}); try again later")
    sub = hub.subscribe(match)  # counted at once: streams opened together cannot all pass the check
    try:
        live_from = sub.live_from = await state.store.last_position()
        pruned = await pruned_past(state.store, after)
    except BaseException:
        hub.unsubscribe(sub)
        raise
    start = after if after is not None else live_from
    response = SSEResponse(sub, match, hub, state.store, start)
    if pruned is not None:
        response.preamble += (
            f": pruned through {pruned}: the events after {after} up to {pruned} were removed by retention\n\n"
        ).encode()
    return response


class SSEResponse(Response):
    """Sends a subscriber's events until the client leaves or the server stops."""

    def __init__(self, sub: Subscriber, match: Match, hub: Hub, store: EventStore, start: int) -> None:
        self.sub, self.match, self.hub, self.store = sub, match, hub, store
        self.start = start
        self.preamble = b"retry: 3000\n: connected\n\n"
        self.read_chunk = hub.read_chunk
        self.status_code = 200
        self.background = None
        self.init_headers(None)
        self.headers.update(SSE_HEADERS)
        self.headers["content-type"] = "text/event-stream; charset=utf-8"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            await send({"type": "http.response.body", "body": self.preamble, "more_body": True})
            async for chunk in self._messages():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-send
        except Exception as exc:
            if type(exc).__name__ != "ClientDisconnected":  # uvicorn's, raised by send() after a disconnect
                raise

    async def _messages(self) -> AsyncIterator[bytes]:
        sub, last, match = self.sub, self.start, self.match
        while not sub.closed:
            if sub.behind:
                sub.behind = False
                sub.buffer.clear()
                sub.buffered = 0
                try:  # stored events first, in reads of what the streams' budget grants
                    while not sub.closed:
                        grant = self.hub.catchup.take(self.read_chunk)
                        try:
                            size = ReadSize(grant, PAGE)
                            events = await self.store.events_after(last, match, size.count)
                            if events:
                                last = events[-1].position
                                self.hub.delivered += len(events)
                                sub.sent_at = time.monotonic()
                                yield b"".join([sse_bytes(event) for event in events])
                        finally:
                            self.hub.catchup.give(grant)
                        if len(events) < size.count:
                            break
                        size.saw([len(event.json) for event in events])
                except StoreError as exc:
                    yield f"event: error\ndata: {json.dumps({'detail': str(exc)})}\n\n".encode()
                    return
            chunk = []
            while sub.buffer:
                position, data = sub.buffer.popleft()
                sub.buffered -= len(data)
                if position > last:  # skip what the catch-up already sent
                    last = position
                    chunk.append(data)
            if chunk:
                self.hub.delivered += len(chunk)
                sub.sent_at = time.monotonic()
                yield b"".join(chunk)
                continue
            sub.wake.clear()
            if sub.buffer or sub.behind or sub.closed:
                continue
            sub.sent = last
            if not sub.due:  # else the ticker woke it while it was sending: no wake-up is coming
                await sub.wake.wait()
                if not sub.due:
                    continue
            # Due (Hub._tick): a filtered stream sends a progress mark (an `id:` alone, which
            # moves a client's Last-Event-ID without an event) at most once a second while
            # events that do not match go by: a client that reconnects, or acks what it saw,
            # skips them. Else a ping, after `ping` seconds without anything.
            sub.due = False
            now = time.monotonic()
            if sub.filtered and self.hub.fanned_out > last and now - sub.marked_at >= MARK_EVERY - 0.01:
                last = self.hub.fanned_out
                sub.sent_at = sub.marked_at = now
                yield f"id: {last}\n\n".encode()
            elif now - sub.sent_at >= self.hub.ping - 0.01:
                sub.sent_at = now
                yield b": ping\n\n"


# -- 6.7 metrics --------------------------------------------------------------------------
# What the store, the Hub and the gate count, and GET /metrics, which writes it out in
# Prometheus' text format.


class Histogram:
    """Observed values counted by bucket (their upper bounds), with their sum: what a
    Prometheus histogram shows (`metrics` writes it out)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


SECONDS_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GROUP_BOUNDS = tuple(2.0**i for i in range(13))  # 1 to 4096 events


MODEL_LABELS = 100  # distinct values of /metrics' model label, at most


class StoreStats:
    """What a store counts as it works, for /metrics: appends and commits (by the writer
    thread, the only one that writes them) and errors."""

    def __init__(self) -> None:
        self.appended: collections.Counter = collections.Counter()  # event_type -> events acknowledged
        self.group_events = Histogram(GROUP_BOUNDS)  # events per commit group
        self.commit_seconds = Histogram(SECONDS_BOUNDS)
        self.errors: collections.Counter = collections.Counter()  # (operation, kind) -> errors
        self._lock = threading.Lock()  # for errors, which several threads count
        self.prices: dict = {}  # --prices, for the cost of the calls counted
        self.tokens: collections.Counter = collections.Counter()  # (model label, kind) -> tokens
        self.model_calls: collections.Counter = collections.Counter()  # model label -> calls
        self.tool_calls = 0
        self.cost: collections.defaultdict = collections.defaultdict(float)  # model label -> USD

    def used(self, calls: list[Call]) -> None:
        """Count the calls that committed events report (USAGE_RULES), by model: the first
        MODEL_LABELS models seen by name, any other as `other`, so that clients cannot grow
        the series without bound."""
        for call in calls:
            model = call.model or call.request_model
            if model not in self.model_calls and len(self.model_calls) >= MODEL_LABELS:
                model = "other"
            self.model_calls[model] += call.model_call
            self.tool_calls += call.tool_call
            for kind, n in zip(USAGE_KINDS, call.tokens):
                if n:
                    self.tokens[model, kind] += n
            price = self.prices.get(call.model) or self.prices.get(call.request_model)
            if price is not None:
                self.cost[model] += token_cost(call.tokens, price)

    def error(self, operation: str, exc: BaseException) -> None:
        kind = (
            "unavailable" if isinstance(exc, StoreUnavailable) else "conflict" if isinstance(exc, Conflict) else "error"
        )
        with self._lock:
            self.errors[operation, kind] += 1


ACCESS_FIELDS = ("method", "route", "path", "status", "duration_ms", "client")
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
access_logger = logging.getLogger("eventuali_api_server.access")


class HttpStats:
    """Requests by route template, method and status, and their durations by route: label
    values from bounded sets only (never a raw path or an id)."""

    def __init__(self) -> None:
        self.requests: collections.Counter = collections.Counter()  # (route, method, status) -> requests
        self.seconds: dict[str, Histogram] = {}  # route -> durations

    def observe(self, scope: Scope, route: str, status: int, seconds: float, access_lines: bool) -> None:
        """Count a request answered; with access_lines log it (--log-format json)."""
        method = scope["method"] if scope["method"] in METHODS else "other"
        self.requests[route, method, status] += 1
        histogram = self.seconds.get(route) or self.seconds.setdefault(route, Histogram(SECONDS_BOUNDS))
        histogram.observe(seconds)
        if access_lines:
            client = scope.get("client")
            access_logger.info(
                "%s %s %s",
                method,
                scope["path"],
                status,
                extra={
                    "method": method,
                    "route": route,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "client": f"{client[0]}:{client[1]}" if client else None,
                },
            )


def label_value(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_metric(out: list, name: str, kind: str, help_text: str, samples: Iterable[tuple]) -> None:
    """One metric in the text exposition format 0.0.4: samples of (labels dict, value), or
    for a histogram (labels dict, Histogram)."""
    out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        if isinstance(value, Histogram):
            cumulative = 0
            for bound, count in zip([*value.bounds, "+Inf"], value.counts):
                cumulative += count
                out.append(f"{name}_bucket{format_labels({**labels, 'le': bound})} {cumulative}")
            out += [
                f"{name}_sum{format_labels(labels)} {value.sum!r}",
                f"{name}_count{format_labels(labels)} {cumulative}",
            ]
        else:
            out.append(f"{name}{format_labels(labels)} {value}")


def format_labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{label_value(value)}"' for key, value in labels.items()) + "}"


STARTED = time.time()  # the process's start, about: when the module was loaded


async def metrics(request: Request) -> Response:
    state = request.app.state
    store: EventStore = state.store
    hub: Hub = state.hub
    http: HttpStats = state.http_stats
    out: list = []
    write_metric(
        out,
        "eventuali_http_requests_total",
        "counter",
        "HTTP requests answered, by route template, method and status.",
        [({"route": r, "method": m, "status": s}, n) for (r, m, s), n in sorted(http.requests.items())],
    )
    write_metric(
        out,
        "eventuali_http_request_duration_seconds",
        "histogram",
        "Time from a request's arrival to the end of its response, by route template (a stream's: its life).",
        [({"route": route}, histogram) for route, histogram in sorted(http.seconds.items())],
    )
    stats = store.stats
    write_metric(
        out,
        "eventuali_events_appended_total",
        "counter",
        "Events acknowledged as stored by this process, by event_type (retries of stored events included).",
        [({"event_type": t}, n) for t, n in sorted(stats.appended.items())],
    )
    write_metric(
        out, "eventuali_commit_group_events", "histogram", "Events per commit group.", [({}, stats.group_events)]
    )
    write_metric(
        out,
        "eventuali_commit_duration_seconds",
        "histogram",
        "Time to store a commit group.",
        [({}, stats.commit_seconds)],
    )
    write_metric(
        out,
        "eventuali_store_errors_total",
        "counter",
        "Store errors, by operation (append, read) and kind (unavailable, conflict, error).",
        [({"operation": o, "kind": k}, n) for (o, k), n in sorted(stats.errors.items())],
    )
    write_metric(
        out,
        "eventuali_gen_ai_tokens_total",
        "counter",
        f"Tokens that events stored by this process report (USAGE_RULES in /openapi.json's Usage), by model "
        f"(the response model, else the request model; after {MODEL_LABELS} models, `other`) and kind.",
        [({"model": m, "kind": k}, n) for (m, k), n in sorted(stats.tokens.items())],
    )
    write_metric(
        out,
        "eventuali_gen_ai_model_calls_total",
        "counter",
        "Model calls that events stored by this process report, by model.",
        [({"model": m}, n) for m, n in sorted(stats.model_calls.items())],
    )
    write_metric(
        out, "eventuali_gen_ai_tool_calls_total", "counter", "Tool calls that events stored by this process report.",
        [({}, stats.tool_calls)],
    )  # fmt: skip
    write_metric(
        out,
        "eventuali_gen_ai_cost_usd_total",
        "counter",
        "Cost in USD of the model calls counted, by model, for the models that --prices prices.",
        [({"model": m}, round(usd, 9)) for m, usd in sorted(stats.cost.items())],
    )
    write_metric(out, "eventuali_streams_open", "gauge", "Streams open on this process.", [({}, len(hub.subscribers))])
    write_metric(
        out,
        "eventuali_otlp_spans_total",
        "counter",
        "Spans received on /v1/traces, by outcome: stored (or found stored), rejected.",
        [({"outcome": outcome}, request.app.state.otlp_spans[outcome]) for outcome in ("stored", "rejected")],
    )
    write_metric(
        out,
        "eventuali_append_events_in_flight",
        "gauge",
        "Events of appends waiting for their commit on this process.",
        [({}, getattr(store, "in_flight", 0))],
    )
    write_metric(
        out,
        "eventuali_stream_catchups_total",
        "counter",
        "Times a stream fell behind (its buffer full) and caught up from the store.",
        [({}, hub.overflows)],
    )
    write_metric(
        out, "eventuali_stream_events_delivered_total", "counter", "Events sent to streams.", [({}, hub.delivered)]
    )
    with contextlib.suppress(StoreError):  # counted in eventuali_store_errors_total
        extent = await store.extent()
        write_metric(
            out, "eventuali_last_position", "gauge", "The newest event's position.", [({}, extent.last_position)]
        )
        consumers = await store.consumers()  # named by whoever acks: as many as they make
        write_metric(
            out,
            "eventuali_consumer_position",
            "gauge",
            "The position each consumer has acknowledged.",
            [({"consumer": c.name}, c.position) for c in consumers],
        )
        write_metric(
            out,
            "eventuali_consumer_lag",
            "gauge",
            "Events each consumer is behind the log's last position.",
            [({"consumer": c.name}, max(0, extent.last_position - c.position)) for c in consumers],
        )
        write_metric(
            out,
            "eventuali_pruned_through_position",
            "gauge",
            "Retention has removed every event up to this position.",
            [({}, extent.pruned_through)],
        )
        if extent.size_bytes is not None:
            write_metric(
                out, "eventuali_database_size_bytes", "gauge", "The database's size on disk.", [({}, extent.size_bytes)]
            )
    write_metric(
        out, "process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch.", [({}, STARTED)]
    )
    write_metric(
        out,
        "eventuali_uptime_seconds",
        "gauge",
        "Seconds since the process started.",
        [({}, round(time.time() - STARTED, 3))],
    )
    build = {"version": __version__, "python": platform.python_version(), "backend": store.backend}
    write_metric(out, "eventuali_build_info", "gauge", "The server's version, Python and backend.", [(build, 1)])
    return Response("\n".join(out) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")


# -- 6.8 logs -----------------------------------------------------------------------------

_QUERY_PARAMETER = re.compile(r"([?&]([^=&#\s]*)=)([^&#\s]*)")


def redact_query(text: str) -> str:
    """text with the value of every access_token query parameter replaced by ***, however
    the name is spelled (access%5Ftoken is access_token to the server, and so to this)."""
    if "=" not in text:
        return text
    from urllib.parse import unquote_plus

    return _QUERY_PARAMETER.sub(
        lambda m: m.group(1) + "***" if unquote_plus(m.group(2)) == "access_token" else m.group(0), text
    )


def redact_token(record: logging.LogRecord) -> bool:
    """Logging filter, on every handler: the stream's access_token never reaches a log line."""
    if isinstance(record.msg, str):
        record.msg = redact_query(record.msg)
    if isinstance(record.args, tuple):
        record.args = tuple(redact_query(arg) if isinstance(arg, str) else arg for arg in record.args)
    return True


def log_handlers() -> list:
    """The handlers that the server's and uvicorn's log records reach."""
    names = ("", "uvicorn", "uvicorn.access", "uvicorn.error", logger.name)
    return list({id(h): h for name in names for h in logging.getLogger(name).handlers}.values())


class JSONLines(logging.Formatter):
    """--log-format json: one JSON object a line, with time, level, logger and message, and
    an access line's fields (ACCESS_FIELDS)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": format_timestamp(datetime.fromtimestamp(record.created, timezone.utc)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({key: getattr(record, key) for key in ACCESS_FIELDS if hasattr(record, key)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(config: APIServerConfig) -> None:
    """The root logger's level and format; in json, every line (uvicorn's too) is a JSONLines object."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(
            JSONLines() if config.log_format == "json" else logging.Formatter("%(levelname)s:     %(message)s")
        )
    root.setLevel(config.log_level.upper())


# -- 6.9 the gate: what every request passes, in one layer --------------------------------
# Each route of ROUTES (and the 404 for paths that match none) is served through its own
# gate, built once from the route and the settings: the Host check, CORS, the method, the
# key, the endpoint, its errors as JSON replies, and the request counted for /metrics. It
# reads the headers once, and routing happens once, in Starlette's router.


def api_keys(setting: str) -> list[bytes]:
    return [key.strip().encode() for key in setting.split(",") if key.strip()]


def one_of(token: bytes, keys: list[bytes]) -> bool:
    """Whether token is one of keys, compared in constant time, each of them."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


@functools.lru_cache(maxsize=1024)  # asked for every request, of few distinct names
def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: bytes) -> str:
    """The host of a Host header, without its port ("[::1]:8765" -> "[::1]")."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.split("]", 1)[0] + "]"
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


HOST_VALUE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]*)(:[0-9]*)?")  # RFC 3986's host [":" port]


@functools.lru_cache(maxsize=1024)  # asked for every request, of few distinct values
def bad_host(header: bytes) -> bool:
    """Whether a Host header's value is not a host and port as RFC 3986 writes them."""
    return HOST_VALUE.fullmatch(header.decode("latin-1").strip()) is None


def host_check(config: APIServerConfig) -> Callable[[Scope, bytes], str | None] | None:
    """Why a request's Host is refused, or None (DNS rebinding: a web page that points its own
    name at 127.0.0.1 would otherwise read and write the log from the browser). A server bound
    to loopback answers loopback names and --allowed-hosts; one bound elsewhere, only those if
    they are given, else any Host. Requests that reach a server bound to loopback through
    another interface are not browsers rebinding to it, and pass. None: nothing to check."""
    allowed, bound_to_loopback = config.allowed_hosts, is_loopback(config.host)
    if "*" in allowed or not (allowed or bound_to_loopback):
        return None
    names = {name for name in allowed if not name.startswith("*.")}
    suffixes = tuple(name[1:] for name in allowed if name.startswith("*."))

    def refused(scope: Scope, header: bytes) -> str | None:
        if bound_to_loopback and not allowed and not is_loopback(str((scope.get("server") or ("",))[0])):
            return None
        return refused_name(header)

    @functools.lru_cache(maxsize=1024)  # asked for every request, of few distinct values
    def refused_name(header: bytes) -> str | None:
        host = host_name(header)
        if is_loopback(host) or host in names or (bool(suffixes) and host.endswith(suffixes)):
            return None
        return (
            f"host {host!r} is not allowed here: use localhost, or start the server with "
            "--allowed-hosts (ALLOWED_HOSTS)"
        )

    return refused


class Served(NamedTuple):
    """What the gate does for one method of a path."""

    endpoint: Callable  # an ASGI function
    keyed: bool  # a key is needed
    writes: bool  # and it must be a write key


def gate(routes: Sequence[ApiRoute], config: APIServerConfig, stats: HttpStats) -> ASGIEndpoint:
    """The endpoints of one path (a route of ROUTES for each of its methods) behind everything
    a request passes first (see above). The key: `Authorization: Bearer <key>` or `X-API-Key`
    (or ?access_token=<key> on the stream: browsers' EventSource cannot send headers); a write
    key opens every route, a read key those that do not write, and gets 403 from those that do."""
    path = routes[0].path
    served = {
        route.method: Served(
            asgi_endpoint(route.endpoint),
            bool(config.api_key) and not route.public,
            route.method in ("POST", "DELETE") if route.writes is None else route.writes,
        )
        for route in routes
    }
    if "GET" in served:
        served["HEAD"] = served["GET"]
    anything = served.pop("", None)  # a route of any method
    allow = [(b"allow", ", ".join(sorted(served)).encode())]
    refused_host = host_check(config)
    write_keys, read_keys = api_keys(config.api_key), api_keys(config.read_api_key)
    token_in_query = path == "/events/stream"
    access_lines = config.log_format == "json"
    counted = config.metrics or access_lines

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        this = served.get(scope["method"], anything)
        if this is None:
            return await send_json(send, '{"detail":"Method Not Allowed"}', 405, allow)
        endpoint, keyed, writes = this
        if keyed:
            token = b""
            for name, value in scope["headers"]:
                if name == b"authorization" and value[:7].lower() == b"bearer ":
                    token = value[7:].strip()
                elif name == b"x-api-key":  # what OTLP exporters are often set to send
                    token = token or value.strip()
            if not token and token_in_query:
                token = Request(scope).query_params.get("access_token", "").encode()
            reader = one_of(token, read_keys)
            if not (one_of(token, write_keys) or (reader and not writes)):
                if reader:
                    detail = "this key may read, not write: emit with a key of --api-key"
                    return await send_json(send, compact_json({"detail": detail}), 403)
                detail = "missing or wrong API key: send 'Authorization: Bearer <key>'"
                return await send_json(send, compact_json({"detail": detail}), 401, [(b"www-authenticate", b"Bearer")])
        try:
            await endpoint(scope, receive, send)
        except Exception as exc:
            status, body, headers = error_reply(exc)
            if status == 500:
                logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            await send_json(send, body, status, headers)  # raises if the reply had started

    cors = CORSMiddleware(
        serve,
        allow_origins=config.cors_origins,
        allow_credentials=config.cors_allow_credentials,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Accept", "Cache-Control"],
    )
    label = path

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        began = time.perf_counter()
        status = 0  # until the reply starts

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                if status:  # an error after the reply started: all that is left is to end the connection
                    raise RuntimeError(f"{scope['method']} {scope['path']} failed after its reply started")
                status = message["status"]
            await send(message)

        try:
            host = origin = b""
            hosts = 0
            for name, value in scope["headers"]:
                if name == b"host":
                    host = value
                    hosts += 1
                elif name == b"origin":
                    origin = value
            if hosts > 1 or (hosts and bad_host(host)) or (not hosts and scope.get("http_version") == "1.1"):
                detail = "an HTTP/1.1 request needs exactly one Host header, a host and maybe a port (RFC 9112)"
                return await send_json(sent, compact_json({"detail": detail}), 400)
            refusal = refused_host(scope, host) if refused_host is not None and host else None
            if refusal is not None:
                await send_json(sent, compact_json({"detail": refusal}), 403)
            elif origin:  # browsers; CORSMiddleware has nothing to add to agents' and scripts' requests
                await cors(scope, receive, sent)
            else:
                await serve(scope, receive, sent)
        finally:
            if counted:
                stats.observe(scope, label, status or 500, time.perf_counter() - began, access_lines)

    return ASGIEndpoint(guarded)


# -- 6.10 background tasks: memory, retention, signals ------------------------------------


def memory_trimmer() -> Callable[[], object]:
    """glibc's malloc keeps in its heaps the memory that big events were read into and freed;
    malloc_trim gives it back to the system. Where there is no glibc, nothing to do."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


async def give_back_memory() -> None:
    """Every second after reads of big events, return the memory they freed to the system."""
    trim = memory_trimmer()
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(1)
        if ReadSize.big_reads:
            ReadSize.big_reads = False
            await loop.run_in_executor(None, trim)


RETAIN_EVERY = 60.0  # seconds between two looks for events past --retain, at most


async def retain(store: EventStore, seconds: float) -> None:
    """Remove the events older than `seconds`, and look again every RETAIN_EVERY (or a tenth
    of a shorter retention)."""
    every = min(RETAIN_EVERY, max(1.0, seconds / 10))
    while True:
        cutoff = format_timestamp(datetime.now(timezone.utc) - timedelta(seconds=seconds))
        try:
            removed = await store.prune(cutoff)
            if removed:
                logger.info("retention: removed %d events from before %s", removed, cutoff)
        except StoreError as exc:
            logger.warning("retention: %s", exc)
        except Exception:  # a bug: say so, and keep going
            logger.exception("retention failed")
        await asyncio.sleep(every)


def chain_signals(hub: Hub, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Close every stream as soon as SIGINT/SIGTERM arrives, then let the server's own
    handler run: uvicorn waits for open responses, so streams would hold shutdown up."""
    previous: dict[int, Any] = {}

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


# -- 6.11 routes and the application ------------------------------------------------------


class ApiRoute(NamedTuple):
    path: str
    method: str
    endpoint: Callable
    operation: str  # its operationId; OPERATIONS describes it in the OpenAPI document
    public: bool = False  # open without the API key
    writes: bool | None = None  # needs a write key (None: POST and DELETE do)


# The one list of routes: it drives routing, the API key's reach and the OpenAPI paths.
# The emit routes come first, where routing finds them soonest.
ROUTES = [
    *[ApiRoute(f"/events/emit/{kind}", "POST", emit_one(kind), f"emit_{kind}") for kind in KINDS],
    ApiRoute("/events/emit/batch", "POST", ASGIEndpoint(emit_batch), "emit_batch"),
    ApiRoute("/v1/traces", "POST", ASGIEndpoint(ingest_traces), "otlp_traces"),
    ApiRoute("/", "GET", root, "root", public=True),
    ApiRoute("/health", "GET", health, "health_no_slash", public=True),
    ApiRoute("/health/", "GET", health, "health", public=True),
    ApiRoute("/health/database", "GET", health_database, "health_database"),  # its path and sizes: keyed
    ApiRoute("/events", "GET", list_events, "list_events_no_slash"),
    ApiRoute("/events/", "GET", list_events, "list_events"),
    ApiRoute("/events/stream", "GET", stream, "stream_events"),
    ApiRoute("/events/agents/{agent_id}", "GET", agent_events, "agent_events"),
    ApiRoute("/events/workflows", "GET", list_workflows, "list_workflows"),
    ApiRoute("/events/workflows/{workflow_id}", "GET", workflow_events, "workflow_events"),
    ApiRoute("/events/workflows/{workflow_id}/agents", "GET", workflow_agents_handler, "workflow_agents"),
    ApiRoute("/consumers", "GET", list_consumers, "list_consumers"),
    ApiRoute("/consumers/{name}", "GET", get_consumer, "get_consumer"),
    ApiRoute("/consumers/{name}", "DELETE", delete_consumer, "delete_consumer"),
    ApiRoute("/consumers/{name}/ack", "POST", ack_consumer, "ack_consumer", writes=False),  # a read key may ack
    ApiRoute("/openapi.json", "GET", openapi_handler, "openapi", public=True),
    ApiRoute("/docs", "GET", docs_handler, "docs", public=True),
    ApiRoute("/ui", "GET", ui_handler, "live_view", public=True),
    ApiRoute("/metrics", "GET", metrics, "metrics"),  # counts, sizes, versions: keyed when there is a key
]


def served_routes(config: APIServerConfig) -> list[ApiRoute]:
    """ROUTES, less /metrics under --metrics off."""
    return [route for route in ROUTES if config.metrics or route.operation != "metrics"]


async def not_found(request: Request) -> Response:
    raise HTTPException(404)


async def unknown_kind(request: Request) -> Response:
    """/events/emit/ with a kind there is not, or a kind asked with a method other than POST."""
    kind, kinds = request.path_params["kind"], (*KINDS, "batch")
    if kind in kinds:
        raise HTTPException(405, headers={"Allow": "POST"})
    paths = ", ".join(f"/events/emit/{name}" for name in kinds)
    raise Problem(404, f"no kind {kind!r} to emit: POST to one of {paths}")


# Served besides ROUTES, and not in the OpenAPI document: a path under /events/emit/ that
# names no kind (after the kinds, so that it catches what they do not), and a path that
# matches no route. Any method; no key.
UNKNOWN_KIND = ApiRoute("/events/emit/{kind}", "", unknown_kind, "", public=True)
UNMATCHED = ApiRoute("unmatched", "", not_found, "", public=True)


def create_app(config: APIServerConfig | None = None) -> Starlette:
    """The Starlette application; `config` defaults to get_config()."""
    config = config or get_config()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = make_store(config)
        store.stats.prices = config.price_list
        await store.start()
        hub = Hub(store, config.read_chunk, config.stream_buffer, config.stream_memory, config.sse_ping)
        hub.start()
        trimming = asyncio.ensure_future(give_back_memory())
        retaining = asyncio.ensure_future(retain(store, config.retain)) if config.retain else None
        app.state.store, app.state.hub = store, hub
        restore = chain_signals(hub, asyncio.get_running_loop())
        handlers = log_handlers()  # found here: uvicorn sets up its loggers before startup
        for handler in handlers:
            handler.addFilter(redact_token)
        url = f"http://{config.host}:{config.port}"
        logger.info(
            "Eventuali API Server %s on %s (docs: %s/docs), database: %s, event loop: %s, HTTP parser: %s%s",
            config.version,
            url,
            url,
            store.location,
            type(asyncio.get_running_loop()).__module__.split(".")[0],
            http_parser(),
            f", worker {os.getpid()}" if config.workers > 1 else "",
        )
        if not config.api_key and not is_loopback(config.host):
            logger.warning(
                "listening on %s without an API key: anyone who can reach it can read and "
                "write events; set --api-key (API_KEY), and --allowed-hosts (ALLOWED_HOSTS) to the names "
                "clients use",
                config.host,
            )
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(redact_token)
            restore()
            trimming.cancel()
            if retaining is not None:
                retaining.cancel()
            await hub.stop()
            await store.stop()

    http_stats = HttpStats()
    by_path: dict[str, list[ApiRoute]] = {}
    for api_route in (*served_routes(config), UNKNOWN_KIND):
        by_path.setdefault(api_route.path, []).append(api_route)
    routes = [Route(path, gate(same, config, http_stats)) for path, same in by_path.items()]
    application = Starlette(routes=routes, lifespan=lifespan)
    application.router.default = gate([UNMATCHED], config, http_stats)
    application.router.redirect_slashes = False  # the original's 307s broke its own client
    # Each gate turns its route's errors into replies, so that Starlette's error middleware,
    # which would wrap every request twice more, has nothing to do: the router is the stack.
    application.middleware_stack = application.router
    application.state.config = config
    application.state.http_stats = http_stats
    application.state.otlp_spans = collections.Counter()  # spans stored and left out
    application.state.fields = event_fields(config)
    application.state.batch_fields = {"kind": KIND_FIELD, **application.state.fields}
    application.state.list_params = list_params(config)
    application.state.stream_params = stream_params(config)
    return application


def http_parser() -> str:
    """The HTTP parser uvicorn picks by itself: httptools where it imports, else h11."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def lazy_app() -> ASGIApp:
    """The module-level `app`: built on first use, so that set_config() and the
    environment of `uvicorn eventuali_api_server:app` both take effect."""
    built: list = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if not built:
            if not logging.getLogger().handlers:  # in uvicorn's children, and under `uvicorn eventuali_api_server:app`
                configure_logging(get_config())
            built.append(create_app())
        await built[0](scope, receive, send)

    return app


# =============================================================================
# 7. OpenAPI
# =============================================================================
# The document is built from ROUTES and the field specs of section 2; its pages are in section 9.


def _nullable(spec: dict) -> dict:
    spec = {k: v for k, v in spec.items() if not k.startswith("x-")}
    spec["type"] = [spec["type"], "null"]
    return spec


def _request_schema(fields: dict, required: Sequence[str], description: str) -> dict:
    return {
        "type": "object",
        "description": description,
        "additionalProperties": False,
        "required": list(required),
        "properties": {
            name: ({k: v for k, v in spec.items() if not k.startswith("x-")} if name in required else _nullable(spec))
            for name, spec in fields.items()
        },
    }


def _parameters(specs: dict) -> list:
    return [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": spec.get("description", ""),
            "schema": {k: v for k, v in spec.items() if k != "description"},
        }
        for name, spec in specs.items()
    ]


def _path_parameter(name: str, config: APIServerConfig) -> dict:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": config.max_id_length},
    }


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def digits_up_to(bound: int) -> str:
    """A regular expression of the decimal texts of 0 to `bound` (leading zeros allowed up to
    its number of digits): a header's number has no `maximum` in a schema."""
    text = str(bound)
    shorter = f"[0-9]{{1,{len(text) - 1}}}"
    lower = [f"{text[:i]}[0-{int(d) - 1}][0-9]{{{len(text) - i - 1}}}" for i, d in enumerate(text) if d != "0"]
    return "|".join([shorter, *lower, text])


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {JSON_TYPE: {"schema": schema}}}


STRING_OR_NULL = {"type": ["string", "null"]}
STATE_DOC = (
    "a name whose last word (after `.`, `_`, `-`, `:`, `/` or a space; in any case) is "
    + ", ".join(f"`{w}`" for w in STATE_RULES["completed"])
    + " means `completed`; "
    + ", ".join(f"`{w}`" for w in STATE_RULES["failed"])
    + " means `failed`; any other name means `running`."
)
STATE_FIELD = {"type": "string", "enum": list(WORKFLOW_STATES), "description": STATE_DOC}
LIFECYCLE_DOC = (
    "an agent's state comes from its latest event whose name's first word is `agent` (`agent.started`, "
    "`agent.completed`), a workflow's from its own latest event whose first word is `workflow`; their other "
    "events (tool and model calls) are activity, and leave the state as it was; without a lifecycle event, "
    "`running`."
)
COST_RULES = (
    "Cost: `input_tokens` count the cached ones too (as the GenAI conventions say), so the input that was not "
    "read from or written to the cache is priced as `input`, `cache_read_input_tokens` as `cache_read` and "
    "`cache_creation_input_tokens` as `cache_creation` (each `input` where the list has none), and "
    "`output_tokens` (reasoning included) as `output`."
)
ERRORS = {
    401: ("Error", "Missing or wrong API key (only when the server has one)."),
    403: ("Error", "The key may read, not write (a key of --read-api-key)."),
    404: ("Error", "No such path."),
    409: (
        "Conflict",
        "Version conflict (`expected_version`) or an `event_id` reused with other content; nothing was stored.",
    ),
    413: ("Error", "Request body too large."),
    415: ("Error", "Content type is not application/json."),
    422: ("ValidationError", "Invalid request: every problem is listed with its location."),
    503: ("Error", "The database cannot serve now (locked, read-only, disk full) or too many streams."),
}


def _errors(*codes: int) -> dict:
    return {str(code): _json(_ref(ERRORS[code][0]), ERRORS[code][1]) for code in codes}


SEED_EXAMPLES = {
    "agent": {
        "name": "agent.started",
        "attributes": {"agent_name": "url-cacher", "message": "Agent started successfully"},
        "aggregate_id": "url-cacher-abc123",
        "correlation_id": "workflow-def456",
        "causation_id": "parent-agent-789",
    },
    "workflow": {
        "name": "workflow.started",
        "attributes": {"user_prompt": "Cache the documentation page"},
        "aggregate_id": "workflow-def456",
    },
    "system": {
        "name": "session.started",
        "attributes": {"session_type": "interactive"},
        "aggregate_id": "session-ghi789",
    },
}


def obj_schema(props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props)}


def otlp_schemas() -> dict:
    """ExportTraceServiceRequest in OTLP's JSON mapping, as read_json reads it: a null is a
    field not given; 64-bit integers are JSON integers or strings of digits; enums are
    integers or their names; keys not named here are ignored."""

    def maybe(schema: dict) -> dict:
        return {"anyOf": [schema, {"type": "null"}]}

    def obj(**props: dict) -> dict:
        return maybe({"type": "object", "properties": props})

    def many(items: dict) -> dict:
        return maybe({"type": "array", "items": items})

    text = {"type": ["string", "null"]}
    integer = {"type": ["integer", "string", "null"], "pattern": "^-?[0-9]{1,20}$"}

    def enum(names: Sequence[str]) -> dict:
        return {"anyOf": [integer, {"enum": list(names)}]}

    attributes = many(_ref("OtlpKeyValue"))
    return {
        "OtlpKeyValue": {"type": "object", "properties": {"key": text, "value": maybe(_ref("OtlpAnyValue"))}},
        "OtlpAnyValue": {
            "type": "object",
            "description": "One value: the first of these given (bytesValue in base64).",
            "properties": {
                "stringValue": text,
                "boolValue": {"type": ["boolean", "null"]},
                "intValue": integer,
                "doubleValue": {"anyOf": [{"type": ["number", "null"]}, {"enum": ["NaN", "Infinity", "-Infinity"]}]},
                "arrayValue": obj(values=many(_ref("OtlpAnyValue"))),
                "kvlistValue": obj(values=attributes),
                "bytesValue": text,
            },
        },
        "OtlpSpan": {
            "type": "object",
            "properties": {
                "traceId": {**text, "description": "16 bytes in hex."},
                "spanId": {**text, "description": "8 bytes in hex."},
                "parentSpanId": {**text, "description": "8 bytes in hex; empty for a root."},
                "name": text,
                "kind": enum(SPAN_KIND_NAMES),
                "startTimeUnixNano": integer,
                "endTimeUnixNano": integer,
                "attributes": attributes,
                "events": many(
                    {"type": "object", "properties": {"timeUnixNano": integer, "name": text, "attributes": attributes}}
                ),
                "links": many(
                    {"type": "object", "properties": {"traceId": text, "spanId": text, "attributes": attributes}}
                ),
                "status": obj(code=enum(STATUS_CODE_NAMES), message=text),
            },
        },
        "OtlpRequest": {
            "type": "object",
            "description": "ExportTraceServiceRequest in OTLP's JSON mapping: lowerCamelCase keys, trace and span "
            "ids in hex, enums as integers (or their names), 64-bit integers as numbers or strings; a null is a "
            "field not given; other keys are ignored.",
            "properties": {
                "resourceSpans": many(
                    {
                        "type": "object",
                        "properties": {
                            "resource": obj(attributes=attributes),
                            "scopeSpans": many(
                                {
                                    "type": "object",
                                    "properties": {
                                        "scope": obj(name=text, version=text),
                                        "spans": many(_ref("OtlpSpan")),
                                    },
                                }
                            ),
                        },
                    }
                )
            },
        },
    }


def _schemas(config: APIServerConfig) -> dict:
    fields = event_fields(config)
    item_props = {
        "event_id": {"type": "string"},
        "position": {"type": "integer", "minimum": 1},
        "aggregate_id": {"type": "string"},
        "aggregate_type": {"type": "string"},
        "aggregate_version": {"type": "integer", "minimum": 1},
        "event_type": {"type": "string"},
        "event_name": {"type": "string"},
        "timestamp": {"type": "string", "format": "date-time"},
        "attributes": {"type": "object"},
        **{
            name: STRING_OR_NULL
            for name in (
                "correlation_id",
                "causation_id",
                "agent_name",
                "agent_id",
                "parent_agent_id",
                "workflow_id",
                "user_prompt",
                "session_id",
            )
        },
    }
    emit_props = {
        "success": {"type": "boolean"},
        "event_id": {"type": "string"},
        "message": {"type": "string"},
        "timestamp": {"type": "string", "format": "date-time"},
        "position": {"type": "integer"},
        "aggregate_id": {"type": "string"},
        "aggregate_version": {"type": "integer"},
    }
    agent_props = {
        "agent_id": {"type": "string"},
        "agent_name": STRING_OR_NULL,
        "workflow_id": {"type": "string"},
        "parent_agent_id": STRING_OR_NULL,
        "first_event_time": {"type": "string"},
        "last_event_time": {"type": "string"},
        "event_count": {"type": "integer", "description": "The agent's own events."},
        "call_count": {
            "type": "integer",
            "description": "Calls that belong to the agent: system events of the workflow whose cause leads to it "
            "(OpenTelemetry spans of model and tool calls), each counted once.",
        },
        "failed_calls": {"type": "integer", "description": "Of those, the calls whose latest event name says failed."},
        "status": {"type": "string", "description": "The agent's latest event name."},
        "state": {**STATE_FIELD, "description": "From the agent's lifecycle events: " + LIFECYCLE_DOC},
        "usage": _ref("Usage"),
    }
    workflow_props = {
        "workflow_id": {"type": "string"},
        "status": {
            "type": ["string", "null"],
            "description": "The latest name of the workflow's own events (null: it has none).",
        },
        "state": {
            **STATE_FIELD,
            "description": "From the workflow's own lifecycle events (" + LIFECYCLE_DOC + "); without one, from "
            "its agents: `running` if any agent runs or it has none, else `failed` if any failed, else `completed`.",
        },
        "start_time": {**STRING_OR_NULL, "description": "The timestamp of its timeline's earliest event."},
        "end_time": {**STRING_OR_NULL, "description": "Its timeline's latest timestamp, once not running."},
        "last_event_time": {**STRING_OR_NULL, "description": "Its timeline's latest timestamp."},
        "last_position": {"type": "integer", "description": "The position of its latest event (its latest activity)."},
        "duration_seconds": {
            "type": ["number", "null"],
            "description": "From start_time to end_time, or to now while it runs.",
        },
        "event_count": {"type": "integer", "description": "Events in its timeline."},
        "agent_count": {"type": "integer"},
        "failed_agents": {"type": "integer", "description": "Of its agents, those whose state is `failed`."},
        "name": {
            **STRING_OR_NULL,
            "description": "Its name where one is known: the attribute `workflow.name` or `gen_ai.workflow.name` of "
            "its own events, or the name of a trace's root span.",
        },
        "service": {**STRING_OR_NULL, "description": "The `service.name` its events carry (OTLP: the resource's)."},
        "user_prompt": {**STRING_OR_NULL, "description": "The first `user_prompt` of its timeline (1,000 characters)."},
        "usage": _ref("Usage"),
    }
    usage_props = {
        **{kind: {"type": "integer", "minimum": 0} for kind in USAGE_KINDS},
        "model_calls": {"type": "integer", "minimum": 0},
        "tool_calls": {"type": "integer", "minimum": 0},
        "failed_events": {"type": "integer", "minimum": 0},
        "cost": {
            "type": ["number", "null"],
            "description": "USD, from the price list of --prices, of the model calls whose model has a price "
            "(null when none has: never 0 for unknown models).",
        },
        "unpriced_calls": {"type": "integer", "minimum": 0, "description": "Model calls without a price."},
    }
    health_props = {
        "status": {"type": "string", "enum": ["healthy", "unhealthy"]},
        "timestamp": {"type": "string"},
        "api_connected": {"type": "boolean"},
        "database_connected": {"type": "boolean"},
        "version": {"type": "string"},
        "detail": {"type": "string"},
    }
    db_props = {
        "status": {"type": "string", "enum": ["healthy", "unhealthy"]},
        "timestamp": {"type": "string"},
        "connected": {"type": "boolean"},
        "path": {"type": "string"},
        "events": {"type": ["integer", "null"]},
        "latency_ms": {"type": "number"},
        "streams": {"type": "integer", "description": "Streams open on this process."},
        "oldest_position": {"type": ["integer", "null"], "description": "The oldest kept event's (null: none)."},
        "oldest_timestamp": {**STRING_OR_NULL, "description": "The oldest kept event's timestamp."},
        "pruned_through": {
            "type": ["integer", "null"],
            "description": "Retention has removed every event up to this position (0: none).",
        },
        "size_bytes": {"type": ["integer", "null"], "description": "The database's size on disk."},
        "detail": {"type": "string"},
    }

    def obj(props: dict, optional: Sequence[str] = ()) -> dict:
        return {"type": "object", "properties": props, "required": [k for k in props if k not in optional]}

    def page(key: str, item: str, what: str, cursor: str, optional: dict | None = None) -> dict:
        props = {
            key: {"type": "array", "items": _ref(item)},
            "total": {"type": "integer", "description": f"{what} matching the filters (the cursor and paging aside)."},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "next": {
                "type": ["integer", "null"],
                "description": f"When the page is full: the cursor for the next page ({cursor}).",
            },
        }
        return obj({**props, **(optional or {})}, tuple(optional or ()))

    return {
        "EventRequest": _request_schema(fields, REQUIRED_FIELDS, "An event to append."),
        "BatchEvent": _request_schema(
            {"kind": KIND_FIELD, **fields}, ("kind", *REQUIRED_FIELDS), "An event of a batch, with its kind."
        ),
        "BatchRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["events"],
            "properties": {
                "events": {"type": "array", "minItems": 1, "maxItems": config.max_batch, "items": _ref("BatchEvent")}
            },
        },
        "EmitReply": obj(emit_props),
        "BatchReply": obj({"success": {"type": "boolean"}, "events": {"type": "array", "items": _ref("EmitReply")}}),
        "EventItem": obj(item_props),
        "EventList": page(
            "events",
            "EventItem",
            "Events",
            "`after` with order=asc, `before` with desc",
            {
                "pruned_through": {
                    "type": "integer",
                    "description": "Only when `after` is below it: retention has removed the events after "
                    "`after` up to this position, and the page starts with the oldest kept event.",
                },
            },
        ),
        "WorkflowAgent": obj(agent_props),
        "Workflow": obj(workflow_props),
        "AgentList": obj({"workflow": _ref("Workflow"), "agents": {"type": "array", "items": _ref("WorkflowAgent")}}),
        "Usage": {**obj(usage_props), "description": USAGE_RULES + " " + COST_RULES},
        "WorkflowIndex": page("workflows", "Workflow", "Workflows", "`before`"),
        "Health": obj(health_props, ("detail",)),
        "DatabaseHealth": obj(db_props, ("detail",)),
        "Root": obj(
            {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "description": {"type": "string"},
                "endpoints": {"type": "object", "additionalProperties": {"type": "string"}},
            }
        ),
        "Error": obj({"detail": {"type": "string"}}),
        "Consumer": obj(
            {
                "name": {"type": "string"},
                "position": {"type": "integer", "description": "It has handled every event up to here."},
                "last_position": {"type": "integer", "description": "The log's."},
                "lag": {"type": "integer", "description": "last_position - position"},
                "updated_at": {"type": "string", "format": "date-time"},
            }
        ),
        "AckReply": {
            "allOf": [
                _ref("Consumer"),
                obj(
                    {
                        "moved": {"type": "boolean", "description": "false: it was there or further already"},
                        "detail": {"type": "string"},
                    },
                    ("detail",),
                ),
            ]
        },
        "ConsumerList": obj(
            {"consumers": {"type": "array", "items": _ref("Consumer")}, "last_position": {"type": "integer"}}
        ),
        "AckRequest": {**_request_schema(ACK_FIELDS, ("position",), "What the consumer has handled.")},
        "OtlpStatus": obj(
            {
                "code": {
                    "type": "integer",
                    "description": "gRPC's code: 3 invalid argument, 8 too large, 14 unavailable.",
                },
                "message": {"type": "string"},
                "detail": {"type": "string", "description": "The message again, as every error of this server has."},
            }
        ),
        **otlp_schemas(),
        "OtlpReply": {
            "type": "object",
            "description": "ExportTraceServiceResponse: empty when every span was stored.",
            "properties": {
                "partialSuccess": obj(
                    {
                        "rejectedSpans": {"type": ["string", "integer"], "description": "Spans left out (int64)."},
                        "errorMessage": {"type": "string"},
                    }
                )
            },
        },
        # One Server-Sent Event as a client parses it (before OpenAPI 3.2, the schema of a
        # text/event-stream reply describes each event): its data is the JSON text of an event
        # item, or of an error when the store fails mid-stream.
        "StreamEvent": {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"type": "string", "enum": ["event", "error"]},
                "id": {"type": "string", "pattern": "^[0-9]{1,19}$", "description": "The event's position."},
                "retry": {"type": "integer", "minimum": 0},
                "data": {
                    "type": "string",
                    "contentMediaType": JSON_TYPE,
                    "contentSchema": {"anyOf": [_ref("EventItem"), _ref("Error")]},
                },
            },
        },
        "Conflict": obj({"detail": {"type": "string"}, "current_version": {"type": "integer"}}, ("current_version",)),
        "ValidationError": obj(
            {
                "detail": {
                    "type": "array",
                    "items": obj(
                        {
                            "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                            "msg": {"type": "string"},
                            "type": {"type": "string"},
                        }
                    ),
                }
            }
        ),
    }


def operations(config: APIServerConfig) -> dict:
    """Every route's OpenAPI operation, by operationId (ROUTES names them)."""
    lists = _parameters(list_params(config))

    def op(summary: str, tag: str, replies: dict, *codes: int, **extra: Any) -> dict:
        return {"summary": summary, "tags": [tag], "responses": {**replies, **_errors(*codes)}, **extra}

    def emit_op(kind: str) -> dict:
        label = KINDS[kind][2]
        return op(
            f"Emit {'an' if kind[0] in 'aeiou' else 'a'} {kind} event",
            "events",
            {"200": _json(_ref("EmitReply"), "Stored and committed.")},
            409,
            413,
            415,
            422,
            503,
            description=f"Appends one {label.lower()} event (`aggregate_type` {KINDS[kind][0]}, "
            f"`event_type` {KINDS[kind][1]}). The reply comes after the commit.",
            requestBody={
                "required": True,
                "content": {JSON_TYPE: {"schema": _ref("EventRequest"), "example": SEED_EXAMPLES[kind]}},
            },
        )

    def list_op(summary: str, description: str, path_param: str | None = None) -> dict:
        # a path's own id is not a filter of that route too (another value is a 422)
        params = ([_path_parameter(path_param, config)] if path_param else []) + [
            p for p in lists if p["name"] != path_param
        ]
        return op(
            summary,
            "events",
            {"200": _json(_ref("EventList"), "A page of events.")},
            *((404,) if path_param else ()),
            422,
            503,
            description=description,
            parameters=params,
        )

    events_list = list_op("Query events", "Events with filters, newest first by default.")
    consumer_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": CONSUMER_FIELD,
        "description": "1 to 128 of A-Z, a-z, 0-9, `.`, `_`, `:`, `-`.",
    }
    health_op = op(
        "Health of the API and its database",
        "health",
        {
            "200": _json(_ref("Health"), "Healthy."),
            "503": _json(
                _ref("Health"), "Unhealthy: the database cannot be read and written, or the last append failed."
            ),
        },
        description="Query parameters are ignored (monitors add their own to get past caches).",
    )
    return {
        "root": op("Server information", "info", {"200": _json(_ref("Root"), "Name, version, endpoints.")}),
        "health_no_slash": {**health_op, "deprecated": True, "description": "The same as `/health/`."},
        "health": health_op,
        "health_database": op(
            "Database health",
            "health",
            {"200": _json(_ref("DatabaseHealth"), "Healthy."), "503": _json(_ref("DatabaseHealth"), "Unhealthy.")},
            description="Query parameters are ignored.",
        ),
        "list_events_no_slash": {**events_list, "deprecated": True, "description": "The same as `/events/`."},
        "list_events": events_list,
        **{f"emit_{kind}": emit_op(kind) for kind in KINDS},
        "emit_batch": op(
            "Emit several events atomically",
            "events",
            {"200": _json(_ref("BatchReply"), "All stored.")},
            409,
            413,
            415,
            422,
            503,
            description=f"1 to {config.max_batch} events of any kind, all or nothing, in one transaction. "
            "`expected_version` is checked against the version at that point in the batch.",
            requestBody={
                "required": True,
                "content": {
                    JSON_TYPE: {
                        "schema": _ref("BatchRequest"),
                        "example": {"events": [{"kind": kind, **example} for kind, example in SEED_EXAMPLES.items()]},
                    }
                },
            },
        ),
        "otlp_traces": {
            "summary": "Receive OpenTelemetry traces (OTLP/HTTP)",
            "tags": ["opentelemetry"],
            "description": (
                "What the stock OTLP/HTTP exporters send: set `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` to this URL. "
                "A trace is a workflow (its id: the trace id in hex), an `invoke_agent` span an agent (its id: "
                "the span id), any other span a call (a system event) that belongs to its nearest agent. The "
                "reply, in the request's encoding, comes after the spans are committed; a span sent again "
                "stores nothing new. Spans that cannot be stored are left out and counted in "
                "`partialSuccess`; the rest are stored."
            ),
            "requestBody": {
                "required": True,
                "content": {
                    PROTOBUF_TYPE: {
                        "schema": {"type": "string", "format": "binary", "description": "ExportTraceServiceRequest."}
                    },
                    JSON_TYPE: {"schema": _ref("OtlpRequest")},
                },
            },
            "responses": {
                "200": {
                    "description": "Stored (and committed), every span or those not counted as rejected.",
                    "content": {
                        PROTOBUF_TYPE: {"schema": {"type": "string", "format": "binary"}},
                        JSON_TYPE: {"schema": _ref("OtlpReply")},
                    },
                },
                **{
                    str(status): {
                        "description": text,
                        "content": {
                            PROTOBUF_TYPE: {"schema": {"type": "string", "format": "binary"}},
                            JSON_TYPE: {"schema": _ref("OtlpStatus")},
                        },
                    }
                    for status, text in (
                        (
                            400,
                            "The body cannot be read as an OTLP trace export (google.rpc.Status, naming the problem).",
                        ),
                        (408, "The body stalled."),
                        (413, "The body, or what it unpacks to, is larger than --otlp-max-body."),
                        (503, "The store cannot take the spans now: exporters retry."),
                    )
                },
                "415": _json(_ref("Error"), "Content type is neither protobuf nor JSON, or an unknown encoding."),
            },
        },
        "list_consumers": op(
            "Consumers and their places",
            "consumers",
            {"200": _json(_ref("ConsumerList"), "Every consumer, by name.")},
            422,
            503,
        ),
        "get_consumer": op(
            "A consumer's place",
            "consumers",
            {"200": _json(_ref("Consumer"), "Where it is, and how far behind the log.")},
            404,
            422,
            503,
            parameters=[consumer_param],
        ),
        "delete_consumer": op(
            "Forget a consumer",
            "consumers",
            {"200": _json(obj_schema({"deleted": {"type": "string"}}), "It is gone.")},
            403,
            404,
            422,
            503,
            description="Only a write key may, where the server has keys.",
            parameters=[consumer_param],
        ),
        "ack_consumer": op(
            "Acknowledge: the consumer has handled everything up to a position",
            "consumers",
            {"200": _json(_ref("AckReply"), "Where the consumer is now.")},
            409,
            413,
            415,
            422,
            503,
            description="Creates the consumer on first use. Positions only move forward: an ack behind the "
            "consumer's place changes nothing and says so (`moved` false). A position past the log's last is a "
            "409. A read key may ack.",
            parameters=[consumer_param],
            requestBody={
                "required": True,
                "content": {JSON_TYPE: {"schema": _ref("AckRequest"), "example": {"position": 42}}},
            },
        ),
        "agent_events": list_op("An agent's events", "Events of the agent aggregate with this id.", "agent_id"),
        "workflow_events": list_op(
            "A workflow's timeline",
            "The workflow's own events and every event whose `correlation_id` is the workflow id.",
            "workflow_id",
        ),
        "workflow_agents": op(
            "Agents of a workflow",
            "events",
            {"200": _json(_ref("AgentList"), "In order of first appearance.")},
            404,
            422,
            503,
            parameters=[_path_parameter("workflow_id", config)],
            description="The workflow's state and figures, and the agents with an event correlated to it; 404 "
            "for a workflow with no events. An agent's `status` is its latest event name; its `state` comes "
            "from its lifecycle events: " + LIFECYCLE_DOC + " States by name: " + STATE_DOC + " " + PARENT_RULES,
        ),
        "list_workflows": op(
            "Workflows, most recent activity first",
            "events",
            {"200": _json(_ref("WorkflowIndex"), "Most recent activity first.")},
            422,
            503,
            parameters=_parameters(WORKFLOW_INDEX_PARAMS),
            description="Every workflow with events: its own, or its agents' and calls' correlated with it (an "
            "OTLP trace is one). Each is the `workflow` of `/events/workflows/{workflow_id}/agents`, kept up to "
            "date as events are stored, with its usage and cost.",
        ),
        "stream_events": op(
            "Live events (Server-Sent Events)",
            "events",
            {
                "200": {
                    "description": "`retry: 3000` and a comment at once; then per event `id: <position>`, "
                    "`event: event`, `data: <event item JSON>`; a `: ping` comment every "
                    f"{config.sse_ping:g} s. A stream that resumes from a position retention has removed "
                    "gets, before the events, the comment `: pruned through <position>: ...`. If the store "
                    'fails, `event: error` with `data: {"detail": ...}`, and the stream ends.',
                    "content": {"text/event-stream": {"schema": _ref("StreamEvent")}},
                }
            },
            422,
            503,
            parameters=[
                *_parameters(stream_params(config)),
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": f"^({digits_up_to(MAX_INT)})?$"},
                    "description": "Resume after this position (browsers send "
                    "it); empty means none, as when it is left out.",
                },
            ],
            description="Resume with `Last-Event-ID` or `after`: stored events after that position first, then "
            "live ones, without gap or duplicate. A client that reads too slowly is caught up "
            "from the store; it never misses an event.",
        ),
        "openapi": op("This document", "docs", {"200": _json({"type": "object"}, "OpenAPI 3.1.")}),
        "docs": op(
            "Swagger UI",
            "docs",
            {"200": {"description": "HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}}},
        ),
        "live_view": op(
            "Live view of events, workflows and agents",
            "docs",
            {
                "200": {
                    "description": "HTML page (asks for the API key when the server has one).",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        ),
        "metrics": op(
            "Metrics for Prometheus",
            "health",
            {
                "200": {
                    "description": "The Prometheus text exposition format 0.0.4: requests by route template, "
                    "method and status, their durations, events appended by type, commit groups and their "
                    "durations, store errors, streams, the last position, the database size, uptime and build "
                    "information. Open like /health; `--metrics off` removes it.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        ),
    }


def openapi(config: APIServerConfig) -> dict:
    """The OpenAPI 3.1 document: a path for every route of ROUTES, its schemas built from
    the same specs that validate requests."""
    described = operations(config)
    paths: dict = {}
    for route in served_routes(config):
        operation = {**described[route.operation], "operationId": route.operation}
        if config.api_key and not route.public:
            operation["security"] = [{"bearer": []}]
            denied = (401, 403) if config.read_api_key and route.method == "POST" else (401,)
            operation["responses"] = {**operation["responses"], **_errors(*denied)}
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": config.title,
            "version": config.version,
            "description": config.description,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(config),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A key of the server's --api-key, or of its --read-api-key for the routes "
                    "that do not write (a read key gets 403 from those that do); the stream also takes "
                    "the key as ?access_token=.",
                }
            },
        },
    }


def docs_html(config: APIServerConfig) -> str:
    from html import escape

    assets = config.docs_assets_url.rstrip("/")
    assets_js = json.dumps(assets).replace("<", "\\u003c")  # a JS string that cannot end the script
    return DOCS_PAGE.format(title=escape(config.title), assets_js=assets_js)


# =============================================================================
# 8. Running: uvicorn and the command line
# =============================================================================

# -- 8.1 uvicorn: the protocol, open files, the port --------------------------------------


MAX_HEAD = 64 * 1024  # bytes of a request head (its line and headers), at most
_TOO_LARGE = compact_json({"detail": f"the request head is larger than {MAX_HEAD} bytes"}).encode()
HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE)
)


def protocol_with_head_timeout(seconds: float) -> type:
    """uvicorn's HTTP protocol (httptools' where installed, else h11's), closing a connection
    that has not sent a whole request head within `seconds` of opening, or of its last
    response: idle and trickling connections otherwise hold their sockets for good."""
    base: type
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol

    # One sweep a fraction of `seconds` closes what has waited too long, rather than a timer
    # armed and cancelled for every request.
    waiting: set = set()  # this process's connections
    sweeping: list[asyncio.Task] = []

    async def sweep() -> None:
        loop = asyncio.get_running_loop()
        while waiting:
            await asyncio.sleep(min(1.0, seconds / 4))
            now = loop.time()
            for protocol in list(waiting):
                since = protocol.waiting_since
                if since is not None and now - since > seconds and not protocol.transport.is_closing():
                    protocol.transport.close()

    class HeadTimeoutProtocol(base):
        waiting_since: float | None = None  # when it began to wait for a request head
        head_bytes = 0  # of the head it waits for, so far

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            loop = asyncio.get_running_loop()
            self.waiting_since = loop.time()
            waiting.add(self)
            if not sweeping or sweeping[0].done():
                sweeping[:] = [loop.create_task(sweep())]

        def data_received(self, data: bytes) -> None:
            if self.waiting_since is not None:  # counted before any parser sees it
                end = data.find(b"\r\n\r\n")
                self.head_bytes += len(data) if end < 0 else end
                if self.head_bytes > MAX_HEAD:
                    self.transport.write(HEAD_TOO_LARGE)
                    self.transport.close()
                    return
            super().data_received(data)
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                self.waiting_since = None  # a request is in hand: its head came whole
                self.head_bytes = 0
                if not cycle.more_body:  # and its body: receive_json has no wait to time
                    cycle.scope[BODY_IN_HAND] = True

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.waiting_since = asyncio.get_running_loop().time()  # for the next request on this connection

        def connection_lost(self, exc: Exception | None) -> None:
            waiting.discard(self)
            super().connection_lost(exc)

    return HeadTimeoutProtocol


class OncePerSecond(logging.Filter):
    """Lets through one record a second of each kind, without its traceback: when sockets run
    out, asyncio reports every failed accept, and every retry of them, thousands a second."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = str(record.msg).split("(", 1)[0]  # "Exception in callback X(...)": the same kind, whatever X holds
        now = time.monotonic()
        if now - self.last.get(kind, -1.0) < 1.0:
            return False
        self.last[kind] = now
        record.exc_info = None
        return True


def raise_open_files_limit() -> None:
    """Every socket takes a file descriptor: allow as many as the system lets this process."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1024 * 1024
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def check_port(host: str, port: int) -> None:
    """Raise OSError, saying which setting to change, unless the server can bind host:port now:
    before anything claims to be running."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot bind to host {host!r} ({exc.strerror}); change --host (HOST)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(f"port {port} on {host} is in use; choose another with --port (PORT)") from None
            raise OSError(
                f"cannot bind to {host}:{port} ({exc.strerror}); change --host (HOST) or --port (PORT)"
            ) from None


# -- 8.2 the commands ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventuali-api-server",
        description="Append-only event log for AI-agent workflows, over REST and Server-Sent Events. "
        "Every option can also be set by the environment variable named in brackets; "
        "an option given here beats its variable.",
        epilog="commands (each with its own --help): "
        "'eventuali-api-server backup DEST' writes a consistent copy of the live SQLite database; "
        "'eventuali-api-server copy --from SOURCE --to TARGET' moves a whole log between SQLite and "
        "PostgreSQL; 'eventuali-api-server prune --older-than 30d' removes old events while it serves.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for field, env, flag, parse, help_text in SETTINGS:
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if parse is _parse_bool else {}
        parser.add_argument(flag, dest=field, default=None, metavar=env, help=f"{help_text} [{env}]", **extra)
    return parser


def resolve_config(argv: Sequence[str] | None, environ: dict | None = None) -> APIServerConfig:
    """Flags beat environment variables, which beat defaults. ConfigError names the setting."""
    args = build_parser().parse_args(argv)
    overrides = {}
    for field, _env, flag, parse, _help in SETTINGS:
        text = getattr(args, field)
        if text is not None:
            try:
                overrides[field] = parse(text)
            except ValueError as exc:
                raise ConfigError(f"{flag} {text!r}: {exc}") from None
    return config_from_env(environ, **overrides)


def store_options(parser: argparse.ArgumentParser, database_help: str) -> None:
    """--data-dir and --database-url, for a command that works on a log."""
    parser.add_argument("--data-dir", default=None, metavar="DATA_DIR", help="folder of events.db [DATA_DIR]")
    parser.add_argument("--database-url", default=None, metavar="DATABASE_URL", help=f"{database_help} [DATABASE_URL]")


def backup_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="eventuali-api-server backup",
        description="Write a consistent copy of the live database to DEST while the server keeps serving. "
        "To restore: stop the server, put the copy in place as DATA_DIR/events.db "
        "(removing events.db-wal and events.db-shm), start the server.",
    )
    parser.add_argument("dest", help="file to create")
    store_options(parser, "a PostgreSQL database: says how to back it up")
    args = parser.parse_args(argv)
    try:
        config = config_from_env(data_dir=args.data_dir, database_url=args.database_url)
        store = make_store(config)
        events = store.backup(args.dest)
    except (ConfigError, StoreError, OSError) as exc:
        print(f"eventuali-api-server backup: error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"backed up {events} events from {store.location} to {args.dest}")


def prune_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="eventuali-api-server prune",
        description="Remove the events older than DURATION from the log, while servers keep serving: in "
        "short transactions, oldest first. Positions and versions are never used again, and counts stay "
        "exact. The space is reused for new events (see the README to give it back to the system).",
    )
    parser.add_argument("--older-than", required=True, metavar="DURATION", help="30d, 12h, 90m, 45s or 2w")
    store_options(parser, "a PostgreSQL log")
    args = parser.parse_args(argv)
    try:
        seconds = parse_duration(args.older_than)
    except ValueError as exc:
        parser.error(f"--older-than {args.older_than!r}: {exc}")
    cutoff = format_timestamp(datetime.now(timezone.utc) - timedelta(seconds=seconds))
    try:
        config = config_from_env(data_dir=args.data_dir, database_url=args.database_url)
        if not config.database_url and not os.path.isfile(config.database_path):
            raise ConfigError(f"no log at {config.database_path}: name the data dir with --data-dir (DATA_DIR)")
        store = make_store(config)
        store.prepare()
        removed = asyncio.run(store.prune(cutoff))
    except (ConfigError, StoreError, OSError) as exc:
        print(f"eventuali-api-server prune: error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"removed {removed:,} events from before {cutoff} from {store.location}")


DATABASE_URL_LIKE = re.compile(r"\s*[A-Za-z][\w+.-]*://|.*\b(host|dbname|password|user)\s*=", re.S)


def store_at(where: str, existing: bool = False) -> ThreadedStore:
    """The store a command line names: a database URL (anything that looks like one, so that a
    mistyped URL fails as one, its password hidden), an SQLite file, or a data dir. With
    `existing`, an SQLite log that is not there is refused rather than created."""
    if DATABASE_URL_LIKE.match(where):
        return PostgresStore(config_from_env(database_url=where))
    if os.path.isfile(where) or where.endswith(".db"):
        store = SQLiteStore(config_from_env(database_url=""), path=where)
    else:
        store = SQLiteStore(config_from_env(data_dir=where, database_url=""))
    if existing and not os.path.isfile(store.path):
        raise ConfigError(f"no log at {store.path}")
    return store


def copy_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="eventuali-api-server copy",
        description="Copy a whole log to another store (SQLite to PostgreSQL, or back), keeping every event's "
        "position, version, id, timestamp and content; the counters are rebuilt. Run it again to "
        "resume an interrupted copy. Stop the servers that write to the source first.",
    )
    parser.add_argument(
        "--from", dest="source", required=True, metavar="SOURCE", help="a PostgreSQL URL, an SQLite file, or a data dir"
    )
    parser.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="TARGET",
        help="a PostgreSQL URL, an SQLite file, or a data dir (created if needed)",
    )
    args = parser.parse_args(argv)

    def progress(done: int, total: int) -> None:
        print(f"copied {done:,} of {total:,} events ({done * 100 // max(total, 1)}%)", file=sys.stderr, flush=True)

    try:
        source, target = store_at(args.source, existing=True), store_at(args.target)
        events = asyncio.run(copy_stores(source, target, progress))
    except KeyboardInterrupt:
        print("eventuali-api-server copy: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except (ConfigError, StoreError, OSError) as exc:
        print(f"eventuali-api-server copy: error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"copied: {target.location} holds the {events:,} events of {source.location}")


SUBCOMMANDS = {"backup": backup_main, "copy": copy_main, "prune": prune_main}


def main(argv: Sequence[str] | None = None) -> None:
    """The `eventuali-api-server` command, and its subcommands (SUBCOMMANDS)."""
    import uvicorn

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    try:
        config = resolve_config(argv)
        make_store(config).prepare()
    except ConfigError as exc:
        print(f"eventuali-api-server: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (OSError, StoreError) as exc:
        where = redact_url(config.database_url) if config.database_url else f"data dir {config.data_dir!r}"
        print(f"eventuali-api-server: error: cannot use {where}: {exc}", file=sys.stderr)
        sys.exit(1)
    try:
        check_port(config.host, config.port)
    except OSError as exc:
        print(f"eventuali-api-server: error: {exc}", file=sys.stderr)
        sys.exit(1)
    set_config(config)
    configure_logging(config)
    logging.getLogger("asyncio").addFilter(OncePerSecond())
    raise_open_files_limit()
    serving: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "log_level": config.log_level,
        "timeout_graceful_shutdown": 1,
        "limit_concurrency": config.limit_concurrency,
        "http": protocol_with_head_timeout(config.request_timeout),
        "h11_max_incomplete_event_size": MAX_HEAD + 1,  # the protocol answers 431 past MAX_HEAD first
    }
    if config.log_format == "json":  # configure_logging's lines; observe() writes the access lines
        serving.update(log_config=None, access_log=False)
    if config.workers > 1 and not config.database_url:
        logger.info(
            "%d workers on SQLite take turns to write to one file: writes go at about one worker's "
            "rate, not faster; more workers serve reads and streams",
            config.workers,
        )
    if config.reload or config.workers > 1:
        # The reloader and the workers import the module afresh in children: hand them the
        # settings, and the protocol by name (see __getattr__).
        os.environ.update(config_to_env(config))
        serving["http"] = "eventuali_api_server:HeadTimeoutProtocol"
        children = (
            {"reload": True, "reload_dirs": [os.path.dirname(os.path.abspath(__file__))]}
            if config.reload
            else {"workers": config.workers}
        )
        uvicorn.run("eventuali_api_server:app", **children, **serving)
    else:
        uvicorn.run(create_app(config), **serving)


def __getattr__(name: str) -> Any:
    """HeadTimeoutProtocol, which uvicorn's children (reload, workers) import by name, made
    from the settings they were handed."""
    if name == "HeadTimeoutProtocol":
        return protocol_with_head_timeout(get_config().request_timeout)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# =============================================================================
# 9. Assets: the HTML pages
# =============================================================================
# /docs (Swagger UI, with a built-in reference when its CDN fails) and /ui (the live view).

# /docs: Swagger UI from --docs-assets-url, and a reference of its own when that cannot load.
DOCS_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - docs</title>
<style>
#reference {{ font: 14px/1.5 system-ui, sans-serif; color: #1d2433; max-width: 64rem; margin: 0 auto; padding: 1rem; }}
#reference[hidden] {{ display: none; }}
#reference .notice {{ background: #fff4d6; border: 1px solid #e8c96a; border-radius: 6px; padding: .6rem .8rem; }}
#reference .op {{ border: 1px solid #dde1e8; border-radius: 6px; margin: 1rem 0; padding: .2rem .9rem .6rem; }}
#reference h3 {{ font-size: 15px; }} #reference h4 {{ font-size: 13px; margin: .8rem 0 .2rem; }}
#reference .method {{ display: inline-block; min-width: 3.5rem; text-align: center; color: #fff; border-radius: 4px;
                      padding: 0 .4rem; margin-right: .4rem; background: #2f6fde; }}
#reference .method.post {{ background: #1f9d55; }}
#reference table {{ border-collapse: collapse; width: 100%; font-size: 13px; }}
#reference td, #reference th {{ text-align: left; border-bottom: 1px solid #eee; padding: .2rem .4rem;
                                vertical-align: top; }}
#reference pre {{ background: #f5f6f8; padding: .5rem; border-radius: 4px; font-size: 12px; white-space: pre-wrap; }}
</style></head>
<body><div id="swagger-ui"></div><div id="reference" hidden></div>
<script>
"use strict";
const ASSETS = {assets_js};
let fellBack = false;
// Swagger UI comes from ASSETS (--docs-assets-url); when it cannot load (offline, blocked),
// the page says so and shows a reference of its own, built from /openapi.json.
function fallBack(why) {{
  if (fellBack || document.querySelector("#swagger-ui .swagger-ui")) return;
  fellBack = true;
  const box = document.getElementById("reference");
  box.hidden = false;
  box.innerHTML = '<p class="notice"></p><div id="ops">Loading /openapi.json\u2026</div>';
  box.querySelector(".notice").textContent = "Swagger UI could not be loaded from " + ASSETS + " (" + why + "). " +
    "This is the built-in reference, from /openapi.json. For the full Swagger UI, serve a copy of " +
    "swagger-ui-dist and start the server with --docs-assets-url pointing at it.";
  fetch("/openapi.json").then((r) => r.json()).then(render).catch((err) => {{
    document.getElementById("ops").textContent = "/openapi.json could not be read: " + err;
  }});
}}
function el(tag, text, cls) {{
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}}
function prose(tag, text) {{  // the document's `code` spans as code, the rest as text
  const node = el(tag);
  String(text).split("`").forEach((part, i) => node.append(i % 2 ? el("code", part) : part));
  return node;
}}
function render(doc) {{
  const refOf = (schema) => (schema && schema.$ref ? doc.components.schemas[schema.$ref.split("/").pop()] : schema);
  function describe(schema, depth) {{
    schema = refOf(schema) || {{}};
    const pad = "  ".repeat(depth);
    let type = [].concat(schema.type || (schema.oneOf ? "one of" : "any")).join(" | ");
    if (schema.enum) type += " (" + schema.enum.map((v) => JSON.stringify(v)).join(", ") + ")";
    if (schema.type === "array" && depth < 6) return type + " of " + describe(schema.items, depth);
    if (!schema.properties || depth >= 6) return type;
    const required = new Set(schema.required || []);
    return type + " {{\n" + Object.entries(schema.properties).map(([name, sub]) =>
      pad + "  " + name + (required.has(name) ? "" : "?") + ": " + describe(sub, depth + 1) +
      (refOf(sub) && refOf(sub).description ?
        "  \u2014 " + refOf(sub).description.split("\n")[0].replace(/`/g, "") : "")
    ).join("\n") + "\n" + pad + "}}";
  }}
  const ops = document.getElementById("ops");
  ops.textContent = "";
  ops.append(el("h1", doc.info.title + " " + doc.info.version), prose("p", doc.info.description || ""));
  for (const [path, methods] of Object.entries(doc.paths)) {{
    for (const [method, op] of Object.entries(methods)) {{
      const box = el("section", undefined, "op");
      box.id = "op-" + op.operationId;
      const head = el("h3");
      head.append(el("span", method.toUpperCase(), "method " + method), el("code", path), " " + (op.summary || ""));
      box.append(head);
      if (op.description) box.append(prose("p", op.description));
      if (op.parameters && op.parameters.length) {{
        box.append(el("h4", "Parameters"));
        const table = el("table");
        table.innerHTML = "<tr><th>name</th><th>in</th><th>type</th><th>description</th></tr>";
        for (const p of op.parameters) {{
          const tr = el("tr");
          tr.append(el("td", p.name + (p.required ? " *" : "")), el("td", p.in), el("td", describe(p.schema, 0)),
                    prose("td", (p.description || (p.schema && p.schema.description) || "")));
          table.append(tr);
        }}
        box.append(table);
      }}
      const body = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
      if (body) {{
        box.append(el("h4", "Request body"), el("pre", describe(body.schema, 0)));
        const example = body.example || (body.examples && Object.values(body.examples)[0].value);
        if (example) box.append(el("h4", "Example"), el("pre", JSON.stringify(example, null, 2)));
      }}
      box.append(el("h4", "Responses"));
      for (const [code, reply] of Object.entries(op.responses || {{}})) {{
        const json = reply.content && Object.values(reply.content)[0];
        box.append(prose("p", code + ": " + (reply.description || "")));
        if (json && json.schema) box.append(el("pre", describe(json.schema, 0)));
      }}
      ops.append(box);
    }}
  }}
}}
// Both added from here, not in the markup: a stylesheet or script that never answers would
// otherwise hold the whole page blank.
const style = document.createElement("link");
style.rel = "stylesheet";
style.href = ASSETS + "/swagger-ui.css";
document.head.append(style);
const script = document.createElement("script");
script.src = ASSETS + "/swagger-ui-bundle.js";
script.onload = () => {{
  if (fellBack) return;
  window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true}});
}};
script.onerror = () => fallBack("it did not load");
document.head.append(script);
setTimeout(() => window.SwaggerUIBundle || fallBack("no answer within 5 seconds"), 5000);
</script>
</body></html>
"""


# The live view at /ui: one self-contained page (no external asset, works offline).
# It loads the newest events, then follows /events/stream from the last position;
# it keeps at most MAX_ROWS rows in the DOM and MAX_EVENTS events in memory. A selected
# workflow (/ui?workflow=ID) gets a timeline: one SVG bar per agent, nested under its parent
# and coloured by its state, drawn from a stream of the workflow's events of its own.
UI_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Eventuali live view</title>
<style>
:root { font: 13px/1.4 system-ui, sans-serif; color: #1d2433; background: #f5f6f8;
        --running: #2f6fde; --completed: #1f9d55; --failed: #d92d20; }
body { margin: 0; display: grid; grid-template-rows: auto 1fr; height: 100vh; }
header { display: flex; gap: .5rem; align-items: center; padding: .5rem .8rem; background: #1d2433; color: #fff;
         flex-wrap: wrap; }
header h1 { font-size: 15px; margin: 0 1rem 0 0; }
header input, header select, header button { font: inherit; padding: .2rem .4rem; border-radius: 4px;
                                             border: 1px solid #888; }
#status { margin-left: auto; font-size: 12px; }
#status.live::before { content: "\25CF "; color: #3ddc84; }
#status.down::before { content: "\25CF "; color: #ff6b6b; }
main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: .6rem; padding: .6rem; min-height: 0; }
#left, #side { display: flex; flex-direction: column; gap: .6rem; min-height: 0; }
#left > section:last-child { flex: 1; }
section { background: #fff; border-radius: 6px; box-shadow: 0 1px 2px #0002; overflow: auto; min-height: 0; }
section h2 { font-size: 13px; margin: 0; padding: .4rem .6rem; position: sticky; top: 0; background: #eef0f4;
             z-index: 1; display: flex; gap: .5rem; align-items: center; flex-wrap: wrap; }
table { border-collapse: collapse; width: 100%; }
td { padding: .2rem .5rem; border-bottom: 1px solid #eee; white-space: nowrap; overflow: hidden;
     text-overflow: ellipsis; max-width: 16rem; }
tr.event { cursor: pointer; } tr.event:hover { background: #f0f6ff; } tr.selected { background: #dbe9ff; }
.k-AgentEvent { color: #0b62d6; } .k-WorkflowEvent { color: #8a3ffc; } .k-SystemEvent { color: #6f6f6f; }
.wf { padding: .4rem .6rem; border-bottom: 1px solid #eee; cursor: pointer; } .wf:hover { background: #f0f6ff; }
.wf b { font-weight: 600; } .muted { color: #777; font-size: 12px; }
ul.tree { list-style: none; margin: .2rem 0 0 .2rem; padding-left: .8rem; border-left: 1px dashed #ccc; }
#timeline { flex: 0 0 auto; max-height: 60vh; }
#timeline[hidden] { display: none; }
.badge { padding: 0 .45rem; border-radius: 9px; color: #fff; font-size: 12px; font-weight: 600; }
.badge.s-running { background: var(--running); } .badge.s-completed { background: var(--completed); }
.badge.s-failed { background: var(--failed); }
#tl-svg { display: block; font-size: 12px; }
#tl-svg .bar, #tl-svg .wfbar { cursor: pointer; }
#tl-svg .s-running { fill: var(--running); } #tl-svg .s-completed { fill: var(--completed); }
#tl-svg .s-failed { fill: var(--failed); }
#tl-svg .ticks { stroke: #fff; stroke-opacity: .75; stroke-width: 1; pointer-events: none; }
#tl-svg .call { fill: #1d2433; fill-opacity: .45; cursor: pointer; stroke: #fff; stroke-width: 1; }
#tl-svg .call.model { fill: #8a3ffc; fill-opacity: .8; } #tl-svg .call.tool { fill: #e07b00; fill-opacity: .8; }
#tl-svg .call.failed { fill: var(--failed); fill-opacity: 1; }
header nav a { color: #fff; margin-right: .6rem; text-decoration: none; opacity: .75; }
header nav a.current { opacity: 1; text-decoration: underline; font-weight: 600; }
main[hidden], header [hidden] { display: none; }
#runs-view { display: block; padding: .6rem; overflow: auto; } #runs-view[hidden] { display: none; }
#runs th { text-align: left; font-weight: 600; padding: .3rem .5rem; border-bottom: 1px solid #ccd; background: #eef0f4;
           position: sticky; top: 2rem; }
#runs tr.run { cursor: pointer; } #runs tr.run:hover { background: #f0f6ff; }
#runs td.num { text-align: right; } #runs td.prompt { max-width: 28rem; color: #555; }
#runs td.failures.some { color: var(--failed); font-weight: 600; }
#tl-svg .label { fill: #1d2433; cursor: pointer; } #tl-svg .label.failed { fill: var(--failed); font-weight: 700; }
#tl-svg .axis { stroke: #c9ced8; } #tl-svg .axis-text { fill: #777; font-size: 11px; }
#tl-svg .rowline { stroke: #f0f1f4; }
#tl-svg g.agent.selected .bar { stroke: #1d2433; stroke-width: 2; }
#agent-panel[hidden] { display: none; }
#detail { max-height: 40vh; flex: 0 0 auto; }
pre { margin: 0; padding: .5rem .6rem; font-size: 12px; white-space: pre-wrap; word-break: break-all; }
dialog input { width: 20rem; }
</style></head>
<body>
<header>
  <h1>Eventuali</h1>
  <nav><a id="nav-runs" href="/ui?view=runs">Runs</a><a id="nav-live" href="/ui">Live</a></nav>
  <span id="live-controls">
  <select id="f-type" title="event type"><option value="">all types</option>
    <option>AgentEvent</option><option>WorkflowEvent</option><option>SystemEvent</option></select>
  <input id="f-aggregate" placeholder="aggregate id" size="14">
  <input id="f-workflow" placeholder="workflow id" size="18" title="a workflow: its timeline and its events">
  <input id="f-name" placeholder="event name" size="14">
  <button id="pause">Pause</button>
  </span>
  <select id="r-state" title="state" hidden><option value="">all states</option><option>running</option>
    <option>completed</option><option>failed</option></select>
  <span id="status" class="down">connecting</span>
</header>
<main id="runs-view" hidden>
  <section><h2>Runs <span class="muted" id="r-figures"></span></h2>
    <table id="runs"><thead><tr><th>state</th><th>run</th><th>started</th><th>duration</th><th>agents</th>
      <th>tokens</th><th>cost</th><th>failures</th><th>prompt</th></tr></thead><tbody id="runs-body"></tbody></table>
  </section>
</main>
<main id="live-view">
  <div id="left">
    <section id="timeline" hidden><h2>Timeline <b id="tl-title"></b> <span id="tl-badge" class="badge"></span>
      <span class="muted" id="tl-figures"></span></h2>
      <svg id="tl-svg" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="workflow timeline"></svg></section>
    <section><h2>Events <span class="muted" id="count"></span></h2>
      <table><tbody id="tail"></tbody></table></section>
  </div>
  <div id="side">
    <section id="agent-panel" hidden>
      <h2>Agent <b id="agent-title"></b> <span class="muted" id="agent-figures"></span></h2>
      <table><tbody id="agent-events"></tbody></table></section>
    <section><h2>Workflows <span class="muted">click one for its timeline</span></h2>
      <div id="workflows"></div></section>
    <section id="detail"><h2>Event</h2><pre id="json">Click an event to see all of it.</pre></section>
  </div>
</main>
<dialog id="keydialog"><form method="dialog">
  <p>This server needs its API key.</p><input id="keyinput" type="password" autocomplete="off">
  <button>Use key</button></form></dialog>
<script>
"use strict";
const MAX_ROWS = 500, MAX_EVENTS = 10000, MAX_WORKFLOWS = 200, MAX_TIMELINE_EVENTS = 100000;
const STATES = __STATES__;  // the last word of an event name -> the state it means (the server's STATE_RULES)
const CALLS = __CALLS__;  // the server's USAGE_RULES: operations of model and tool calls, words that start one
const RUNS_LIMIT = 1000;
const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("eventuali-key") || "";
let source = null, lastId = 0, paused = false, held = [], events = [], selected = null;
const workflows = new Map();  // workflow_id -> {status, first, last, agents: Map}

function filters() {
  const f = {event_type: $("f-type").value, aggregate_id: $("f-aggregate").value.trim(),
             workflow_id: $("f-workflow").value.trim(), event_name: $("f-name").value.trim()};
  return Object.fromEntries(Object.entries(f).filter(([, v]) => v));
}
function query(extra) { return new URLSearchParams({...filters(), ...extra}).toString(); }
async function api(path) {
  const reply = await fetch(path, {headers: key ? {Authorization: "Bearer " + key} : {}});
  if (reply.status === 401) { await askKey(); return api(path); }
  if (!reply.ok) throw new Error(path + ": " + reply.status);
  return reply.json();
}
let asking = null;
function askKey() {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const dialog = $("keydialog");
    dialog.addEventListener("close", () => {
      key = $("keyinput").value; sessionStorage.setItem("eventuali-key", key); asking = null; resolve();
    }, {once: true});
    dialog.showModal();
  });
  return asking;
}
function setStatus(text, live) { $("status").textContent = text; $("status").className = live ? "live" : "down"; }
function stateOf(name) {
  const words = name.toLowerCase().split(/[._:\/ -]/);
  return STATES[words[words.length - 1]] || STATES[words.slice(-2).join("_")] || "running";
}
// an agent's or a workflow's own lifecycle event (its name's first word is the kind) sets its state
function lifecycle(kind, name) {
  return name.toLowerCase().split(/[._:\/ -]/)[0] === kind ? stateOf(name) : null;
}
function isStart(name) {
  const words = name.toLowerCase().split(/[._:\/ -]/);
  return CALLS.start.includes(words[words.length - 1]);
}
function callKind(attrs) {
  const op = attrs["gen_ai.operation.name"];
  if (CALLS.tool.includes(op)) return "tool";
  if (CALLS.model.includes(op) || "gen_ai.usage.input_tokens" in attrs || "gen_ai.usage.output_tokens" in attrs)
    return "model";
  return CALLS.container.includes(op) ? null : attrs["gen_ai.tool.call.id"] ? "tool" : null;
}
function failure(e) {  // what a failed call says of itself
  const a = e.attributes || {}, x = (a["otel.exceptions"] || [])[0];
  return a["otel.status_description"] || (x && x.message) || a["error.message"] || a["error.type"] || "";
}
function tokens(u) {
  const n = u ? u.input_tokens + u.output_tokens : 0;
  return n >= 1e6 ? (n / 1e6).toFixed(1) + "M" : n >= 1e3 ? (n / 1e3).toFixed(1) + "k" : String(n);
}
function money(usd) {
  return usd === null || usd === undefined ? "" : "$" + (usd < 1 ? usd.toFixed(4) : usd.toFixed(2));
}
function usageText(u) {
  if (!u || !(u.input_tokens + u.output_tokens || u.cost)) return "";
  return [tokens(u) + " tok", money(u.cost)].filter(Boolean).join(" · ");
}
function usageTitle(u) {
  if (!u) return "";
  return `tokens in ${u.input_tokens} (cache read ${u.cache_read_input_tokens},` +
         ` written ${u.cache_creation_input_tokens}), out ${u.output_tokens}` +
         ` (reasoning ${u.reasoning_output_tokens});` +
         ` ${u.model_calls} model calls, ${u.tool_calls} tool calls, ${u.failed_events} failed events;` +
         ` cost ${u.cost === null ? "unknown" : money(u.cost)}` +
         (u.unpriced_calls ? ` (${u.unpriced_calls} calls without a price)` : "");
}
function span(ms) {
  if (!(ms >= 0)) return "";
  return ms < 1000 ? Math.round(ms) + " ms" : ms < 60000 ? (ms / 1000).toFixed(1) + " s"
       : ms < 3600000 ? (ms / 60000).toFixed(1) + " min" : (ms / 3600000).toFixed(1) + " h";
}
function duration(a, b) { return span(Date.parse(b) - Date.parse(a)); }
function showJSON(e, tr) {
  if (selected) selected.classList.remove("selected");
  selected = tr; if (tr) tr.classList.add("selected");
  $("json").textContent = JSON.stringify(e, null, 2);
}

// -- the workflows list and the events table ----------------------------------------------
function remember(e) {
  const wfId = e.aggregate_type === "workflow_aggregate" ? e.aggregate_id : e.correlation_id;
  if (!wfId) return;
  let wf = workflows.get(wfId);
  if (!wf) {
    wf = {status: "", first: e.timestamp, last: e.timestamp, agents: new Map(), owners: new Map()};
    workflows.set(wfId, wf);
    if (workflows.size > MAX_WORKFLOWS) workflows.delete(workflows.keys().next().value);
  }
  if (e.timestamp < wf.first) wf.first = e.timestamp;
  if (e.timestamp > wf.last) wf.last = e.timestamp;
  if (e.aggregate_type === "workflow_aggregate") wf.status = e.event_name;
  if (e.aggregate_type === "agent_aggregate") {
    let a = wf.agents.get(e.aggregate_id);
    if (!a) {
      a = {name: "", parent: null, status: "", count: 0, first: e.timestamp, last: e.timestamp};
      wf.agents.set(e.aggregate_id, a);
    }
    a.count += 1; a.status = e.event_name; a.last = e.timestamp;
    if (e.agent_name) a.name = e.agent_name;
    // the parent by the server's rules, as far as the events in hand tell
    if (wf.owners.size < MAX_EVENTS) wf.owners.set(e.event_id, e.aggregate_id);
    const cause = e.causation_id, owner = wf.agents.has(cause) ? cause : wf.owners.get(cause);
    if (a.parent === null && cause && cause !== e.aggregate_id && owner !== e.aggregate_id) {
      if (cause === wfId) a.parent = "";
      else if (owner) a.parent = owner;
    }
  }
}
function row(e, columns) {
  const tr = document.createElement("tr");
  tr.className = "event"; tr.dataset.position = e.position;
  for (const [text, cls] of columns) {
    const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.append(td);
  }
  tr.addEventListener("click", () => showJSON(e, tr));
  return tr;
}
function tailRow(e) {
  return row(e, [[e.position, "muted"], [e.timestamp.slice(11, 23), "muted"], [e.event_type, "k-" + e.event_type],
                 [e.event_name, ""], [e.aggregate_id, ""], [e.correlation_id || "", "muted"]]);
}
let drawPending = false;
function draw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => {
    drawPending = false; drawWorkflows(); $("count").textContent = "(" + events.length + ")";
  });
}
function drawWorkflows() {
  const box = $("workflows"); box.textContent = "";
  for (const [id, wf] of [...workflows].reverse().slice(0, 50)) {
    const div = document.createElement("div"); div.className = "wf"; div.dataset.workflow = id;
    div.innerHTML = "<b></b> <span class=muted></span>";
    div.querySelector("b").textContent = id;
    div.querySelector("span").textContent = [wf.status, duration(wf.first, wf.last)].filter(Boolean).join(" · ");
    div.addEventListener("click", () => selectWorkflow(id));
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
        li.textContent = (a.name || agentId) + " — " + a.status + " · " + a.count +
                         (a.count === 1 ? " event" : " events") +
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
  for (const e of list) rows.prepend(tailRow(e));
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
function follow(params, onEvent, onState) {
  // An EventSource that resumes by itself (Last-Event-ID); when the browser gives up, a new one
  // resumes after the last position seen.
  let es = null, closed = false;
  const open = () => {
    if (closed) return;
    const p = {...params(), ...(key ? {access_token: key} : {})};
    es = new EventSource("/events/stream?" + new URLSearchParams(p));
    es.addEventListener("open", () => onState && onState(true));
    es.addEventListener("event", (m) => onEvent(JSON.parse(m.data)));
    es.addEventListener("error", () => {
      if (onState) onState(false);
      if (es.readyState === EventSource.CLOSED) setTimeout(open, 3000);
    });
  };
  open();
  return {close() { closed = true; if (es) es.close(); }};
}
function connect() {
  if (source) source.close();
  source = follow(() => ({...filters(), after: String(lastId)}), receive,
                  (live) => setStatus(live ? "live" : "reconnecting", live));
}
async function start() {
  if (source) source.close();
  lastId = 0; events = []; held = []; workflows.clear(); $("tail").textContent = "";
  const page = await api("/events/?" + query({limit: "500"}));
  const history = page.events.reverse();
  for (const e of history) { events.push(e); remember(e); lastId = Math.max(lastId, e.position); }
  show(history); draw(); connect();
}

// -- the timeline of the selected workflow -------------------------------------------------
// Its events come from a stream of their own (all of them, then live); the agents' parents
// from /events/workflows/{id}/agents, asked again when an agent it did not know appears.
let tl = null;
function selectWorkflow(id) {
  $("f-workflow").value = id;
  changed();
}
function openTimeline(id) {
  if (tl) { tl.source.close(); tl = null; }
  $("timeline").hidden = !id; $("agent-panel").hidden = true;
  const url = new URL(location.href);
  if (id) url.searchParams.set("workflow", id); else url.searchParams.delete("workflow");
  history.replaceState(null, "", url);
  if (!id) return;
  tl = {id, agents: new Map(), own: [], calls: new Map(), count: 0, last: 0, t0: Infinity, t1: -Infinity,
        known: new Set(), opened: new Map(), callEvents: new Map(), lifecycle: "", usage: null, soon: null,
        fetching: false, again: false, pending: false, chosen: null};
  $("tl-title").textContent = id;
  const mine = tl;
  tl.source = follow(() => ({workflow_id: id, after: String(mine.last)}), (e) => timelineEvent(mine, e));
  askParents();
  drawTimeline();
}
function agentOf(id) {
  let a = tl.agents.get(id);
  if (!a) {
    a = {id, name: "", parent: undefined, first: Infinity, last: -Infinity, firstPos: Infinity, status: "",
         state: "running", events: [], calls: [], usage: null};
    tl.agents.set(id, a);
  }
  return a;
}
function timelineEvent(mine, e) {
  if (tl !== mine || e.position <= tl.last) return;
  tl.last = e.position; tl.count += 1;
  const ms = Date.parse(e.timestamp);
  e.ms = ms;
  if (ms < tl.t0) tl.t0 = ms;
  if (ms > tl.t1) tl.t1 = ms;
  const keep = tl.count <= MAX_TIMELINE_EVENTS;
  if (e.aggregate_type === "workflow_aggregate" && e.aggregate_id === tl.id) {
    if (keep) tl.own.push(e);
    tl.status = e.event_name;
    if (lifecycle("workflow", e.event_name)) tl.lifecycle = e.event_name;
  } else if (e.aggregate_type === "agent_aggregate") {
    const a = agentOf(e.aggregate_id);
    if (keep) a.events.push(e);
    if (ms < a.first) a.first = ms;
    if (ms > a.last) a.last = ms;
    if (e.position < a.firstPos) a.firstPos = e.position;
    a.status = e.event_name; a.state = lifecycle("agent", e.event_name) || a.state;
    if (e.agent_name) a.name = e.agent_name;
    if (keep) nativeCall(a, e, ms);
    if (!tl.known.has(a.id) || (e.causation_id && a.parent === undefined)) askParents();
  } else if (e.aggregate_type === "system_aggregate" && e.causation_id) {  // a call: a model, a tool, a span
    const attrs = e.attributes || {}, end = Date.parse(attrs["otel.end_time"] || e.timestamp);
    if (end > tl.t1) tl.t1 = end;
    if (keep || tl.calls.has(e.aggregate_id)) {
      tl.calls.set(e.aggregate_id, {cause: tl.calls.has(e.aggregate_id) ? tl.calls.get(e.aggregate_id).cause :
        e.causation_id, e, start: ms, end, failed: stateOf(e.event_name) === "failed", kind: callKind(attrs)});
      tl.callEvents.set(e.aggregate_id, e);
    }
  }
  if (!tl.soon) tl.soon = setTimeout(() => { mine.soon = null; askParents(); }, 1000);  // usage: once a second
  drawTimeline();
}
function nativeCall(a, e, ms) {
  // An emitted model or tool call: from its start to its end where a start is found (the same
  // gen_ai.tool.call.id, or the end's causation_id naming the start), else a mark at its time.
  const attrs = e.attributes || {}, kind = callKind(attrs), callId = attrs["gen_ai.tool.call.id"];
  if (!kind) return;
  if (isStart(e.event_name)) { tl.opened.set(callId || e.event_id, ms); return; }
  const key = callId && tl.opened.has(callId) ? callId : tl.opened.has(e.causation_id) ? e.causation_id : null;
  const start = key === null ? ms : tl.opened.get(key);
  if (key !== null) tl.opened.delete(key);
  a.calls.push({e, start, end: ms, failed: stateOf(e.event_name) === "failed", kind});
  tl.callEvents.set(e.event_id, e);
}
function callsByOwner() {
  // a call belongs to the agent its cause leads to, through other calls (the server's parent rules)
  const out = new Map();
  for (const [id, c] of tl.calls) {
    let cause = c.cause;
    const seen = new Set([id]);
    while (tl.calls.has(cause) && !tl.agents.has(cause) && !seen.has(cause)) {
      seen.add(cause); cause = tl.calls.get(cause).cause;
    }
    const owner = tl.agents.has(cause) ? cause : "";
    if (!out.has(owner)) out.set(owner, []);
    out.get(owner).push(c);
  }
  return out;
}
function askParents() {
  if (!tl) return;
  if (tl.fetching) { tl.again = true; return; }
  const mine = tl;
  mine.fetching = true; mine.again = false;
  api("/events/workflows/" + encodeURIComponent(mine.id) + "/agents").then((summary) => {
    if (tl !== mine) return;
    for (const s of summary.agents) {
      const a = agentOf(s.agent_id);
      a.parent = s.parent_agent_id; mine.known.add(s.agent_id); a.usage = s.usage;
      if (s.agent_name) a.name = s.agent_name;
    }
    mine.usage = summary.workflow.usage;
    drawTimeline();
  }).catch(() => {}).finally(() => {
    mine.fetching = false;
    if (mine.again && tl === mine) setTimeout(askParents, 100);
  });
}
function workflowState() {
  if (tl.lifecycle) return stateOf(tl.lifecycle);
  const states = new Set([...tl.agents.values()].map((a) => a.state));
  return states.has("running") || !states.size ? "running" : states.has("failed") ? "failed" : "completed";
}
function drawTimeline() {
  if (!tl || tl.pending) return;
  tl.pending = true;
  const mine = tl;
  requestAnimationFrame(() => { mine.pending = false; if (tl === mine) renderTimeline(); });
}
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
function rows() {
  // depth first: roots in order of their first event, each followed by its children
  const agents = tl.agents, children = new Map(), out = [], placed = new Set();
  for (const a of agents.values()) {
    const parent = a.parent && a.parent !== a.id && agents.has(a.parent) ? a.parent : "";
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(a);
  }
  for (const list of children.values()) list.sort((x, y) => x.firstPos - y.firstPos);
  const stack = [...(children.get("") || [])].reverse().map((a) => [a, 0]);
  while (stack.length) {
    const [a, depth] = stack.pop();
    if (placed.has(a.id)) continue;
    placed.add(a.id); out.push([a, depth]);
    for (const c of [...(children.get(a.id) || [])].reverse()) stack.push([c, depth + 1]);
  }
  for (const a of agents.values()) if (!placed.has(a.id)) out.push([a, 0]);  // in a cycle
  return out;
}
function renderTimeline() {
  const svg = $("tl-svg"), state = workflowState();
  const width = Math.max(600, svg.parentElement.clientWidth - 4), LABEL = 230, ROW = 20, TOP = 26;
  const t0 = tl.t0 === Infinity ? 0 : tl.t0, t1 = Math.max(tl.t1, t0 + 1);
  const plot = width - LABEL - 16, x = (ms) => LABEL + ((ms - t0) / (t1 - t0)) * plot;
  const list = rows(), height = TOP + ROW * (list.length + 1) + 6;
  $("tl-badge").textContent = state; $("tl-badge").className = "badge s-" + state;
  const failed = list.filter(([a]) => a.state === "failed").length;
  $("tl-figures").textContent = [tl.status || "", span(tl.t1 - tl.t0), list.length + " agents",
    tl.count + " events", failed ? failed + " failed" : "", usageText(tl.usage)].filter(Boolean).join(" · ");
  $("tl-figures").title = usageTitle(tl.usage);
  const parts = [];
  for (let i = 0; i <= 5; i++) {  // the time axis
    const ms = t0 + ((t1 - t0) * i) / 5, px = x(ms).toFixed(1);
    const anchor = ["start", "middle", "end"][i && (i < 5 ? 1 : 2)];
    parts.push(`<line class="axis" x1="${px}" x2="${px}" y1="${TOP - 6}" y2="${height}"/>`,
               `<text class="axis-text" x="${px}" y="${TOP - 10}" text-anchor="${anchor}">` +
               `+${esc(span(ms - t0))}</text>`);
  }
  const bar = (cls, y, first, last) => {
    const x1 = x(first), w = Math.max(3, x(last) - x1);
    return `<rect class="${cls}" x="${x1.toFixed(1)}" y="${y + 3}" width="${w.toFixed(1)}" height="${ROW - 6}"` +
           ' rx="3"/>';
  };
  const label = (state, indent, y, text, title, usage) =>
    `<text class="label${state === "failed" ? " failed" : ""}" x="${6 + indent * 14}" y="${y + 14}">` +
    `${state === "failed" ? "\u2716 " : ""}${esc(text.slice(0, usage ? 24 : 40))}` +
    `${usage ? `<tspan class="usage" dx="6">${esc(usage)}</tspan>` : ""}<title>${esc(title)}</title></text>`;
  const ticks = (list, y) => {
    let d = "";
    for (const e of list) d += `M${x(e.ms).toFixed(1)} ${y + 4}v${ROW - 8}`;
    return d ? `<path class="ticks" d="${d}"/>` : "";
  };
  const owners = callsByOwner();
  const calls = (list, y) => list.map((c) => {
    const x1 = x(c.start), w = Math.max(2, x(c.end) - x1), id = c.e.aggregate_type === "system_aggregate" ?
      c.e.aggregate_id : c.e.event_id, why = c.failed ? failure(c.e) : "";
    return `<rect class="call ${c.kind || "other"}${c.failed ? " failed" : ""}" data-call="${esc(id)}"` +
           ` x="${x1.toFixed(1)}" y="${y + ROW - 8}" width="${w.toFixed(1)}" height="5">` +
           `<title>${esc(c.e.event_name + (why ? ": " + why : ""))}</title></rect>`;
  }).join("");
  let y = TOP;
  parts.push(`<g class="workflow" data-state="${state}">` +
             label(state, 0, y, "workflow " + tl.id, (tl.status || "") + "\n" + usageTitle(tl.usage)) +
             (tl.count ? bar("wfbar s-" + state, y, t0, tl.t1) : "") + ticks(tl.own, y) +
             calls(owners.get("") || [], y) + "</g>");
  let drawn = tl.own.length;
  for (const [a, depth] of list) {
    y += ROW;
    const parent = a.parent && tl.agents.has(a.parent) ? a.parent : "";
    parts.push(`<g class="agent" data-agent="${esc(a.id)}" data-parent="${esc(parent)}" data-depth="${depth}"` +
               ` data-state="${a.state}"><line class="rowline" x1="0" x2="${width}" y1="${y + ROW}" y2="${y + ROW}"/>` +
               label(a.state, depth, y, a.name || a.id, a.id + ": " + a.status + "\n" + usageTitle(a.usage),
                     usageText(a.usage)) +
               (a.first <= a.last ? bar("bar s-" + a.state, y, a.first, a.last) : "") + ticks(a.events, y) +
               calls([...(owners.get(a.id) || []), ...a.calls], y) + "</g>");
    drawn += a.events.length;
  }
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.dataset.events = drawn; svg.dataset.agents = list.length;
  svg.innerHTML = parts.join("");
  if (tl.chosen) {
    const g = svg.querySelector(`g.agent[data-agent="${CSS.escape(tl.chosen)}"]`);
    if (g) g.classList.add("selected");
  }
}
function showAgent(id) {
  const a = tl && tl.agents.get(id);
  if (!a) return;
  tl.chosen = id; renderTimeline();
  $("agent-panel").hidden = false;
  $("agent-title").textContent = a.name ? a.name + " (" + id + ")" : id;
  const parent = a.parent && tl.agents.get(a.parent);
  $("agent-figures").textContent = [a.state, a.status, a.events.length + " events",
    span(a.last - a.first), parent ? "under " + (parent.name || parent.id) : "", usageText(a.usage),
    a.usage && a.usage.model_calls ? a.usage.model_calls + " model calls" : "",
    a.usage && a.usage.tool_calls ? a.usage.tool_calls + " tool calls" : ""].filter(Boolean).join(" · ");
  $("agent-figures").title = usageTitle(a.usage);
  const owners = new Map();  // event id -> its agent, for causes that name an event
  for (const other of tl.agents.values()) for (const e of other.events) owners.set(e.event_id, other);
  const cause = (id) => {  // a cause by the agent it names, where one is known
    const agent = tl.agents.get(id) || owners.get(id);
    return !id ? "" : agent ? "← " + (agent.name || agent.id) : id === tl.id ? "← workflow" : id;
  };
  const body = $("agent-events"), rowsOut = document.createDocumentFragment();
  for (const e of a.events.slice(-MAX_ROWS)) {
    rowsOut.append(row(e, [[e.position, "muted"], [e.timestamp.slice(11, 23), "muted"], [e.event_name, ""],
                           [cause(e.causation_id), "muted"]]));
  }
  body.textContent = ""; body.append(rowsOut);
}
$("tl-svg").addEventListener("click", (event) => {
  const call = event.target.closest("rect.call"), g = event.target.closest("g.agent");
  if (call && tl && tl.callEvents.has(call.dataset.call)) showJSON(tl.callEvents.get(call.dataset.call), null);
  else if (g) showAgent(g.dataset.agent);
  else if (event.target.closest("g.workflow") && tl && tl.own.length) showJSON(tl.own[tl.own.length - 1], null);
});
window.addEventListener("resize", () => drawTimeline());

// -- the runs: the index of workflows, live ----------------------------------------------------
let runsBusy = false, runsAgain = false, runsTimer = null;
async function loadRuns() {
  if (runsBusy) { runsAgain = true; return; }
  runsBusy = true;
  try {
    const state = $("r-state").value;
    const params = {limit: String(RUNS_LIMIT), ...(state ? {state} : {})};
    drawRuns(await api("/events/workflows?" + new URLSearchParams(params)));
  } catch (err) { setStatus(String(err), false); }
  runsBusy = false;
  if (runsAgain) { runsAgain = false; loadRuns(); }
}
function drawRuns(page) {
  const rowsOut = document.createDocumentFragment();
  for (const w of page.workflows) {
    const u = w.usage, tr = document.createElement("tr");
    tr.className = "run"; tr.dataset.workflow = w.workflow_id; tr.dataset.state = w.state;
    const started = w.start_time ? new Date(w.start_time).toLocaleString() : "";
    const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s");
    const failures = w.failed_agents + u.failed_events ?
      plural(w.failed_agents, "agent") + ", " + plural(u.failed_events, "event") : "";
    for (const [text, cls, title] of [
      [w.state, "state"], [w.name || w.workflow_id, "", w.workflow_id + (w.service ? " · " + w.service : "")],
      [started, "muted"], [span(w.duration_seconds * 1000), "num"], [String(w.agent_count), "num"],
      [tokens(u), "num", usageTitle(u)], [money(u.cost) + (u.unpriced_calls ? " *" : ""), "num", usageTitle(u)],
      [failures, "failures" + (failures ? " some" : "")], [w.user_prompt || "", "prompt", w.user_prompt || ""],
    ]) {
      const td = document.createElement("td");
      if (cls === "state") {
        const badge = document.createElement("span");
        badge.className = "badge s-" + text; badge.textContent = text; td.append(badge);
      } else td.textContent = text;
      if (cls && cls !== "state") td.className = cls;
      if (title) td.title = title;
      tr.append(td);
    }
    tr.addEventListener("click", () => { location.href = "/ui?workflow=" + encodeURIComponent(w.workflow_id); });
    rowsOut.append(tr);
  }
  $("runs-body").textContent = ""; $("runs-body").append(rowsOut);
  $("runs").dataset.rows = page.workflows.length;
  $("r-figures").textContent = page.total + (page.total === 1 ? " run" : " runs") +
    (page.total > page.workflows.length ? ` (the ${page.workflows.length} with the latest activity)` : "");
}
async function startRuns() {
  $("runs-view").hidden = false; $("live-view").hidden = true; $("live-controls").hidden = true;
  $("r-state").hidden = false; $("nav-runs").className = "current";
  const state = new URLSearchParams(location.search).get("state");
  if (state) $("r-state").value = state;
  $("r-state").addEventListener("change", () => {
    const url = new URL(location.href);
    if ($("r-state").value) url.searchParams.set("state", $("r-state").value); else url.searchParams.delete("state");
    history.replaceState(null, "", url); loadRuns();
  });
  const top = await api("/events/?limit=1");
  lastId = top.events.length ? top.events[0].position : 0;
  await loadRuns();
  // each new event may change a run: the index is asked again, at most once a second
  follow(() => ({after: String(lastId)}), (e) => {
    lastId = Math.max(lastId, e.position);
    if (!runsTimer) runsTimer = setTimeout(() => { runsTimer = null; loadRuns(); }, 1000);
  }, (live) => setStatus(live ? "live" : "reconnecting", live));
}

// -- controls ----------------------------------------------------------------------------
$("pause").addEventListener("click", () => {
  paused = !paused;
  if (!paused) { show(held); held = []; }
  $("pause").textContent = paused ? "Resume" : "Pause";
});
function changed() {
  const id = $("f-workflow").value.trim();
  if (!tl || tl.id !== id) openTimeline(id);
  start().catch((err) => setStatus(String(err), false));
}
let debounce = null;
for (const id of ["f-type", "f-aggregate", "f-workflow", "f-name"])
  $(id).addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(changed, 300); });
if (new URLSearchParams(location.search).get("view") === "runs") {
  startRuns().catch((err) => setStatus(String(err), false));
} else {
  $("nav-live").className = "current";
  $("f-workflow").value = new URLSearchParams(location.search).get("workflow") || "";
  changed();
}
</script>
</body></html>
"""


app = lazy_app()

if __name__ == "__main__":
    main()
