"""
The values of the configuration's keys: L{option}, the dataclass field that
describes one key (its parser, default, type name and help text), and the
parsers, each of which turns the INI text of a key into its typed value or
raises ValueError saying what is wrong.  L{dftx.config} declares the
sections with them and reads the file.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
from dataclasses import field
from typing import Any, Callable

from twisted.internet import endpoints

from dftx.db.api import check_topic
from dftx.errors import InvalidNameError
from dftx.ha import HA_TOPIC
from dftx.update import SEND_ALL_TOPIC

__all__ = [
    "RESERVED_TOPICS", "Parser", "boolean", "check_tenant_topic",
    "checked_names", "choice", "client_endpoint", "curve_public_keys",
    "curve_secret_key_file", "host_port", "host_ports", "integer", "ip_address", "names",
    "option", "optional_file", "optional_text", "seconds", "server_endpoint", "text",
]

Parser = Callable[[str], Any]


def option(default: Any, parse: Parser, help: str, type: str, required: bool = False,
           secret: bool = False) -> Any:
    """A settings field: C{default} (typed), the parser of its INI text, docs.
    A C{secret} one is left out of the settings' C{repr}."""
    return field(
        default=default, repr=not secret,
        metadata={"parse": parse, "help": help, "type": type, "required": required},
    )


# Parsers: INI text -> value, or ValueError saying what is wrong.

def choice(*allowed: str) -> Parser:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")
        return text
    return parse


def integer(minimum: int, maximum: int | None = None) -> Parser:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"{value} is out of range ({bound})")
        return value
    return parse


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{text!r} must be a positive number of seconds")
    return value


def boolean(text: str) -> bool:
    states = configparser.ConfigParser.BOOLEAN_STATES
    if text.lower() not in states:
        raise ValueError(f"{text!r} is not a boolean (true/false, yes/no, on/off, 1/0)")
    return states[text.lower()]


def ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def text(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def optional_text(value: str) -> str:
    """Any text; empty means unset."""
    return value


def optional_file(value: str) -> str:
    if value and not os.access(value, os.R_OK):
        raise ValueError(f"{value!r} is not a readable file")
    return value


def curve_secret_key_file(value: str) -> str:
    """A CURVE key pair file (its secret key is read, never quoted)."""
    from dftx.pubsub.curve import load_key_pair

    if value:
        load_key_pair(value)
    return value


def curve_public_keys(value: str) -> str:
    """A file or directory of CURVE public keys (at least one)."""
    from dftx.pubsub.curve import load_public_keys

    if value:
        load_public_keys(value)
    return value


def names(value: str) -> tuple[str, ...]:
    """Comma-separated names; empty items are dropped."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def checked_names(check: Callable[[str], None]) -> Parser:
    """L{names}, each of which C{check} accepts (it raises ValueError)."""
    def parse(value: str) -> tuple[str, ...]:
        items = names(value)
        for item in items:
            check(item)
        return items
    return parse


RESERVED_TOPICS = {
    SEND_ALL_TOPIC: "the topic every subscriber always listens to",
    HA_TOPIC: "the Redis HA topic, whose updates the controller applies as topologies",
}
"""Topic names that are not tenant topics, and what they are."""


def check_tenant_topic(topic: str) -> None:
    """
    @raise InvalidNameError: for a topic the NB DB cannot store (see
        L{check_topic}) or one of L{RESERVED_TOPICS}.
    """
    check_topic(topic)
    if topic in RESERVED_TOPICS:
        raise InvalidNameError("topic", topic, f"reserved: {RESERVED_TOPICS[topic]}")


def host_port(text: str) -> str:
    """C{host:port} or C{[v6]:port}; returned as given, stripped."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{text!r} is not host:port")
        ip_address(host[1:-1])
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address as [addr]:port")
    integer(1, 65535)(port)
    return text


def host_ports(value: str) -> tuple[str, ...]:
    return tuple(host_port(item) for item in names(value))


# The endpoint string is only parsed, never listened on or connected: the
# endpoint made keeps the reactor it is given without using it, so none is
# given, and reading a configuration leaves the choice of reactor open.

def server_endpoint(value: str) -> str:
    """A Twisted server endpoint string (tcp:, unix:, ssl:, ...)."""
    try:
        endpoints.serverFromString(None, value)
    except Exception as e:  # parsers raise ValueError, TypeError, KeyError, OSError
        raise ValueError(f"{value!r} is not a server endpoint: {e}") from None
    return value


def client_endpoint(value: str) -> str:
    """A Twisted client endpoint string (tcp:, unix:, ssl:, ...)."""
    try:
        endpoints.clientFromString(None, value)
    except Exception as e:
        raise ValueError(f"{value!r} is not a client endpoint: {e}") from None
    return value
