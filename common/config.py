"""One frozen configuration: built-in defaults < TOML file (BTCFEED_CONFIG) < environment."""

import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Tuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

SUPPORTED_EXCHANGES = ("binance", "coinbase", "kraken")
PLANNED_EXCHANGES = ()
REDIS_SCHEMES = ("redis", "rediss", "unix",
                 SENTINEL_SCHEME := "redis+sentinel", CLUSTER_SCHEME := "redis+cluster")
# The Binance record kinds a source can follow (common.trade.BINANCE_KINDS; not imported, so that
# loading the configuration stays free of the parsers' dependencies).
BINANCE_TRADE_KINDS = ("trade", "aggTrade")
BINANCE_SYMBOL = re.compile(r"^[A-Z0-9]{2,20}$")
# Each exchange's own symbol form (DESIGN section 3): BTCUSDT, BTC-USD, BTC/USD.
SYMBOL_FORMS = {
    "binance": (BINANCE_SYMBOL, "a Binance symbol like BTCUSDT"),
    "coinbase": (re.compile(r"^[A-Z0-9]{2,10}-[A-Z0-9]{2,10}$"), "a Coinbase product like BTC-USD"),
    "kraken": (re.compile(r"^[A-Z0-9]{2,10}/[A-Z0-9]{2,10}$"), "a Kraken v2 symbol like BTC/USD"),
}


# `btcfeed primary move` keeps the new primary here, in the state dir: it wins over the environment
# and the TOML file, so that a restart of any process keeps the primary the feed moved to.
PRIMARY_OVERRIDE_FILE = "primary.toml"
PRIMARY_SETTINGS = ("primary_url", "primary_username", "primary_password_file", "primary_tls_ca_file",
                    "primary_tls_cert_file", "primary_tls_key_file")


class ConfigError(ValueError):
    """A configuration problem, worded for the operator in one line."""


@dataclass(frozen=True)
class Source:
    exchange: str
    symbol: str

    @property
    def name(self) -> str:
        return f"{self.exchange}:{self.symbol}"


# name -> (default, parser); the environment variable is BTCFEED_<NAME upper-cased>.
def _text(value):
    return str(value).strip()


def _int(value):
    return int(value)


def _float(value):
    return float(value)


def _bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


SETTINGS = {
    "state_dir": ("./var", _text),
    "primary_url": ("redis://127.0.0.1:6379/0", _text),
    "local_url": ("", _text),
    "primary_username": ("", _text),
    "primary_password": ("", _text),
    "primary_password_file": ("", _text),
    "primary_tls_ca_file": ("", _text),
    "primary_tls_cert_file": ("", _text),
    "primary_tls_key_file": ("", _text),
    "sources": ("binance:BTCUSDT", _text),
    "binance_ws_url": ("wss://stream.binance.com:9443", _text),
    "binance_rest_url": ("https://api.binance.com", _text),
    "binance_stream_form": ("combined", _text),
    "binance_trade_kind": ("trade", _text),
    "coinbase_ws_url": ("wss://ws-feed.exchange.coinbase.com", _text),
    "coinbase_rest_url": ("https://api.exchange.coinbase.com", _text),
    "kraken_ws_url": ("wss://ws.kraken.com/v2", _text),
    "kraken_rest_url": ("https://api.kraken.com", _text),
    "health_addr": ("127.0.0.1:8079", _text),
    "health_token": ("", _text),
    "health_token_file": ("", _text),
    "api_addr": ("127.0.0.1:8078", _text),
    "api_token": ("", _text),
    "api_token_file": ("", _text),
    "price_sources": ("", _text),
    "price_stale_ms": (800, _int),
    "retention_hours": (24.0, _float),
    "bus_max_entries": (200_000, _int),
    "backlog_max_trades": (6_000_000, _int),
    "probe_interval_ms": (200, _int),
    "healthy_probes": (3, _int),
    "deadletter_max": (10_000, _int),
    "compat_keys": (True, _bool),
    "compat_history_len": (1000, _int),
    "primary_timeout_ms": (500, _int),
    "writer_max_batch": (2000, _int),
    "linger_ms": (5, _int),
    "max_conn_hours": (23.5, _float),
    "log_format": ("kv", _text),
    "log_level": ("INFO", _text),
}


