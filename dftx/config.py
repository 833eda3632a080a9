"""
Configuration: one INI file per service, read into typed, validated settings.

The schema is the dataclasses below: each field is one key, with its type
(the parser, from L{dftx.config_values}), default and meaning, so the
operator guide is generated from here and cannot drift.  L{load} refuses a file with an unknown section or key,
a bad value, or a missing required key, with a L{ConfigError} that names the
file, section and key.

    [df]                    read by every service
    [df_redis]              read by every service
    [neutron_server]        read by twistd dfpublisher (role neutron_server)
    [df_local_controller]   read by twistd dfcontroller (role df_local_controller)

Comments start with C{#} or C{;}, on their own line or after a value
(preceded by white space).
"""

from __future__ import annotations

import configparser
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from dftx.config_values import (
    boolean, check_tenant_topic, checked_names, choice, client_endpoint, curve_public_keys,
    curve_secret_key_file, host_ports, integer, ip_address, option, optional_file,
    optional_text, seconds, server_endpoint, text,
)
from dftx.db.api import check_table
from dftx.errors import ConfigError
from dftx.update import LOCAL_CONTROLLER, NEUTRON_SERVER, ROLES

__all__ = [
    "COMMON_SECTIONS", "LOCAL_CONTROLLER", "NEUTRON_SERVER", "ROLES", "SECTIONS", "Config",
    "DfSettings", "LocalControllerSettings", "NeutronServerSettings", "RedisSettings", "load",
    "parse",
]

COMMON_SECTIONS = ("df", "df_redis")

@dataclass(frozen=True)
class DfSettings:
    """[df]: what every service reads."""

    nb_db_driver: str = option(
        "redis", choice("redis", "memory"), "NB database driver.", "redis | memory")
    remote_db_hosts: tuple[str, ...] = option(
        (), host_ports,
        "Seed nodes of the Redis Cluster (any reachable ones; the rest are "
        "discovered); required with the redis NB driver or a redis pub/sub driver.",
        "comma-separated host:port")
    pub_sub_driver: str = option(
        "zmq", choice("zmq", "redis", "redis_sharded"),
        "How NB updates travel: ZeroMQ through the publisher services, or "
        "Redis (classic or sharded) pub/sub.", "zmq | redis | redis_sharded")
    management_ip: str = option(
        "127.0.0.1", ip_address,
        "This host's address as others reach it: written in the registration "
        "and chassis rows.", "IP address")
    publisher_timeout: int = option(
        300, integer(1),
        "Seconds after which a publisher row that was not refreshed is stale "
        "and removed (rows are refreshed every third of this).", "integer, seconds")
    zmq_curve: bool = option(
        False, boolean,
        "ZeroMQ CURVE on every tcp ZeroMQ socket of the service: its PUB socket "
        "serves only allowed client keys, its subscriber authenticates each "
        "publisher (see doc/security.md); pub_sub_driver = zmq only.", "boolean")
    zmq_curve_secret_key_file: str = option(
        "", curve_secret_key_file,
        "This service's CURVE key pair (a zmq.auth / dftx curve-keygen .key_secret "
        "file, or a file with only the z85 secret key): the server key of its PUB "
        "socket and the client key of its subscriber; required with zmq_curve.", "path")
    zmq_curve_allowed_keys: str = option(
        "", curve_public_keys,
        "Client public keys allowed to subscribe to this service's publisher: a "
        "key file, or a directory of *.key files; required with zmq_curve.", "path")
    zmq_curve_server_keys: str = option(
        "", curve_public_keys,
        "Publisher public keys this service's subscriber accepts (file or "
        "directory); empty: the key in each publisher's row of table publisher.",
        "path")
    zmq_heartbeat_interval: float = option(
        2.0, seconds,
        "Seconds between ZeroMQ heartbeats (ZMTP PING) on every PUB and SUB socket, "
        "so that a silent network cut (no FIN or RST) is a disconnection: the "
        "subscriber then resyncs once reconnected (doc/reliability.md).", "seconds")
    zmq_heartbeat_timeout: float = option(
        6.0, seconds,
        "Seconds without any traffic after which a ZeroMQ connection counts as "
        "dead and is closed (by both sides); a silent cut is noticed within "
        "zmq_heartbeat_interval + this. At least zmq_heartbeat_interval.", "seconds")


