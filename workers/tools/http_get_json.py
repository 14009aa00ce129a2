"""HTTP_GET_JSON: GET a URL and return its status and JSON body, guarded against SSRF.

Output: ``{"status": int, "body": json | null, "truncated": bool, "bytesReturned": int,
"error": str | null}``.

- A network error, a timeout, or a 5xx or 429 answer raises a retryable `ToolError`
  (the engine retries with backoff). Any other answer succeeds with its status (a 404
  succeeds with ``status: 404``).
- A body that is not JSON, or is JSON that jsonb cannot store (`engine.jsonb.check`: NUL or
  a lone surrogate in a string or key, a number out of range, nesting too deep...), succeeds
  with ``body: null`` and ``error`` saying why and where. A body over `MAX_BODY_BYTES`
  decoded bytes is not parsed: ``truncated: true``, ``body: null``.
- Every hop (the URL and each redirect, at most `MAX_REDIRECTS`) goes through
  `workers.tools.netguard`: http(s) only, no user-info, the host resolved once and every
  address checked; the request then goes to the checked address itself, with the real
  name in the ``Host`` header and in TLS SNI and certificate verification. A refused URL
  or address raises a non-retryable `ToolError` before anything is sent.
- Errors never contain URL user-info (refused anyway), queries or request headers.
- Headers sent: ``Idempotency-Key`` (``<runId>:<stepName>``) and, when tracing is on, the
  attempt span's W3C ``traceparent`` (`ToolContext.trace_context`, `engine.tracing`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import zlib
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine import jsonb
from engine.errors import ToolError, UnstorableJson
from engine.tools import ToolContext, tool
from workers.tools.netguard import (
    AddressCheck,
    check_address,
    check_url,
    describe,
    redact,
    resolve_checked,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 102_400  # decoded (decompressed) body bytes read before giving up
MAX_REDIRECTS = 5
MAX_URL_CHARS = 8192
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0  # also the write and pool timeouts: per phase, not in total
MAX_DEADLINE_S = 30.0  # the whole fetch: resolution, redirects and body
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "pgdag-http-get-json/1"


class HttpGetJsonInput(BaseModel):
    """HTTP_GET_JSON input: ``{"url": "http(s)://host/..."}`` with no user-info."""

    # hide_input_in_errors: str(ValidationError) must not echo a URL's credentials.
    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)
    url: str = Field(min_length=1, max_length=MAX_URL_CHARS)

    @field_validator("url")
    @classmethod
    def _fetchable(cls, value: str) -> str:
        check_url(value)  # raises ValueError with a message safe to show
        return value


@tool("HTTP_GET_JSON", HttpGetJsonInput)
async def http_get_json(inp: HttpGetJsonInput, ctx: ToolContext) -> dict[str, object]:
    """GET `inp.url` as JSON; see `get_json` for the output and the errors raised."""
    return await get_json(inp.url, ctx)


async def get_json(
    url: str, ctx: ToolContext, *, check: AddressCheck = check_address
) -> dict[str, object]:
    """GET `url` within ``min(ctx.timeout_ms, 30 s)`` and return the HTTP_GET_JSON output.

    `check` decides each resolved address (see `netguard.AddressCheck`); only tests pass
    another one. Raises `ToolError`: ``retryable=True`` on a network error, a timeout
    (connect 5 s, read 10 s, whole fetch the deadline above), or a 5xx or 429 answer;
    ``retryable=False`` on a refused URL or address, a refused redirect, more than
    `MAX_REDIRECTS` redirects, or a TLS certificate that does not verify.
    """
    try:
        target = check_url(url)
    except ValueError as exc:
        raise ToolError(str(exc), retryable=False) from None
    deadline_s = _deadline_s(ctx.timeout_ms)
    try:
        async with asyncio.timeout(deadline_s):
            return await _fetch(target, ctx, check)
    except TimeoutError:
        raise ToolError(
            f"timed out after {deadline_s:g} s fetching {describe(target)}", retryable=True
        ) from None
    except httpx.TimeoutException as exc:
        raise ToolError(
            f"timed out fetching {describe(target)} ({type(exc).__name__})", retryable=True
        ) from None
    except httpx.HTTPError as exc:
        raise ToolError(
            f"network error fetching {describe(target)}: {_detail(exc)}", retryable=True
        ) from None


def _deadline_s(timeout_ms: int | None) -> float:
    """The total deadline of one fetch, in seconds."""
    if timeout_ms is None:
        return MAX_DEADLINE_S
    return min(timeout_ms / 1000, MAX_DEADLINE_S)


def _detail(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _fetch(target: httpx.URL, ctx: ToolContext, check: AddressCheck) -> dict[str, object]:
    """Follow up to `MAX_REDIRECTS` redirects from `target` and read the final answer."""
    async with httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,  # no proxies from the environment: we connect to checked addresses
        timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        # No connection reuse: a pooled connection is keyed by IP, and may have been
        # opened (and its certificate checked) for another host name.
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:
        current = target
        for hop in range(MAX_REDIRECTS + 1):
            response = await _send(client, current, ctx, check, hop)
            try:
                location = response.headers.get("location")
                if response.status_code not in REDIRECT_STATUSES or location is None:
                    return await _result(response, current)
            finally:
                await response.aclose()
            following = _redirect_target(current, location)
            logger.debug(
                "run %s step %s attempt %d: redirect %d from %s to %s",
                ctx.run_id,
                ctx.step_name,
                ctx.attempt,
                hop + 1,
                describe(current),
                describe(following),
            )
            current = following
    raise ToolError(
        f"too many redirects fetching {describe(target)} (more than {MAX_REDIRECTS})",
        retryable=False,
    )


def _redirect_target(current: httpx.URL, location: str) -> httpx.URL:
    """The URL a ``Location`` header points to, checked; raises `ToolError` (not retryable)."""
    try:
        return check_url(current.join(location))
    except (httpx.InvalidURL, ValueError) as exc:
        raise ToolError(
            f"redirect from {describe(current)} refused: {redact(str(exc), location)}",
            retryable=False,
        ) from None


async def _send(
    client: httpx.AsyncClient, url: httpx.URL, ctx: ToolContext, check: AddressCheck, hop: int
) -> httpx.Response:
    """Resolve and check `url`'s host, then GET it from a checked address (streamed)."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = await resolve_checked(host, port, ctx.http_allow_private, check=check)
    except ToolError as exc:
        if hop == 0:
            raise
        raise ToolError(
            f"redirect {hop} to {describe(url)}: {exc}", retryable=exc.retryable
        ) from None
    headers = {
        "Host": url.netloc.decode("ascii"),  # host[:port], never user-info
        "Accept": "application/json",
        "Accept-Encoding": "gzip, deflate",  # the encodings `_Decoder` can bound
        "Idempotency-Key": ctx.idempotency_key,
        "User-Agent": USER_AGENT,
        **ctx.trace_context,  # traceparent (tracestate): the attempt's span (engine.tracing)
    }
    extensions: dict[str, Any] = {"sni_hostname": host} if url.scheme == "https" else {}
    failure: httpx.ConnectError | None = None
    for address in addresses:
        request = client.build_request(
            "GET", url.copy_with(host=address), headers=headers, extensions=extensions
        )
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            if _is_certificate_error(exc):
                raise ToolError(
                    f"TLS certificate of {describe(url)} does not verify: {exc}", retryable=False
                ) from None
            failure = exc  # try the host's next address
    assert failure is not None  # resolve_checked returns at least one address
    raise ToolError(
        f"network error fetching {describe(url)}: {_detail(failure)}", retryable=True
    ) from None


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):  # the cause chain is short; bound it anyway
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _result(response: httpx.Response, url: httpx.URL) -> dict[str, object]:
    """The output for a final (non-redirect) answer; raises a retryable `ToolError` on 5xx/429."""
    status = response.status_code
    if status >= 500 or status == 429:
        raise ToolError(f"HTTP {status} from {describe(url)}", retryable=True)
    data, truncated, error = await _read_capped(response)
    body: Any = None
    if truncated:
        error = f"body is larger than {MAX_BODY_BYTES} bytes; truncated and not parsed"
    elif error is None:
        if data:
            body, error = _parse_json(data)
        elif status not in (204, 304):
            error = "body is empty"
    return {
        "status": status,
        "body": body,
        "truncated": truncated,
        "bytesReturned": len(data),
        "error": error,
    }