@dataclass(frozen=True)
class Config:
    state_dir: str
    primary_url: str
    local_url: str
    primary_username: str
    primary_password: str = field(repr=False)
    primary_tls_ca_file: str
    primary_tls_cert_file: str
    primary_tls_key_file: str
    sources: Tuple[Source, ...]
    binance_ws_url: str
    binance_rest_url: str
    binance_stream_form: str
    binance_trade_kind: str
    coinbase_ws_url: str
    coinbase_rest_url: str
    kraken_ws_url: str
    kraken_rest_url: str
    health_host: str
    health_port: int
    health_token: str = field(repr=False)
    api_host: str
    api_port: int
    api_token: str = field(repr=False)
    price_sources: Tuple[Source, ...]
    price_stale_ms: int
    retention_hours: float
    bus_max_entries: int
    backlog_max_trades: int
    probe_interval_ms: int
    healthy_probes: int
    deadletter_max: int
    compat_keys: bool
    compat_history_len: int
    primary_timeout_ms: int
    writer_max_batch: int
    linger_ms: int
    max_conn_hours: float
    log_format: str
    log_level: str
    primary_override: str = ""        # the state dir's primary.toml when it set the primary, else ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def retention_ms(self) -> int:
        return int(self.retention_hours * 3600 * 1000)

    @property
    def compat_source(self) -> Optional[Source]:
        """The source whose trades feed the omega_ai compatibility keys (the first one)."""
        return self.sources[0] if self.compat_keys and self.sources else None

    def path(self, *parts: str) -> str:
        return os.path.join(self.state_dir, *parts)


# Settings no longer read, and what replaces them: naming one is an error, never silently ignored.
REPLACED = {"backlog_max_entries": "the backlog is bounded in trades: set BTCFEED_BACKLOG_MAX_TRADES"}


def load(environ: Mapping[str, str] = None, primary_override: bool = True) -> Config:
    """Build the configuration; raise ConfigError with a one-line reason when it is wrong. The
    primary is the one `btcfeed primary move` recorded in the state dir, if any (unless
    primary_override is False: the configuration as the operator wrote it)."""
    environ = os.environ if environ is None else environ
    raw = {name: default for name, (default, _) in SETTINGS.items()}
    raw.update(_read_file(environ.get("BTCFEED_CONFIG", "")))
    for name, instead in REPLACED.items():
        if "BTCFEED_" + name.upper() in environ:
            raise ConfigError(f"BTCFEED_{name.upper()}: no longer read; {instead}")
    for name in SETTINGS:
        env_name = "BTCFEED_" + name.upper()
        if env_name in environ:
            raw[name] = environ[env_name]
    override = primary_override_path(str(raw["state_dir"])) if primary_override else ""
    moved = read_primary_override(override) if override else {}
    if moved:
        # The moved-to primary replaces every primary setting, not only those it names.
        raw.update({name: moved.get(name, "") for name in PRIMARY_SETTINGS})
        raw["primary_password"] = ""
    values = {}
    for name, (_, parse) in SETTINGS.items():
        try:
            values[name] = parse(raw[name])
        except (TypeError, ValueError):
            raise ConfigError(f"BTCFEED_{name.upper()}: cannot read {raw[name]!r} as {parse.__name__[1:]}")
    config = _validate(values)
    return replace(config, primary_override=override) if moved else config


def primary_override_path(state_dir: str) -> str:
    return os.path.join(os.path.abspath(state_dir), PRIMARY_OVERRIDE_FILE)