@dataclass(frozen=True)
class RedisSettings:
    """[df_redis]: the Redis client."""

    retries: int = option(
        3, integer(1), "Attempts per command before the error reaches the caller.",
        "integer >= 1")
    cluster_watch_interval: float = option(
        3.0, seconds,
        "Seconds between the publisher's CLUSTER SHARDS checks for topology changes.",
        "seconds")
    wait_replicas: int = option(
        0, integer(0),
        "Replicas each write waits for (Redis WAIT) before it is acknowledged.",
        "integer >= 0")
    read_from_replicas: bool = option(
        False, boolean,
        "Serve reads of one topic's rows (every resync of a controller's cache) and the "
        "periodic resync's version checks from a replica of the slot's master (READONLY), "
        "so masters keep taking writes; a read falls back to the master when no replica "
        "answers. A replica may lag its master: see doc/design.md.", "boolean")
    username: str = option(
        "", optional_text, "Redis 6+ ACL user for AUTH (empty: the default user).", "text")
    password: str = option(
        "", optional_text, "Password sent with AUTH on every connection (empty: no AUTH). "
        "Never logged or shown in /v1/status.", "text", secret=True)
    tls: bool = option(False, boolean, "Connect to Redis over TLS.", "boolean")
    ca_file: str = option(
        "", optional_file, "CA certificates (PEM) that sign the Redis servers' "
        "certificates; required with tls.", "path")
    cert_file: str = option(
        "", optional_file, "Client certificate (PEM) for TLS client authentication.",
        "path")
    key_file: str = option(
        "", optional_file, "Private key (PEM) of cert_file.", "path")


@dataclass(frozen=True)
class NeutronServerSettings:
    """[neutron_server]: the publisher service (twistd dfpublisher)."""

    publisher_port: int = option(
        8866, integer(1, 65535), "TCP port the ZeroMQ PUB socket binds.", "port")
    publisher_bind_address: str = option(
        "127.0.0.1", ip_address, "Address the ZeroMQ PUB socket binds.", "IP address")
    pub_sub_use_multiproc: bool = option(
        True, boolean,
        "ZeroMQ only: API workers PUSH updates over ipc to the service, which "
        "re-publishes them.", "boolean")
    publisher_multiproc_socket: str = option(
        "/run/dftx/publisher.sock", text, "Path of the ipc socket workers push to.",
        "path")
    http_endpoint: str = option(
        "tcp:8080:interface=127.0.0.1", server_endpoint,
        "Where /healthz, /metrics and /v1/status are served.",
        "Twisted server endpoint string")


@dataclass(frozen=True)
class LocalControllerSettings:
    """[df_local_controller]: the local controller (twistd dfcontroller)."""

    chassis_name: str | None = option(
        None, text, "This compute node's name: the key of its chassis row.", "text",
        required=True)
    publisher_port: int = option(
        8867, integer(1, 65535),
        "TCP port of the controller's own ZeroMQ publisher (port status).", "port")
    publisher_bind_address: str = option(
        "127.0.0.1", ip_address, "Address the controller's publisher binds.",
        "IP address")
    ovsdb_connection: str = option(
        "tcp:127.0.0.1:6640", client_endpoint,
        "The local ovsdb-server to monitor.", "Twisted client endpoint string")
    tables: tuple[str, ...] = option(
        ("lport", "lswitch", "lrouter", "secgroup", "chassis"), checked_names(check_table),
        "NB tables cached locally; updates for other tables are ignored.",
        "comma-separated names")
    topics: tuple[str, ...] = option(
        (), checked_names(check_tenant_topic),
        "Tenant topics to subscribe to beyond \"D\" (more can be added at run time; "
        "\"D\" and \"redis\" are reserved).",
        "comma-separated names")
    db_sync_time: float = option(
        120.0, seconds, "Seconds between periodic safety resyncs with the NB DB.",
        "seconds")
    resync_spread: float = option(
        1.0, seconds,
        "Least window over which a resync that every controller is told to make at "
        "once (dbrestart, sync, HA topology) is spread: each waits a random delay "
        "within the window before it reads; updates are applied meanwhile.", "seconds")
    fleet_resync_rate: int = option(
        200, integer(1),
        "Such resyncs the fleet may start per second: the window grows to "
        "(rows of the cached table chassis, one per controller) / this.",
        "integer >= 1, per second")
    http_endpoint: str = option(
        "tcp:8090:interface=127.0.0.1", server_endpoint,
        "Where /healthz, /metrics, /v1/status, /v1/tables and /v1/ports are served.",
        "Twisted server endpoint string")


SECTIONS: dict[str, type] = {
    "df": DfSettings,
    "df_redis": RedisSettings,
    NEUTRON_SERVER: NeutronServerSettings,
    LOCAL_CONTROLLER: LocalControllerSettings,
}


