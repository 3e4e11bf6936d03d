"""The ready-made files in config/ and the binary's messages for people:

* ``zope-temp-unix.conf`` (zope.conf over a unix socket) and the buildout
  snippet ``buildout-zope2instance.cfg`` (``zodb-temporary-storage``), each
  loaded with ZConfig as Zope reads it and opened against zeotemp;
* ``zeotemp.service``: its ExecStart, with the repository's
  ``zeotemp.toml``, passes ``--check-config``; its hardening is there;
* ``--version``, ``--check-config`` (good and bad settings), the start-up
  line (version, listeners, storages, limits) and the shutdown summary.

(zope-temp-clientstorage.conf and zope-temp-zeoclient.conf are tested in
test_zope_config.py, zope-temp-tls.conf in test_tls.py, zeotemp.toml by the
Rust config tests and below.)
"""

import configparser
import io
import os
import pathlib
import re
import subprocess
import textwrap

import pytest
import transaction
import ZConfig
import ZODB

from conftest import ZEOTEMP_BIN
from zeotemp_util import ZOPE_SCHEMA

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "config"
VERSION = re.search(r'^version = "([^"]+)"',
                    (REPO / "Cargo.toml").read_text(), re.M).group(1)

pytestmark = pytest.mark.zeotemp_only(
    reason="zeotemp's configs and command line")


def open_stanza(text):
    """A zope.conf stanza loaded as Zope does; returns the opened DB."""
    schema = ZConfig.loadSchemaFile(io.StringIO(ZOPE_SCHEMA))
    conf, _ = ZConfig.loadConfigFile(schema, io.StringIO(text))
    (db_conf,) = conf.databases
    section = db_conf.config
    assert section.mount_points == ["/temp_folder"]
    assert section.container_class == \
        "Products.TemporaryFolder.TemporaryContainer"
    return ZODB.DB(section.storage.open())


def roundtrip(db, make_db, server):
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["session"] = {"user": "bob"}
    tm.commit()
    conn.close()
    db.close()
    other = make_db(server).open(
        transaction_manager=transaction.TransactionManager())
    other.transaction_manager.begin()
    assert other.root()["session"] == {"user": "bob"}
    other.close()


def run(*args):
    return subprocess.run([str(ZEOTEMP_BIN), *args], capture_output=True,
                          text=True, timeout=30)


# -- config files ------------------------------------------------------------------

def test_unix_socket_stanza(server_factory, make_db, tmp_path):
    # As the stanza's comment says: --unix-socket-group (here this process's
    # own group: tests/systemd_recipes.rs runs it with another user's), which
    # gives the socket that group and mode 0660.
    sock = tmp_path / "zeotemp.sock"
    gid = os.getgid()
    server = server_factory(unix_socket=sock,
                            zeotemp_args=("--unix-socket-group", str(gid)))
    text = (CONFIG_DIR / "zope-temp-unix.conf").read_text()
    assert "server /run/zeotemp/zeotemp.sock" in text
    assert "--unix-socket-group zope" in text
    db = open_stanza(text.replace("/run/zeotemp/zeotemp.sock", str(sock)))
    assert db.storage.server_sync
    roundtrip(db, make_db, server)
    assert oct(sock.stat().st_mode & 0o777) == "0o660"
    assert sock.stat().st_gid == gid


def test_buildout_zodb_temporary_storage(server, make_db):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(CONFIG_DIR / "buildout-zope2instance.cfg")
    part = parser["instance"]
    assert part["recipe"] == "plone.recipe.zope2instance"
    # The add-on, as eggs and zcml lines of the part.
    assert "zeotemp.zoperecover" in part["eggs"].split()
    assert "zeotemp.zoperecover" in part["zcml"].split()
    # The recipe puts the option's lines into zope.conf as they are.
    text = textwrap.dedent(part["zodb-temporary-storage"])
    assert "server 127.0.0.1:8101" in text
    host, port = server.address
    db = open_stanza(text.replace("127.0.0.1:8101", f"127.0.0.1:{port}"))
    roundtrip(db, make_db, server)


SERVICE = CONFIG_DIR / "zeotemp.service"


def service_lines():
    return [line.strip() for line in SERVICE.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_systemd_unit_execstart_passes_check_config():
    (execstart,) = [line.split("=", 1)[1] for line in service_lines()
                    if line.startswith("ExecStart=")]
    argv = execstart.split()
    assert argv[0] == "/usr/local/bin/zeotemp"
    assert argv[1:] == ["--config", "/etc/zeotemp/zeotemp.toml"]
    # The unit's command line, with this checkout's binary and config.
    r = run("--check-config", "--config", str(CONFIG_DIR / "zeotemp.toml"))
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout


def test_systemd_unit_is_hardened():
    keys = {}
    for line in service_lines():
        if "=" in line:
            k, v = line.split("=", 1)
            keys.setdefault(k, []).append(v)
    for k, v in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                 "ProtectHome": "yes", "PrivateTmp": "yes",
                 "PrivateDevices": "yes", "DynamicUser": "yes",
                 "MemoryDenyWriteExecute": "yes",
                 "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
                 "CapabilityBoundingSet": "", "KillSignal": "SIGTERM",
                 # Restarted after any death, by a signal too (systemd counts
                 # SIGHUP/SIGTERM deaths as clean for on-failure), but not
                 # after a configuration error (exit 2), which would repeat.
                 "Restart": "always", "RestartPreventExitStatus": "2"}.items():
        assert keys.get(k) == [v], (k, keys.get(k))
    assert "@system-service" in keys["SystemCallFilter"]
    # Longer than the server's default shutdown grace (5 s).
    assert int(keys["TimeoutStopSec"][0]) > 5


# -- the command line --------------------------------------------------------------

def test_version():
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"zeotemp {VERSION}"


def test_check_config_good_and_bad(tmp_path):
    r = run("--check-config", "--storage", "1", "--storage", "temp",
            "--max-connections", "500", "--memory-limit", "1073741824")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith(f"zeotemp {VERSION}: configuration OK: "
                           "listen on 127.0.0.1:8101;"), line
    for part in ('storages "1", "temp"', "memory 1 GiB for all storages",
                 "500 connections", "frame 64 MiB"):
        assert part in line, (part, line)
    # Nothing was started: the check returns at once, binds nothing.
    bad = tmp_path / "bad.toml"
    bad.write_text("max-connections = 10\nadress = ['x']\n")
    r = run("--check-config", "--config", str(bad))
    assert r.returncode == 2
    assert "adress" in r.stderr and "configuration OK" not in r.stdout
    r = run("--check-config", "--threads", "0")
    assert r.returncode == 2 and "threads must be at least 1" in r.stderr
    r = run("--check-config", "--tls-certificate", str(tmp_path / "none.pem"),
            "--tls-key", str(tmp_path / "none.pem"))
    assert r.returncode == 2 and "none.pem" in r.stderr


def test_start_and_stop_lines(server_factory, make_storage):
    server = server_factory(storages=("1", "temp"),
                            zeotemp_args=("--max-connections", "123"))
    cs = make_storage(server)
    cs.close()
    server.stop()
    log = server.log_text()
    host, port = server.address
    start = [line for line in log.splitlines()
             if f"zeotemp {VERSION} on tcp {host}:{port}" in line]
    assert len(start) == 1, log
    for part in ('storages "1", "temp"', "123 connections",
                 "history 60 s", "timeouts: transaction"):
        assert part in start[0], (part, start[0])
    assert re.search(r"zeotemp stopped after \d+h\d\dm\d\ds: 1 connection "
                     r"served, 0 commits on 2 storages; all data held in "
                     r"memory is gone", log), log