def read_primary_override(path: str) -> dict:
    """The primary settings `btcfeed primary move` recorded ({} when there is no such file)."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the primary recorded by `btcfeed primary move`: {exc}")
    unknown = sorted(set(data) - set(PRIMARY_SETTINGS))
    if unknown or not data.get("primary_url"):
        raise ConfigError(f"{path}: not a primary recorded by `btcfeed primary move` "
                          f"({'unknown ' + ', '.join(unknown) if unknown else 'no primary_url'})")
    return {name: str(value) for name, value in data.items()}


def write_primary_override(state_dir: str, settings: dict) -> str:
    """Record the primary in the state dir, all at once (a crash leaves the old file or the new one);
    readable by the service user only, since the URL may hold a password."""
    path = primary_override_path(state_dir)
    lines = ["# Written by `btcfeed primary move`: this primary wins over BTCFEED_PRIMARY_URL and the",
             "# TOML file. Put it in the service's configuration, then delete this file.\n"]
    lines += [f"{name} = {_toml_string(settings[name])}" for name in PRIMARY_SETTINGS if settings.get(name)]
    temporary = path + ".tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def primary_override_stamp(path: str):
    """What a running process compares to notice that the recorded primary changed (None: no file)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _read_file(path: str) -> dict:
    if not path:
        return {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"BTCFEED_CONFIG: file not found: {path}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"BTCFEED_CONFIG: {path} is not valid TOML: {exc}")
    for name, instead in REPLACED.items():
        if name in data:
            raise ConfigError(f"BTCFEED_CONFIG: {name} in {path} is no longer read; {instead}")
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"BTCFEED_CONFIG: unknown setting(s) {', '.join(unknown)} in {path}")
    if isinstance(data.get("sources"), list):
        data["sources"] = ",".join(data["sources"])
    return data


def _validate(values: dict) -> Config:
    state_dir = os.path.abspath(values["state_dir"])
    check_redis_url("BTCFEED_PRIMARY_URL", values["primary_url"])
    if urlsplit(values["primary_url"]).scheme == CLUSTER_SCHEME and values["compat_keys"]:
        # They have no hash tag: the apply script could not update them with a source's keys.
        raise ConfigError("BTCFEED_COMPAT_KEYS: the omega_ai compatibility keys cannot be kept on a Redis "
                          "Cluster (they are outside the sources' hash slots); set BTCFEED_COMPAT_KEYS=false")
    values["primary_password"] = _primary_password(values["primary_url"], values["primary_password"],
                                                   values.pop("primary_password_file"))
    _check_primary_tls(values)
    # Quoted: a "#" or "?" in the state dir would otherwise end the URL's path (redis-py unquotes it).
    local_url = values["local_url"] or f"unix://{quote(os.path.join(state_dir, 'redis.sock'))}"
    check_redis_url("BTCFEED_LOCAL_URL", local_url)
    for name in ("binance_ws_url", "binance_rest_url", "coinbase_ws_url", "coinbase_rest_url",
                 "kraken_ws_url", "kraken_rest_url"):
        # Kraken's websocket endpoint is versioned by its path (/v2), so that one URL keeps its path.
        schemes = ("ws", "wss") if "ws_url" in name else ("http", "https")
        _check_base_url("BTCFEED_" + name.upper(), values[name], schemes,
                        path_allowed=name == "kraken_ws_url")
    if values["binance_stream_form"] not in ("raw", "combined"):
        raise ConfigError("BTCFEED_BINANCE_STREAM_FORM: must be 'raw' (/ws/...) or 'combined' "
                          "(/stream?streams=...)")
    if values["binance_trade_kind"] not in BINANCE_TRADE_KINDS:
        raise ConfigError("BTCFEED_BINANCE_TRADE_KIND: must be 'trade' (every trade, ids t) or 'aggTrade' "
                          f"(aggregate trades, ids a), got {values['binance_trade_kind'][:40]!r}")
    if values["log_format"] not in ("kv", "json"):
        raise ConfigError("BTCFEED_LOG_FORMAT: must be 'kv' or 'json'")
    host, port = parse_addr("BTCFEED_HEALTH_ADDR", values["health_addr"])
    api_host, api_port = parse_addr("BTCFEED_API_ADDR", values.pop("api_addr"))
    sources = parse_sources(values["sources"])
    values["price_sources"] = _price_sources(values["price_sources"], sources)
    for name in ("price_stale_ms", "bus_max_entries", "backlog_max_trades", "probe_interval_ms",
                 "healthy_probes", "deadletter_max", "primary_timeout_ms", "writer_max_batch",
                 "compat_history_len"):
        if values[name] <= 0:
            raise ConfigError(f"BTCFEED_{name.upper()}: must be a positive number, got {values[name]}")
    retention_hours = values["retention_hours"]
    if not (0 < retention_hours and math.isfinite(retention_hours)):
        raise ConfigError(f"BTCFEED_RETENTION_HOURS: must be a positive number, got {retention_hours}")
    if not 0 <= values["linger_ms"] <= 1000:
        raise ConfigError(f"BTCFEED_LINGER_MS: must be 0 (no wait) to 1000 ms, got {values['linger_ms']}")
    if not 0 < values["max_conn_hours"] <= 24:
        raise ConfigError("BTCFEED_MAX_CONN_HOURS: must be above 0 and at most 24 (the exchange's limit)")
    values.pop("health_addr")
    values["health_token"] = _token("BTCFEED_HEALTH_TOKEN", values.pop("health_token"),
                                    values.pop("health_token_file"))
    values["api_token"] = _token("BTCFEED_API_TOKEN", values.pop("api_token"), values.pop("api_token_file"))
    return Config(
        **{**values, "state_dir": state_dir, "local_url": local_url,
           "sources": sources, "health_host": host, "health_port": port,
           "api_host": api_host, "api_port": api_port, "log_level": values["log_level"].upper()})