class _Decoder:
    """Decodes one Content-Encoding while never producing more than it is asked for.

    httpx's own decoders inflate a whole network chunk (up to 64 KB) at once, which a gzip
    bomb turns into ~64 MB; here zlib's ``max_length`` bounds every step, so memory stays
    near `MAX_BODY_BYTES` whatever the compression ratio.
    """

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._zlib: Any = None
        self._first = True
        if encoding == "gzip":
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._zlib = zlib.decompressobj()

    def decode(self, data: bytes, limit: int) -> bytes:
        """At most `limit` decoded bytes of `data`; raises `zlib.error` on a corrupt stream."""
        if self._zlib is None:
            return data[:limit]
        if self.encoding == "deflate" and self._first:
            self._first = False
            try:
                return bytes(self._zlib.decompress(data, limit))
            except zlib.error:  # "deflate" sent without its zlib wrapper, as some servers do
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
        return bytes(self._zlib.decompress(data, limit))


def _content_encoding(headers: httpx.Headers) -> str | None:
    """The one encoding `_Decoder` handles (``identity``, ``gzip``, ``deflate``), or None."""
    header: str = headers.get("content-encoding", "")
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    codings = ["gzip" if c == "x-gzip" else c for c in codings if c != "identity"]
    if not codings:
        return "identity"
    if len(codings) == 1 and codings[0] in ("gzip", "deflate"):
        return codings[0]
    return None


