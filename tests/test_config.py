"""dftx.config: the INI format of DESIGN.md, typed and validated."""

import dataclasses

import pytest

from dftx import config
from dftx.errors import ConfigError

FULL = """
[df]
nb_db_driver = redis                 # redis | memory
remote_db_hosts = 127.0.0.1:7000,127.0.0.1:7001   # any seed nodes
pub_sub_driver = zmq
management_ip = 127.0.0.1
publisher_timeout = 300
[df_redis]
retries = 3
cluster_watch_interval = 3
wait_replicas = 0
tls = false                          ; ca_file, cert_file, key_file when true
[neutron_server]
publisher_port = 8866
publisher_bind_address = 127.0.0.1
pub_sub_use_multiproc = true
publisher_multiproc_socket = /run/dftx/publisher.sock
http_endpoint = tcp:8080:interface=127.0.0.1
[df_local_controller]
chassis_name = compute1
publisher_port = 8867
publisher_bind_address = 127.0.0.1
ovsdb_connection = tcp:127.0.0.1:6640
tables = lport,lswitch,lrouter,secgroup,chassis   # cached
topics =
db_sync_time = 120
http_endpoint = tcp:8090:interface=127.0.0.1
"""

MINIMAL = """
[df]
remote_db_hosts = 127.0.0.1:7000
[df_local_controller]
chassis_name = compute1
"""


def write(tmp_path, content, name="dftx.ini"):
    p = tmp_path / name
    p.write_text(content)
    return str(p)


def test_design_example_parses_for_both_roles(tmp_path):
    path = write(tmp_path, FULL)
    for role in config.ROLES:
        c = config.load(path, role)
        assert c.role == role and c.path == path
        assert c.df.remote_db_hosts == ("127.0.0.1:7000", "127.0.0.1:7001")
        assert c.df_redis.retries == 3 and c.df_redis.tls is False
        assert c.df_redis.cluster_watch_interval == 3.0
        assert c.neutron_server.publisher_port == 8866
        assert c.neutron_server.pub_sub_use_multiproc is True
        assert c.df_local_controller.tables == ("lport", "lswitch", "lrouter", "secgroup", "chassis")
        assert c.df_local_controller.topics == ()
        assert c.df_local_controller.chassis_name == "compute1"


def test_every_key_but_the_required_has_the_design_default(tmp_path):
    full = config.load(write(tmp_path, FULL), config.LOCAL_CONTROLLER)
    minimal = config.load(write(tmp_path, MINIMAL, "m.ini"), config.LOCAL_CONTROLLER)
    for section in ("df", "df_redis", "neutron_server", "df_local_controller"):
        a, b = getattr(full, section), getattr(minimal, section)
        if section == "df":
            a = dataclasses.replace(a, remote_db_hosts=b.remote_db_hosts)
        assert a == b, section


def test_memory_driver_needs_no_hosts(tmp_path):
    c = config.load(write(tmp_path, "[df]\nnb_db_driver = memory\n"), config.NEUTRON_SERVER)
    assert c.df.remote_db_hosts == ()


def test_ipv6_hosts(tmp_path):
    c = config.load(write(tmp_path, "[df]\nremote_db_hosts = [::1]:7000, h:1\n"))
    assert c.df.remote_db_hosts == ("[::1]:7000", "h:1")


def assert_error(tmp_path, content, section, key, reason, role=config.LOCAL_CONTROLLER):
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        config.load(path, role)
    err = info.value
    assert (err.path, err.section, err.key) == (path, section, key)
    assert reason in err.reason
    message = str(err)
    assert path in message and reason in message
    if section:
        assert f"[{section}]" in message
    if key:
        assert key in message
    return err


@pytest.mark.parametrize("section, key, value, reason", [
    ("df", "nb_db_driver", "mysql", "not one of redis, memory"),
    ("df", "pub_sub_driver", "kafka", "not one of"),
    ("df", "remote_db_hosts", "localhost", "not host:port"),
    ("df", "remote_db_hosts", "h:99999", "out of range"),
    ("df", "remote_db_hosts", "::1:7000", "IPv6"),
    ("df", "management_ip", "10.0.0.300", "not an IP address"),
    ("df", "publisher_timeout", "0", "out of range"),
    ("df", "publisher_timeout", "5m", "not an integer"),
    ("df_redis", "retries", "-1", "out of range"),
    ("df_redis", "cluster_watch_interval", "0", "positive"),
    ("df_redis", "tls", "maybe", "not a boolean"),
    ("df_redis", "ca_file", "/nonexistent/ca.pem", "not a readable file"),
    ("df_local_controller", "publisher_port", "70000", "out of range"),
    ("df_local_controller", "ovsdb_connection", "bogus:1:2", "not a client endpoint"),
    ("df_local_controller", "http_endpoint", "tcp:notaport", "not a server endpoint"),
    ("df_local_controller", "db_sync_time", "soon", "not a number"),
    ("df_local_controller", "chassis_name", "", "must not be empty"),
])
def test_bad_values_name_file_section_key(tmp_path, section, key, value, reason):
    sections = {"df": {"remote_db_hosts": "127.0.0.1:7000"},
                "df_local_controller": {"chassis_name": "c1"}}
    sections.setdefault(section, {})[key] = value
    content = "".join(
        f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items())
        for s, kv in sections.items())
    assert_error(tmp_path, content, section, key, reason)


def test_unknown_key(tmp_path):
    assert_error(tmp_path, MINIMAL + "[df_redis]\nretrys = 3\n", "df_redis", "retrys",
                 "unknown key")