def _price_sources(text: str, sources: Tuple[Source, ...]) -> Tuple[Source, ...]:
    """The order in which sources give the price view (btcfeed:price): by default BTCFEED_SOURCES'
    own order; a list given must name only configured sources, and those it leaves out come last."""
    if not text.strip():
        return sources
    try:
        ordered = parse_sources(text)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("BTCFEED_SOURCES", "BTCFEED_PRICE_SOURCES", 1))
    unknown = [source.name for source in ordered if source not in sources]
    if unknown:
        raise ConfigError(f"BTCFEED_PRICE_SOURCES: {', '.join(unknown)} is not in BTCFEED_SOURCES")
    return ordered + tuple(source for source in sources if source not in ordered)


def parse_sources(text: str) -> Tuple[Source, ...]:
    sources = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        exchange, sep, symbol = item.partition(":")
        exchange = exchange.strip().lower()
        if not sep or not symbol.strip():
            raise ConfigError(f"BTCFEED_SOURCES: {item!r} is not exchange:SYMBOL "
                              "(for example binance:BTCUSDT)")
        if exchange in PLANNED_EXCHANGES:
            raise ConfigError(f"BTCFEED_SOURCES: exchange {exchange!r} is not supported yet "
                              f"(supported: {', '.join(SUPPORTED_EXCHANGES)})")
        if exchange not in SUPPORTED_EXCHANGES:
            raise ConfigError(f"BTCFEED_SOURCES: unknown exchange {exchange!r} "
                              f"(supported: {', '.join(SUPPORTED_EXCHANGES)})")
        symbol = symbol.strip().upper()
        pattern, form = SYMBOL_FORMS[exchange]
        if not pattern.match(symbol):
            raise ConfigError(f"BTCFEED_SOURCES: {symbol!r} is not {form}")
        source = Source(exchange, symbol)
        if source in sources:
            raise ConfigError(f"BTCFEED_SOURCES: {source.name} is listed twice")
        sources.append(source)
    if not sources:
        raise ConfigError("BTCFEED_SOURCES: no source given (for example binance:BTCUSDT)")
    return tuple(sources)


def check_redis_url(variable: str, url: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(f"{variable}: {redact_url(url)!r} cannot be parsed (IPv6 host not in [ ]?)")
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(f"{variable}: {redact_url(url)!r} is not a Redis URL "
                          f"(use redis://host:port/db, rediss:// for TLS, unix:///path/to.sock, "
                          f"or redis+sentinel://host:port,host:port/master-name/db)")
    # Before the forms below, so that every scheme's query is read (sentinel and cluster included).
    _check_tls_query(variable, parts.query)
    if parts.scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url, variable)
        return
    if parts.scheme == CLUSTER_SCHEME:
        parse_cluster_url(url, variable)
        return
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{variable}: unix URL needs a socket path, like unix:///var/run/redis.sock")
        return
    if not parts.hostname:
        raise ConfigError(f"{variable}: {redact_url(url)!r} has no host")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{variable}: {redact_url(url)!r} has an invalid port")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        # Not the index itself: with an unescaped "/" in the password it holds part of the password.
        raise ConfigError(f"{variable}: {redact_url(url)!r} has a database index that is not a number")


