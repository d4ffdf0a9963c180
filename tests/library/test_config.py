"""Configuration: defaults < TOML file < environment, and readable errors that never show a password."""

import os

import pytest
import redis.connection
from hypothesis import given, settings
from hypothesis import strategies as st

from btcfeed.config import (ConfigError, Source, check_redis_url, is_loopback, load, parse_addr,
                            parse_sources, redact_url)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run each test in an empty directory, so the relative default state dir lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config_error(environ) -> str:
    with pytest.raises(ConfigError) as caught:
        load(environ)
    return str(caught.value)


def write_toml(tmp_path, text: str) -> str:
    path = tmp_path / "btcfeed.toml"
    path.write_text(text)
    return str(path)


# --- defaults -----------------------------------------------------------------------------------

def test_defaults(in_tmp):
    config = load({})
    assert config.state_dir == str(in_tmp / "var")
    assert config.primary_url == "redis://127.0.0.1:6379/0"
    assert config.local_url == f"unix://{in_tmp / 'var' / 'redis.sock'}"
    assert config.sources == (Source("binance", "BTCUSDT"),)
    assert config.binance_ws_url == "wss://stream.binance.com:9443"
    assert config.binance_rest_url == "https://api.binance.com"
    assert config.binance_stream_form == "combined"
    assert (config.health_host, config.health_port) == ("127.0.0.1", 8079)
    assert config.retention_ms == 24 * 3600 * 1000
    assert config.max_conn_hours == 23.5
    assert config.compat_keys is True
    assert config.compat_source == Source("binance", "BTCUSDT")
    assert config.log_level == "INFO"
    assert config.path("logs", "ingest.log") == str(in_tmp / "var" / "logs" / "ingest.log")


def test_the_process_environment_is_read_only_when_none_is_given(monkeypatch):
    monkeypatch.setenv("BTCFEED_SOURCES", "binance:ETHUSDT")
    assert load().sources == (Source("binance", "ETHUSDT"),)
    assert load({}).sources == (Source("binance", "BTCUSDT"),)


def test_config_is_frozen():
    config = load({})
    with pytest.raises(AttributeError):
        config.primary_url = "redis://elsewhere/0"


def test_source_name():
    assert Source("binance", "BTCUSDT").name == "binance:BTCUSDT"


# --- environment --------------------------------------------------------------------------------

def test_environment_overrides(in_tmp):
    config = load({
        "BTCFEED_STATE_DIR": str(in_tmp / "stack-a"),
        "BTCFEED_PRIMARY_URL": "rediss://feed:pw@redis.example.com:6380/3",
        "BTCFEED_LOCAL_URL": "redis://127.0.0.1:7000/1",
        "BTCFEED_SOURCES": " binance:btcusdt , binance:ETHUSDT ,",
        "BTCFEED_BINANCE_WS_URL": "ws://127.0.0.1:9001",
        "BTCFEED_BINANCE_REST_URL": "http://127.0.0.1:9002/",
        "BTCFEED_BINANCE_STREAM_FORM": "raw",
        "BTCFEED_HEALTH_ADDR": "0.0.0.0:18079",
        "BTCFEED_RETENTION_HOURS": "1.5",
        "BTCFEED_COMPAT_KEYS": "no",
        "BTCFEED_MAX_CONN_HOURS": "24",
        "BTCFEED_LOG_LEVEL": "debug",
        "BTCFEED_LOG_FORMAT": "json",
    })
    assert config.state_dir == str(in_tmp / "stack-a")
    assert config.primary_url == "rediss://feed:pw@redis.example.com:6380/3"
    assert config.local_url == "redis://127.0.0.1:7000/1"
    assert config.sources == (Source("binance", "BTCUSDT"), Source("binance", "ETHUSDT"))
    assert config.binance_ws_url == "ws://127.0.0.1:9001"
    assert config.binance_rest_url == "http://127.0.0.1:9002/"
    assert config.binance_stream_form == "raw"
    assert (config.health_host, config.health_port) == ("0.0.0.0", 18079)
    assert config.retention_ms == 5_400_000
    assert config.compat_keys is False and config.compat_source is None
    assert config.max_conn_hours == 24.0
    assert (config.log_level, config.log_format) == ("DEBUG", "json")


