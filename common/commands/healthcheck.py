"""`btcfeed health` (bin/health): is every trade flowing? A short summary (or the JSON) and a Nagios
exit code: 0 OK, 1 WARNING, 2 CRITICAL (a configuration error too: 2 from every btcfeed command),
3 UNKNOWN. Its options are defined in commands/cli.py with the other commands'.

It asks the health API for /status; when that does not answer it reads the local Redis, the
primary and supervisor itself and says so. The verdict is computed here from the document with
this command's thresholds, so a cron job or a monitoring system can be stricter than the API.

Redirects are never followed: the bearer token goes only to the address given. A redirect is
UNKNOWN (the URL is wrong, or something answers in the API's place), not a reason to read elsewhere.
"""

import json
import urllib.error
import urllib.request

import click

from btcfeed.config import scrub, secrets_of
from btcfeed.observability.status import Thresholds, assess, collect_status, exit_code

CRITICAL, UNKNOWN = 2, 3
LABELS = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
STATUS_OF = {2: "critical", 3: "unknown"}


class RedirectRefused(Exception):
    """The health API's address answered with a redirect, which is not followed."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would re-send the Authorization header to wherever a 3xx points, another host included."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise RedirectRefused(f"HTTP {code} redirect to {newurl[:200]} not followed (the token is sent "
                              "only to the URL given); give the status URL itself with --url")


OPENER = urllib.request.build_opener(_NoRedirects())


def fetch_status(url: str, token: str, timeout_s: float):
    """The health API's document, or (None, why it could not be had). RedirectRefused when the
    answer is a redirect: the caller must not read anything else in its place."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with OPENER.open(request, timeout=timeout_s) as response:
            return json.loads(response.read()), None
    except urllib.error.HTTPError as exc:
        return None, f"HTTP {exc.code}" + (" (wrong or missing token)" if exc.code == 401 else "")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return None, str(reason)


def obtain(cfg, url: str, token: str, timeout_s: float):
    document, why = fetch_status(url, token, timeout_s)
    if document is not None:
        return document, None
    note = f"health API at {url} did not answer ({why}); read Redis and supervisor directly"
    return collect_status(cfg, origin="direct"), note


def summary(document: dict, verdict: dict, code: int, note: str = None) -> str:
    lines = [f"btcfeed {LABELS[code]}: {verdict['status']}" +
             (f" - {verdict['reasons'][0]}" if verdict["reasons"] else "")]
    if code == UNKNOWN:
        return "\n".join(lines + ([f"  note: {note}"] if note else []))
    lines += [f"  also: {reason}" for reason in verdict["reasons"][1:]]
    if note:
        lines.append(f"  note: {note}")
    writer = document.get("writer") or {}
    backlog = document.get("backlog") or {}
    lines.append(f"  writer: {writer.get('state') or '-'} for {_seconds(writer.get('for_s'))}, "
                 f"backlog {backlog.get('entries') if backlog.get('entries') is not None else '-'} batches")
    for name, source in (document.get("sources") or {}).items():
        age = source.get("last_trade_age_ms")
        lines.append(f"  {name}: {'connected' if source.get('connected') else 'NOT connected'}, "
                     f"last trade {'-' if age is None else _seconds(age / 1000)} ago, "
                     f"last id {source.get('last_id')}, price {source.get('last_price') or '-'}")
    for role, info in (document.get("redis") or {}).items():
        lines.append(f"  {role} redis {info.get('url')}: " +
                     (f"up, {info.get('latency_ms')} ms, {info.get('role')}"
                      + (f", sentinels name {info['master']} as master" if info.get("master") else "")
                      + (f", maxmemory-policy {info.get('maxmemory_policy')}" if info.get("eviction_risk")
                         else "")
                      if info.get("reachable")
                      else f"DOWN ({info.get('error')})"))
    down = [f"{name} {info.get('state')}" for name, info in (document.get("processes") or {}).items()
            if not name.startswith("_") and info.get("state") != "RUNNING"]
    if down:
        lines.append("  processes not running: " + ", ".join(down))
    return "\n".join(lines)


def _seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}s" if value < 60 else f"{value / 60:.1f}min"


def run(cfg, url: str, token: str, timeout_s: float, thresholds: Thresholds, as_json: bool) -> int:
    """Print the verdict (summary or JSON) and return its Nagios exit code."""
    try:
        document, note = obtain(cfg, url, token, timeout_s)
    except RedirectRefused as exc:
        return report_only(f"health API at {url}: {scrub(str(exc), secrets_of(cfg))}", UNKNOWN, as_json)
    local_down = (document.get("redis") or {}).get("local", {}).get("reachable") is False
    supervisor_down = "_supervisor" in (document.get("processes") or {})
    if note and local_down and supervisor_down:
        verdict = {"status": "unknown", "reasons": ["nothing answers (health API, local Redis, supervisor): "
                                                    "is the stack running?"]}
        code = UNKNOWN
    else:
        local_error = (document.get("redis") or {}).get("local", {}).get("error") if local_down else None
        verdict = assess(document, thresholds, local_error=local_error)
        code = exit_code(verdict["status"])
    if as_json:
        click.echo(json.dumps({**document, "health": verdict, "exit_code": code, "note": note}))
    else:
        click.echo(summary(document, verdict, code, note))
    return code


def configuration_error(reason: str, as_json: bool) -> int:
    """A wrong setting is exit 2 from every btcfeed command; here the status line says CRITICAL to match."""
    return report_only(f"configuration error: {reason}", CRITICAL, as_json)


def report_only(reason: str, code: int, as_json: bool) -> int:
    """A verdict with no status document behind it: one line, or a JSON document with the verdict."""
    status = STATUS_OF[code]
    click.echo(json.dumps({"health": {"status": status, "reasons": [reason]}, "exit_code": code})
               if as_json else f"btcfeed {LABELS[code]}: {reason}")
    return code


def read_verdict(cfg, url: str, token: str, timeout_s: float):
    """The health API's own verdict from its status document, or (None, why there is none)."""
    try:
        document, why = fetch_status(url, token, timeout_s)
    except RedirectRefused as exc:
        document, why = None, scrub(str(exc), secrets_of(cfg))
    verdict = document.get("health") if isinstance(document, dict) else None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("status"), str):
        return None, f"no answer from {url} ({why or 'no verdict in the document'})"
    return verdict, None


def status_url(cfg) -> str:
    """The health API's /status on the configured address (a wildcard bind is reached on loopback)."""
    return f"http://{_host_for_url(cfg.health_host)}:{cfg.health_port}/status"


def _host_for_url(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