def test_unknown_section(tmp_path):
    assert_error(tmp_path, MINIMAL + "[dfredis]\nretries = 3\n", "dfredis", None,
                 "unknown section")
    assert_error(tmp_path, "[DEFAULT]\nx = 1\n" + MINIMAL, "DEFAULT", None,
                 "unknown section")


def test_missing_required_keys(tmp_path):
    assert_error(tmp_path, "[df]\nremote_db_hosts = h:1\n", "df_local_controller",
                 "chassis_name", "required key is missing")
    assert_error(tmp_path, "[df_local_controller]\nchassis_name = c\n", "df",
                 "remote_db_hosts", "required with nb_db_driver = redis")
    assert_error(tmp_path, "[df]\nnb_db_driver = memory\npub_sub_driver = redis\n",
                 "df", "remote_db_hosts", "required", role=config.NEUTRON_SERVER)


def test_role_reads_only_its_own_section_for_required_keys(tmp_path):
    # The publisher does not need the controller's chassis_name.
    c = config.load(write(tmp_path, "[df]\nremote_db_hosts = h:1\n"), config.NEUTRON_SERVER)
    assert c.df_local_controller.chassis_name is None


def test_tls_keys_go_together(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert_error(tmp_path, MINIMAL + "[df_redis]\ntls = true\n", "df_redis", "ca_file",
                 "required when tls = true")
    assert_error(tmp_path, MINIMAL + f"[df_redis]\ntls = yes\nca_file = {ca}\ncert_file = {ca}\n",
                 "df_redis", "key_file", "go together")
    c = config.load(write(tmp_path, MINIMAL + f"[df_redis]\ntls = on\nca_file = {ca}\n"))
    assert c.df_redis.tls is True and c.df_redis.ca_file == str(ca)


def test_duplicate_key_and_section(tmp_path):
    assert_error(tmp_path, MINIMAL + "[df_redis]\nretries = 1\nretries = 2\n",
                 "df_redis", "retries", "set twice")
    assert_error(tmp_path, MINIMAL + "[df]\nmanagement_ip = 1.2.3.4\n", "df", None,
                 "section appears twice")


def test_syntax_errors_name_the_file(tmp_path):
    assert_error(tmp_path, "remote_db_hosts = h:1\n", None, None,
                 "line 1: 'remote_db_hosts = h:1' comes before any [section]")
    assert_error(tmp_path, MINIMAL + "[df_redis]\nthis line has no equals\n", None, None,
                 "line 7: cannot parse 'this line has no equals'")


def test_unreadable_file(tmp_path):
    path = str(tmp_path / "missing.ini")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.path == path and "cannot read" in str(info.value)
    (tmp_path / "bin.ini").write_bytes(b"\xff\xfe[df]")
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "bin.ini")


def test_every_option_is_documented():
    for cls in config.SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata["help"] and f.metadata["type"], f.name


BAD_VALUES = ["", "-1", "0", "999999", "maybe", "1e999", "nan", "x" * 300, "\u00e9\u00e9:\u00e9",
              "tcp:", "/nonexistent/file", "127.0.0.1:99999", "a,,b", "[df]", "a.b,{c}"]
# Keys whose value is free text (a name, a user, a path the service makes).
FREE_TEXT = {("df_redis", "username"), ("df_redis", "password"),
             ("neutron_server", "publisher_multiproc_socket")}


@pytest.mark.parametrize("section, key", [
    (section, f.name) for section, cls in config.SECTIONS.items()
    for f in dataclasses.fields(cls)])
def test_every_key_refuses_bad_values_with_a_config_error(tmp_path, section, key):
    """Whatever the value, loading either works or raises ConfigError naming
    the file, a section and a key; every key but free text refuses some."""
    role = section if section in config.ROLES else config.LOCAL_CONTROLLER
    refused = 0
    for i, value in enumerate(BAD_VALUES):
        sections = {"df": {"remote_db_hosts": "127.0.0.1:7000"},
                    "df_local_controller": {"chassis_name": "c1"}}
        sections.setdefault(section, {})[key] = value
        path = write(tmp_path, "".join(
            f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items())
            for s, kv in sections.items()), name=f"bad{i}.ini")
        try:
            config.load(path, role)
        except ConfigError as e:
            refused += 1
            assert e.path == path and e.section and e.key and path in str(e)
    assert refused or (section, key) in FREE_TEXT, f"[{section}] {key} took every bad value"


def test_empty_redis_username_and_password_mean_no_auth(tmp_path):
    c = config.load(write(tmp_path, MINIMAL + "[df_redis]\nusername =\npassword =\n"))
    assert (c.df_redis.username, c.df_redis.password) == ("", "")


@pytest.mark.parametrize("topic", ["redis", "D"])
def test_reserved_topics_are_not_tenant_topics(tmp_path, topic):
    err = assert_error(tmp_path, MINIMAL.replace("chassis_name = compute1",
                                                 f"chassis_name = compute1\ntopics = t1,{topic}"),
                       "df_local_controller", "topics", "reserved")
    assert repr(topic) in err.reason


def test_reading_a_configuration_installs_no_reactor():
    """An application may read its configuration before choosing a reactor:
    checking the endpoint strings must not install the default one."""
    import subprocess
    import sys

    code = ("import sys\nfrom dftx import config\n"
            f"config.parse({FULL!r}, 'x.ini', config.LOCAL_CONTROLLER)\n"
            "assert 'twisted.internet.reactor' not in sys.modules, 'reactor installed'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