@pytest.mark.parametrize("text, value", [("1", True), ("TRUE", True), ("on", True), ("yes", True),
                                         ("0", False), ("false", False), ("Off", False), ("", False)])
def test_boolean_words(text, value):
    assert load({"BTCFEED_COMPAT_KEYS": text}).compat_keys is value


@pytest.mark.parametrize("variable, value", [
    ("BTCFEED_COMPAT_KEYS", "maybe"), ("BTCFEED_BUS_MAX_ENTRIES", "many"), ("BTCFEED_BUS_MAX_ENTRIES", "1.5"),
    ("BTCFEED_RETENTION_HOURS", "a day")])
def test_unreadable_value_names_the_variable(variable, value):
    message = config_error({variable: value})
    assert message.startswith(variable + ":") and repr(value) in message


@pytest.mark.parametrize("variable", ["BTCFEED_BUS_MAX_ENTRIES", "BTCFEED_DEADLETTER_MAX",
                                      "BTCFEED_PRIMARY_TIMEOUT_MS", "BTCFEED_WRITER_MAX_BATCH",
                                      "BTCFEED_COMPAT_HISTORY_LEN"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_bounds_must_be_positive(variable, value):
    assert config_error({variable: value}).startswith(variable + ": must be a positive number")


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf"])
def test_retention_must_be_a_positive_finite_number(value):
    message = config_error({"BTCFEED_RETENTION_HOURS": value})
    assert message.startswith("BTCFEED_RETENTION_HOURS: must be a positive number")


# --- TOML file ----------------------------------------------------------------------------------

def test_toml_file(in_tmp):
    path = write_toml(in_tmp, """
state_dir = "from-file"
primary_url = "redis://primary.example.com:6379/2"
sources = ["binance:BTCUSDT", "binance:ethusdt"]
retention_hours = 2
compat_keys = false
health_addr = "127.0.0.1:9999"
""")
    config = load({"BTCFEED_CONFIG": path})
    assert config.state_dir == str(in_tmp / "from-file")
    assert config.local_url == f"unix://{in_tmp / 'from-file' / 'redis.sock'}"
    assert config.primary_url == "redis://primary.example.com:6379/2"
    assert config.sources == (Source("binance", "BTCUSDT"), Source("binance", "ETHUSDT"))
    assert config.retention_ms == 7_200_000
    assert config.compat_keys is False
    assert config.health_port == 9999


def test_toml_sources_as_one_string(in_tmp):
    path = write_toml(in_tmp, 'sources = "binance:ETHUSDT,binance:BTCUSDT"\n')
    assert [s.symbol for s in load({"BTCFEED_CONFIG": path}).sources] == ["ETHUSDT", "BTCUSDT"]


def test_environment_beats_file(in_tmp):
    path = write_toml(in_tmp, 'primary_url = "redis://file-host:6379/0"\nhealth_addr = "127.0.0.1:1111"\n')
    config = load({"BTCFEED_CONFIG": path, "BTCFEED_PRIMARY_URL": "redis://env-host:6379/0"})
    assert config.primary_url == "redis://env-host:6379/0"
    assert config.health_port == 1111  # not overridden: the file still applies


def test_empty_config_variable_means_no_file():
    assert load({"BTCFEED_CONFIG": ""}).primary_url == "redis://127.0.0.1:6379/0"


def test_unknown_toml_key(in_tmp):
    path = write_toml(in_tmp, 'primary_url = "redis://h:6379/0"\nprimray_url = "x"\nzzz = 1\n')
    message = config_error({"BTCFEED_CONFIG": path})
    assert message.startswith("BTCFEED_CONFIG:") and "primray_url, zzz" in message and path in message


def test_the_replaced_backlog_bound_in_entries_is_an_error_that_names_its_replacement(in_tmp):
    # An operator's old bound must not be dropped silently: the stack would run without it.
    message = config_error({"BTCFEED_BACKLOG_MAX_ENTRIES": "500000"})
    assert message.startswith("BTCFEED_BACKLOG_MAX_ENTRIES: no longer read")
    assert "BTCFEED_BACKLOG_MAX_TRADES" in message
    path = write_toml(in_tmp, "backlog_max_entries = 500000\n")
    message = config_error({"BTCFEED_CONFIG": path})
    assert "backlog_max_entries" in message and "BTCFEED_BACKLOG_MAX_TRADES" in message and path in message
    assert load({"BTCFEED_BACKLOG_MAX_TRADES": "1000"}).backlog_max_trades == 1000


def test_missing_file(in_tmp):
    path = str(in_tmp / "nowhere.toml")
    assert config_error({"BTCFEED_CONFIG": path}) == f"BTCFEED_CONFIG: file not found: {path}"


@pytest.mark.parametrize("text", ['primary_url = "unterminated\n', "[table\n", "a = = 1\n", "\xff\xfe"])
def test_invalid_toml(in_tmp, text):
    path = in_tmp / "bad.toml"
    path.write_bytes(text.encode("latin-1"))
    message = config_error({"BTCFEED_CONFIG": str(path)})
    assert message.startswith("BTCFEED_CONFIG:") and "is not valid TOML" in message


def test_wrong_type_in_toml(in_tmp):
    path = write_toml(in_tmp, 'bus_max_entries = "lots"\n')
    assert config_error({"BTCFEED_CONFIG": path}).startswith("BTCFEED_BUS_MAX_ENTRIES: cannot read 'lots'")


# --- Redis URLs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis://host", "redis://host:6380",
                                 "rediss://user:pw@managed.example.com:25061/15", "redis://[::1]:6379/0",
                                 "unix:///tmp/redis.sock", "redis://:pw@host/"])