def parse_cluster_url(url: str, variable: str = "BTCFEED_PRIMARY_URL") -> dict:
    """redis+cluster://[user:password@]host:port[,host:port...]: any nodes of the cluster (the
    client learns the rest); a cluster has only database 0."""
    rest = url.partition("://")[2]
    userinfo, at, rest = rest.rpartition("@")
    hosts_part, _, path = rest.partition("/")
    if path.partition("?")[0] not in ("", "0"):
        raise ConfigError(f"{variable}: a Redis Cluster has only database 0")
    nodes = [_host_port(item, variable, "cluster node", None) for item in hosts_part.split(",")]
    username, _, password = userinfo.partition(":") if at else ("", "", "")
    return {"nodes": nodes, "username": unquote(username), "password": unquote(password)}


def _host_port(item: str, variable: str, what: str, default_port):
    host, colon, port = item.strip().rpartition(":")
    if not colon and default_port:
        host, port = port, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{variable}: {what} {item.strip()!r} is not host:port")
    return host.strip("[]"), int(port)


def parse_sentinel_url(url: str, variable: str = "BTCFEED_PRIMARY_URL") -> dict:
    """redis+sentinel://[user:password@]host:port[,host:port...]/master-name[/db]: the sentinels to
    ask, the name of the master they watch, and the database; the credentials are the master's."""
    rest = url.partition("://")[2]
    userinfo, at, rest = rest.rpartition("@")
    hosts_part, _, path = rest.partition("/")
    path = path.partition("?")[0]
    sentinels = [_host_port(item, variable, "sentinel", 26379) for item in hosts_part.split(",")]
    service, _, db = path.partition("/")
    if not service:
        raise ConfigError(f"{variable}: give the master name after the sentinels, like "
                          "redis+sentinel://host:26379,host:26380/mymaster/0")
    if db and not db.isdigit():
        raise ConfigError(f"{variable}: the database index {db!r} is not a number")
    username, _, password = userinfo.partition(":") if at else ("", "", "")
    return {"sentinels": sentinels, "service": service, "db": int(db or 0),
            "username": unquote(username), "password": unquote(password)}


def _check_base_url(variable: str, url: str, schemes, path_allowed: bool = False) -> None:
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(f"{variable}: {url!r} is not a {' or '.join(s + '://' for s in schemes)} base URL")
    if parts.path not in ("", "/") and not path_allowed:
        raise ConfigError(f"{variable}: give the base URL without a path (btcfeed adds it), got {url!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{variable}: {url!r} has an invalid port")


def _primary_password(url: str, password: str, password_file: str) -> str:
    """The primary's password from BTCFEED_PRIMARY_PASSWORD(_FILE), when not in the URL."""
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as handle:
                password = handle.read().strip()
        except OSError as exc:
            raise ConfigError(f"BTCFEED_PRIMARY_PASSWORD_FILE: cannot read {password_file!r}: {exc.strerror}")
        if not password:
            raise ConfigError(f"BTCFEED_PRIMARY_PASSWORD_FILE: {password_file!r} is empty")
    if password and (_url_has_password(url)):
        # redis-py lets the URL win over a separate password: two sources would be a silent trap.
        raise ConfigError("BTCFEED_PRIMARY_PASSWORD: the password is also in BTCFEED_PRIMARY_URL; "
                          "give it in one place")
    return password