@dataclass(frozen=True)
class Config:
    """
    Every section's settings (defaults where the file has no section).
    C{role} is the service that loaded it, or None when loaded for all.
    """

    path: str
    role: str | None
    df: DfSettings
    df_redis: RedisSettings
    neutron_server: NeutronServerSettings
    df_local_controller: LocalControllerSettings


def load(path: str | os.PathLike[str], role: str | None = None) -> Config:
    """
    Read and validate C{path} for C{role} (one of L{ROLES}; None checks the
    common sections and every role section present).

    @raise ConfigError: naming the file, and the section and key when the
        problem is with one.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"cannot read: {e}") from None
    return parse(content, path, role)


def parse(content: str, path: str = "<string>", role: str | None = None) -> Config:
    """L{load} from text already read; C{path} names it in errors."""
    if role is not None and role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    ini = configparser.ConfigParser(
        interpolation=None,
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=("#", ";"),
        default_section="\0",  # [DEFAULT] is not special: it is an unknown section
        strict=True,
    )
    try:
        ini.read_string(content, source=path)
    except configparser.DuplicateOptionError as e:
        raise ConfigError(path, f"line {e.lineno}: set twice", e.section, e.option) from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError(path, f"line {e.lineno}: section appears twice", e.section) from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(
            path, f"line {e.lineno}: {_shown(e.line)} comes before any [section]"
        ) from None
    except configparser.ParsingError as e:
        lineno = e.errors[0][0]
        line = content.splitlines()[lineno - 1].strip()
        raise ConfigError(path, f"line {lineno}: cannot parse {_shown(line)}") from None

    for section in ini.sections():
        if section not in SECTIONS:
            raise ConfigError(
                path, f"unknown section (known: {', '.join(SECTIONS)})", section)
    read = COMMON_SECTIONS + ((role,) if role else tuple(s for s in ROLES if ini.has_section(s)))
    settings = {
        name: _section(path, ini, name, cls, required=name in read)
        for name, cls in SECTIONS.items()
    }
    config = Config(path=path, role=role, **settings)
    _check_together(config)
    return config


def _shown(line: str) -> str:
    """A line quoted in an error, unless it may hold a secret (a password)."""
    line = line.strip()
    lowered = line.lower()
    if any(word in lowered for word in ("pass", "secret", "key")):
        return "(a line that may hold a secret: not shown)"
    return repr(line)


def _section(path: str, ini: configparser.ConfigParser, name: str, cls: type,
             required: bool) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    raw = ini[name] if ini.has_section(name) else {}
    for key, text_value in raw.items():
        if key not in fields:
            raise ConfigError(
                path, f"unknown key (known: {', '.join(fields)})", name, key)
        try:
            values[key] = fields[key].metadata["parse"](text_value.strip())
        except ValueError as e:
            raise ConfigError(path, str(e), name, key) from None
    if required:
        for key, f in fields.items():
            if f.metadata["required"] and key not in values:
                raise ConfigError(path, "required key is missing", name, key)
    return cls(**values)


def _check_together(config: Config) -> None:
    """Rules that tie keys together."""
    df, r = config.df, config.df_redis
    needs_redis = df.nb_db_driver == "redis" or df.pub_sub_driver.startswith("redis")
    if needs_redis and not df.remote_db_hosts:
        raise ConfigError(
            config.path,
            f"required with nb_db_driver = {df.nb_db_driver} and "
            f"pub_sub_driver = {df.pub_sub_driver}",
            "df", "remote_db_hosts")
    if df.zmq_curve:
        if df.pub_sub_driver != "zmq":
            raise ConfigError(
                config.path, f"only with pub_sub_driver = zmq (not {df.pub_sub_driver}; "
                "Redis pub/sub is protected by [df_redis] password and tls)",
                "df", "zmq_curve")
        for key in ("zmq_curve_secret_key_file", "zmq_curve_allowed_keys"):
            if not getattr(df, key):
                raise ConfigError(config.path, "required when zmq_curve = true", "df", key)
    if df.zmq_heartbeat_timeout < df.zmq_heartbeat_interval:
        raise ConfigError(config.path, "must be at least zmq_heartbeat_interval", "df",
                          "zmq_heartbeat_timeout")
    if r.tls and not r.ca_file:
        raise ConfigError(config.path, "required when tls = true", "df_redis", "ca_file")
    if bool(r.cert_file) != bool(r.key_file):
        missing = "key_file" if r.cert_file else "cert_file"
        raise ConfigError(
            config.path, "cert_file and key_file go together", "df_redis", missing)