def test_good_redis_urls(url):
    check_redis_url("BTCFEED_PRIMARY_URL", url)
    assert load({"BTCFEED_PRIMARY_URL": url}).primary_url == url


@pytest.mark.parametrize("url, fragment", [
    ("http://127.0.0.1:6379/0", "is not a Redis URL"),
    ("127.0.0.1:6379", "is not a Redis URL"),
    ("", "is not a Redis URL"),
    ("redis+sentinels://host:26379/mymaster", "is not a Redis URL"),
    ("redis+sentinel://host:26379", "give the master name"),
    ("redis+sentinel://host:x/mymaster", "sentinel 'host:x' is not host:port"),
    ("redis+sentinel://host:26379/mymaster/zero", "database index 'zero' is not a number"),
    ("redis+cluster://host:bad", "cluster node 'host:bad' is not host:port"),
    ("redis+cluster://host:7000/3", "only database 0"),
    ("redis://:6379/0", "has no host"),
    ("redis:///0", "has no host"),
    ("redis://host:bad/0", "has an invalid port"),
    ("redis://host:70000/0", "has an invalid port"),
    ("redis://host:6379/zero", "database index that is not a number"),
    ("redis://host:6379/-1", "database index that is not a number"),
    ("unix://", "unix URL needs a socket path"),
    ("redis://[::1/0", "cannot be parsed"),
])
def test_bad_redis_urls(url, fragment):
    message = config_error({"BTCFEED_PRIMARY_URL": url})
    assert message.startswith("BTCFEED_PRIMARY_URL: ") and fragment in message
    assert "\n" not in message


def test_bad_local_url_names_its_variable():
    assert config_error({"BTCFEED_LOCAL_URL": "http://x/0"}).startswith("BTCFEED_LOCAL_URL: ")


@pytest.mark.parametrize("url", [
    "redis://user:secret@host:bad/0", "redis://user:secret@host:99999/0", "http://user:secret@host/0",
    "redis://user:secret@:6379/0", "redis://user:secret@host:6379/zero", "redis://user:secret@[::1/0",
    "redis://:secret@host:x", "redis://user:se/cret@host:6379/0", "redis://user:sec#ret@host:6379/0",
    "redis://user:secret/@host:6379/0", "http://host/0?password=secret",
])
def test_url_errors_never_show_the_password(url):
    message = config_error({"BTCFEED_PRIMARY_URL": url})
    assert message.startswith("BTCFEED_PRIMARY_URL: ")
    assert "secret" not in message and "cret" not in message
    assert "se/" not in message and "sec#" not in message