async def _read_capped(response: httpx.Response) -> tuple[bytes, bool, str | None]:
    """Read at most `MAX_BODY_BYTES` decoded bytes: ``(data, truncated, error)``."""
    encoding = _content_encoding(response.headers)
    if encoding is None:
        shown = response.headers.get("content-encoding", "")[:100]
        return b"", False, f"unsupported Content-Encoding {shown!r}; body not read"
    decoder = _Decoder(encoding)
    chunks: list[bytes] = []
    total = 0
    try:
        async for raw in response.aiter_raw():
            piece = decoder.decode(raw, MAX_BODY_BYTES + 1 - total)
            total += len(piece)
            chunks.append(piece)
            if total > MAX_BODY_BYTES:
                return b"".join(chunks)[:MAX_BODY_BYTES], True, None
    except zlib.error as exc:
        data = b"".join(chunks)
        return data, False, f"body cannot be decoded ({encoding}): {exc}"
    return b"".join(chunks), False, None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(data: bytes) -> tuple[Any, str | None]:
    """``(value, None)`` if `data` is JSON that jsonb can store, else ``(None, why)``."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        return None, f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except UnicodeDecodeError as exc:
        return None, f"body is not JSON: not UTF-8 ({exc.reason} at byte {exc.start})"
    except ValueError as exc:  # NaN / Infinity, or an integer with too many digits
        return None, f"body is not JSON: {exc}"
    except RecursionError:
        return None, "body is JSON nested too deeply to parse"
    # The engine stores output as jsonb: refuse here what it would refuse (NUL, lone
    # surrogates, 1e999 parsed to infinity, nesting past the cap), so the step still succeeds
    # with its status instead of failing on storage. The body sits one level inside the output.
    try:
        jsonb.dumps(value, path="body", depth=1)
    except UnstorableJson as exc:
        return None, f"body cannot be stored: {exc}"
    return value, None