def _url_has_password(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return bool(parts.password) or "password=" in parts.query


TLS_FILES = ("primary_tls_ca_file", "primary_tls_cert_file", "primary_tls_key_file")


def _check_primary_tls(values: dict) -> None:
    """TLS to the primary verifies its certificate, always; the files given must be readable."""
    parts = urlsplit(values["primary_url"])
    given = [name for name in TLS_FILES if values[name]]
    if given and parts.scheme != "rediss":
        raise ConfigError(f"BTCFEED_{given[0].upper()}: TLS files are given but BTCFEED_PRIMARY_URL is not "
                          "rediss:// (use rediss://host:port for TLS)")
    for name in given:
        if not os.path.isfile(values[name]) or not os.access(values[name], os.R_OK):
            raise ConfigError(f"BTCFEED_{name.upper()}: cannot read {values[name]!r}")
    if bool(values["primary_tls_cert_file"]) != bool(values["primary_tls_key_file"]):
        raise ConfigError("BTCFEED_PRIMARY_TLS_CERT_FILE and BTCFEED_PRIMARY_TLS_KEY_FILE: "
                          "give both or neither")
    # The URL's own TLS options were checked with the URL (check_redis_url, _check_tls_query).


# The only ssl_* URL options taken: the ones that ask for what btcfeed does anyway. redis-py lets a
# URL option win over the client's own settings (from_url), so any other one could weaken the check:
# ssl_cert_reqs=none/optional, ssl_check_hostname=false, a CA of the URL's choosing (ssl_ca_certs,
# ssl_ca_path, ssl_ca_data), ssl_exclude_verify_flags, ssl_min_version, ssl_ciphers, and so on.
SAFE_TLS_QUERY = {
    # redis-py takes only the exact word (Required would fail at the first connection).
    "ssl_cert_reqs": ("required", lambda value: value == "required"),
    # redis-py reads anything but 0/f/false/n/no as true: take only the plain words for true.
    "ssl_check_hostname": ("true", lambda value: value.strip().lower() in ("true", "1", "yes", "on")),
}
TLS_FILE_HINT = ("(btcfeed always verifies the certificate and host name: give the CA with "
                 "BTCFEED_PRIMARY_TLS_CA_FILE, a client certificate with "
                 "BTCFEED_PRIMARY_TLS_CERT_FILE/_KEY_FILE)")


def _check_tls_query(variable: str, query: str) -> None:
    """Refuse any TLS option in the URL's query that could weaken verification. Every value of every
    key counts: redis-py reads the first one, and a later one must not be able to hide it."""
    options = parse_qs(query, keep_blank_values=True)
    for key in sorted(options):
        name = key.strip().lower()
        if not name.startswith("ssl"):
            continue
        if name not in SAFE_TLS_QUERY or key != name:
            # Not the exact spelling redis-py reads either: refused rather than guessed at.
            raise ConfigError(f"{variable}: the TLS option {key[:40]!r} is not taken from the URL "
                              f"{TLS_FILE_HINT}")
        wanted, is_safe = SAFE_TLS_QUERY[name]
        if not all(is_safe(value) for value in options[key]):
            raise ConfigError(f"{variable}: {name} other than {wanted} would weaken TLS verification, which "
                              f"cannot be turned off {TLS_FILE_HINT}")


def _token(variable: str, token: str, token_file: str) -> str:
    """The bearer token an HTTP API asks for (needed when it listens beyond loopback)."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise ConfigError(f"{variable}_FILE: cannot read {token_file!r}: {exc.strerror}")
    if token and len(token) < 16:
        raise ConfigError(f"{variable}: too short, use at least 16 random characters")
    return token


def is_loopback(host: str) -> bool:
    """Whether the address only takes connections from this host: 127.0.0.0/8, ::1 (also as
    ::ffff:127.x.x.x) or the name localhost. Any other name (127.evil.com, localhost.example.com)
    is resolved by DNS, so it is not loopback."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def parse_addr(variable: str, addr: str) -> Tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{variable}: {addr!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def redact_url(url: str) -> str:
    """The URL with any password (and user name) replaced, for logs and messages."""
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    if "@" in rest:
        # Plain text, not urlsplit: a password with an unescaped "/", "?" or "#" splits the URL in
        # the wrong place (and a bad port makes urlsplit raise), yet all of it comes before the last "@".
        rest = "***@" + rest.rpartition("@")[2]
    # redis-py also takes the password as a query parameter (?password=...).
    rest, query, _ = rest.partition("?")
    return f"{head}{sep}{rest}{'?***' if query else ''}"


# --- secrets: passwords and tokens never reach a log, a status document or a message ----------------
def url_secrets(url: str) -> list:
    """The password in a Redis URL (as written and unquoted), from the userinfo or ?password=."""
    rest = url.partition("://")[2]
    found = []
    if "@" in rest:
        userinfo = rest.rpartition("@")[0]
        password = userinfo.partition(":")[2] or userinfo
        found += [password, unquote(password)]
    for value in parse_qs(rest.partition("?")[2]).get("password", []):
        found.append(value)
    # A one- or two-character "password" would garble every message it occurs in by chance.
    return [s for s in found if len(s) >= 3]


def secrets_of(config) -> list:
    """Every secret in the configuration, longest first (so a longer one is never half-replaced)."""
    found = url_secrets(config.primary_url) + url_secrets(config.local_url)
    found += [getattr(config, name, "") for name in ("primary_password", "health_token", "api_token")]
    return sorted({s for s in found if s and len(s) >= 3}, key=len, reverse=True)


def scrub(text: str, secrets) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