def test_bad_port_error_is_readable_and_redacted():
    message = config_error({"BTCFEED_PRIMARY_URL": "redis://user:secret@host:bad/0"})
    assert message == "BTCFEED_PRIMARY_URL: 'redis://***@host:bad/0' has an invalid port"


@pytest.mark.parametrize("url, redacted", [
    ("redis://user:secret@host:6379/0", "redis://***@host:6379/0"),
    ("rediss://:secret@host/0", "rediss://***@host/0"),
    ("redis://user@host:6379", "redis://***@host:6379"),
    ("redis://user:secret@host:bad/0", "redis://***@host:bad/0"),
    ("redis://user:p@ss@host/0", "redis://***@host/0"),
    ("redis://user:pa/ss@host/0", "redis://***@host/0"),
    ("redis://user:pa#ss@host/0", "redis://***@host/0"),
    ("redis://user:secret@[::1/0", "redis://***@[::1/0"),
    ("redis://host:6379/0?password=secret", "redis://host:6379/0?***"),
    ("user:secret@host", "***@host"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("unix:///var/run/redis.sock", "unix:///var/run/redis.sock"),
    ("", ""),
])
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


@settings(max_examples=200, deadline=None)
@given(user=st.text(max_size=8), password=st.text(max_size=12), port=st.text("0123456789x:", max_size=6),
       db=st.text("0123456789/a", max_size=3))
def test_no_password_ever_leaks(user, password, port, db):
    url = f"redis://{user}:SECRET{password}@host:{port}/{db}"
    assert "SECRET" not in redact_url(url)
    try:
        check_redis_url("BTCFEED_PRIMARY_URL", url)
    except ConfigError as exc:
        assert "SECRET" not in str(exc)


# --- sources ------------------------------------------------------------------------------------

def test_sources_are_normalized():
    assert parse_sources(" BINANCE : btcusdt ,binance:ETHBTC") == (Source("binance", "BTCUSDT"),
                                                                    Source("binance", "ETHBTC"))


@pytest.mark.parametrize("text, fragment", [
    ("foo:BTCUSDT", "unknown exchange 'foo' (supported: binance, coinbase, kraken)"),
    (":BTCUSDT", "unknown exchange ''"),
    ("coinbase:BTCUSD", "'BTCUSD' is not a Coinbase product like BTC-USD"),
    ("kraken:BTC-USD", "'BTC-USD' is not a Kraken v2 symbol like BTC/USD"),
    ("binance:BTCUSDT,binance:btcusdt", "binance:BTCUSDT is listed twice"),
    ("", "no source given"),
    (" , ,", "no source given"),
    ("binance", "'binance' is not exchange:SYMBOL"),
    ("binance:", "'binance:' is not exchange:SYMBOL"),
    ("binance: ", "is not exchange:SYMBOL"),
    ("BTCUSDT", "'BTCUSDT' is not exchange:SYMBOL"),
    ("binance:BTC-USDT", "'BTC-USDT' is not a Binance symbol"),
    ("binance:BTC/USDT", "is not a Binance symbol"),
    ("binance:B", "is not a Binance symbol"),
])
def test_bad_sources(text, fragment):
    message = config_error({"BTCFEED_SOURCES": text})
    assert message.startswith("BTCFEED_SOURCES: ") and fragment in message


# --- other settings -----------------------------------------------------------------------------

@pytest.mark.parametrize("addr, host, port", [
    ("127.0.0.1:8079", "127.0.0.1", 8079), ("0.0.0.0:0", "0.0.0.0", 0), (":9000", "127.0.0.1", 9000),
    ("localhost:65535", "localhost", 65535), ("[::1]:8079", "::1", 8079), ("[::]:80", "::", 80),
])
def test_health_addr(addr, host, port):
    assert parse_addr("BTCFEED_HEALTH_ADDR", addr) == (host, port)
    config = load({"BTCFEED_HEALTH_ADDR": addr})
    assert (config.health_host, config.health_port) == (host, port)


@pytest.mark.parametrize("addr", ["8079", "localhost", "host:", "host:http", "host:65536", "host:-1", "",
                                  "host:1.5"])
def test_bad_health_addr(addr):
    assert config_error({"BTCFEED_HEALTH_ADDR": addr}) == f"BTCFEED_HEALTH_ADDR: {addr!r} is not host:port"


@pytest.mark.parametrize("form", ["raw", "combined"])
def test_stream_forms(form):
    assert load({"BTCFEED_BINANCE_STREAM_FORM": form}).binance_stream_form == form


@pytest.mark.parametrize("form", ["", "RAW", "ws", "stream"])
def test_bad_stream_form(form):
    message = config_error({"BTCFEED_BINANCE_STREAM_FORM": form})
    assert message.startswith("BTCFEED_BINANCE_STREAM_FORM: must be 'raw'")


@pytest.mark.parametrize("hours", ["0.01", "1", "23.5", "24"])
def test_max_conn_hours_in_bounds(hours):
    assert load({"BTCFEED_MAX_CONN_HOURS": hours}).max_conn_hours == float(hours)


@pytest.mark.parametrize("hours", ["0", "-1", "24.01", "25", "nan"])
def test_max_conn_hours_out_of_bounds(hours):
    message = config_error({"BTCFEED_MAX_CONN_HOURS": hours})
    assert message.startswith("BTCFEED_MAX_CONN_HOURS: must be above 0 and at most 24")


@pytest.mark.parametrize("variable, url, fragment", [
    ("BTCFEED_BINANCE_WS_URL", "https://stream.binance.com", "is not a ws:// or wss:// base URL"),
    ("BTCFEED_BINANCE_WS_URL", "wss://stream.binance.com:9443/ws/btcusdt@trade", "without a path"),
    ("BTCFEED_BINANCE_REST_URL", "wss://api.binance.com", "is not a http:// or https:// base URL"),
    ("BTCFEED_BINANCE_REST_URL", "https://", "base URL"),
    ("BTCFEED_BINANCE_REST_URL", "https://api.binance.com/api/v3", "without a path"),
    ("BTCFEED_BINANCE_REST_URL", "https://[::1", "base URL"),
    ("BTCFEED_BINANCE_WS_URL", "wss://stream.binance.com:port", "has an invalid port"),
    ("BTCFEED_BINANCE_REST_URL", "https://api.binance.com:99999", "has an invalid port"),
])
def test_bad_exchange_base_urls(variable, url, fragment):
    message = config_error({variable: url})
    assert message.startswith(variable + ": ") and fragment in message


def test_relative_state_dir_becomes_absolute(in_tmp):
    config = load({"BTCFEED_STATE_DIR": "stacks/../stack-b"})
    assert os.path.isabs(config.state_dir)
    assert config.state_dir == str(in_tmp / "stack-b")
    assert config.local_url == f"unix://{in_tmp / 'stack-b' / 'redis.sock'}"


@pytest.mark.parametrize("name", ["with#hash", "with?query", "with space", "with%25percent"])
def test_default_local_url_keeps_an_odd_state_dir_whole(in_tmp, name):
    config = load({"BTCFEED_STATE_DIR": name})
    url = redis.connection.parse_url(config.local_url)
    assert url["path"] == str(in_tmp / name / "redis.sock")


def test_two_state_dirs_give_two_local_sockets(in_tmp):
    a = load({"BTCFEED_STATE_DIR": "a"})
    b = load({"BTCFEED_STATE_DIR": "b"})
    assert a.local_url != b.local_url and a.local_url.endswith("/a/redis.sock")


def test_explicit_local_url_is_kept():
    url = "unix:///run/redis/redis.sock"
    assert load({"BTCFEED_LOCAL_URL": url}).local_url == url


# --- the Binance record kind --------------------------------------------------------------------

def test_binance_trade_kind_defaults_to_every_trade():
    assert load({}).binance_trade_kind == "trade"


@pytest.mark.parametrize("kind", ["trade", "aggTrade"])
def test_binance_trade_kinds(kind, in_tmp):
    assert load({"BTCFEED_BINANCE_TRADE_KIND": kind}).binance_trade_kind == kind
    path = write_toml(in_tmp, f'binance_trade_kind = "{kind}"\n')
    assert load({"BTCFEED_CONFIG": path}).binance_trade_kind == kind


def test_environment_kind_beats_the_file(in_tmp):
    path = write_toml(in_tmp, 'binance_trade_kind = "aggTrade"\n')
    assert load({"BTCFEED_CONFIG": path, "BTCFEED_BINANCE_TRADE_KIND": "trade"}).binance_trade_kind == "trade"


@pytest.mark.parametrize("kind", ["aggtrade", "AGGTRADE", "trades", "aggTrades", "", "depth", "x" * 500])
def test_bad_binance_trade_kind_is_one_readable_line(kind):
    message = config_error({"BTCFEED_BINANCE_TRADE_KIND": kind})
    assert message.startswith("BTCFEED_BINANCE_TRADE_KIND: must be 'trade'")
    assert "'aggTrade'" in message and "\n" not in message and len(message) < 200


# --- TLS options in a Redis URL cannot weaken verification -----------------------------------------

# Each of these passed the old substring test ("ssl_cert_reqs=required" somewhere in the query), yet
# redis-py would have used the weakening value: it reads the first value of a key, and a URL option
# wins over the client's own ssl_cert_reqs/ssl_check_hostname/ssl_ca_certs.
WEAKENING_QUERIES = [
    "ssl_cert_reqs=none&x=ssl_cert_reqs=required",
    "ssl_cert_reqs=none&ssl_cert_reqs=required",
    "ssl_cert_reqs=required&ssl_cert_reqs=optional",
    "ssl%5Fcert%5Freqs=none&y=ssl_cert_reqs=required",
    "ssl_check_hostname=false",
    "ssl_check_hostname=0",
    "ssl_check_hostname=true&ssl_check_hostname=no",
    "ssl_ca_certs=/tmp/someone-elses-ca.pem",
    "ssl_ca_path=/tmp",
    "ssl_exclude_verify_flags=VERIFY_X509_STRICT",
    "ssl_min_version=2",
    "ssl_ciphers=NULL",
]
URL_FORMS = {
    "rediss": "rediss://feed:pw-Secret-42@h:6380/0?{query}",
    "sentinel": "redis+sentinel://feed:pw-Secret-42@h:26379,h:26380/mymaster/0?{query}",
    "cluster": "redis+cluster://feed:pw-Secret-42@h:7000,h:7001/?{query}",
}


@pytest.mark.parametrize("form", sorted(URL_FORMS))
@pytest.mark.parametrize("query", WEAKENING_QUERIES)
def test_a_url_cannot_weaken_tls_verification(form, query):
    url = URL_FORMS[form].format(query=query)
    message = config_error({"BTCFEED_PRIMARY_URL": url, "BTCFEED_COMPAT_KEYS": "0"})
    assert message.startswith("BTCFEED_PRIMARY_URL: ") and "ssl_" in message
    assert "\n" not in message and "pw-Secret-42" not in message and len(message) < 300


def test_the_local_url_is_checked_the_same_way():
    message = config_error({"BTCFEED_LOCAL_URL": "rediss://h:6380/0?ssl_check_hostname=false"})
    assert message.startswith("BTCFEED_LOCAL_URL: ssl_check_hostname other than true")


def test_the_query_is_parsed_not_searched():
    """Options that keep verification are taken, and so is a value that merely mentions one (the
    old substring test refused that one while it let the tricks above through)."""
    for query in ("ssl_cert_reqs=required", "ssl_check_hostname=true",
                  "ssl_cert_reqs=required&ssl_check_hostname=1", "socket_keepalive=true",
                  "client_name=no-ssl_cert_reqs-here"):
        url = f"rediss://h:6380/0?{query}"
        assert load({"BTCFEED_PRIMARY_URL": url}).primary_url == url


# --- loopback: addresses, not name prefixes -----------------------------------------------------------

def test_loopback_addresses():
    for host in ("127.0.0.1", "127.1.2.3", "127.255.255.254", "::1", "[::1]", "localhost", "LOCALHOST",
                 "::ffff:127.0.0.1"):
        assert is_loopback(host), host


def test_names_that_look_like_loopback_and_other_addresses_are_not_loopback():
    for host in ("127.evil.com", "127.0.0.1.nip.io", "localhost.example.com", "0.0.0.0", "::", "10.0.0.1",
                 "128.0.0.1", "", "::2", "::ffff:10.0.0.1"):
        assert not is_loopback(host), host
