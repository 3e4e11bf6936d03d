"""TLS (tls-certificate, tls-key, tls-client-ca) with the stock ZEO client:
``ClientStorage(ssl=SSLContext)``, and ZEO's ``<clientstorage>`` ``<ssl>``
section loaded with ZConfig (config/zope-temp-tls.conf).

Certificates are made at test time with the ``openssl`` command: a CA, a
server certificate it signs (for ``127.0.0.1``, ``localhost`` and
``zeotemp.internal``), a client certificate it signs, and a second CA with a
client certificate of its own that zeotemp must refuse.

With ``ZEOTEMP_TEST_SERVER=python`` the stock server gets the same files in
an ``<ssl>`` section of its zeo.conf; it always requires client certificates
(``authenticate`` is mandatory there), so the tests of TLS without client
certificates, and the checks of zeotemp's log lines, run on zeotemp only.
"""

import io
import pathlib
import shutil
import socket
import ssl
import struct
import subprocess
import time

import pytest
import transaction
import ZConfig
import ZODB
import ZODB.config
from ZEO.Exceptions import ClientDisconnected

from conftest import Server, ZEOTEMP_BIN
from zeotemp_util import IS_PYTHON, IS_ZEOTEMP, wait_until

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "config"

# The name in the server certificate that the zope.conf example uses.
SERVER_NAME = "zeotemp.internal"

OPENSSL_CNF = f"""\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:{SERVER_NAME}, DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class Certs:
    """Paths of the throwaway PEM files (``<name>.pem``, ``<name>-key.pem``)."""

    def __init__(self, directory):
        self.dir = directory

    def cert(self, name):
        return str(self.dir / f"{name}.pem")

    def key(self, name):
        return str(self.dir / f"{name}-key.pem")


def _openssl(*args, cwd):
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed to make test certificates"
    subprocess.run([openssl, *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    (d / "openssl.cnf").write_text(OPENSSL_CNF)
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def ca(name):
        _openssl("req", "-x509", "-new", *newkey, "-keyout", f"{name}-key.pem",
                 "-out", f"{name}.pem", "-days", "3", "-config", "openssl.cnf",
                 "-extensions", "ca", "-subj", f"/CN=zeotemp test {name}",
                 cwd=d)

    def leaf(name, ca_name, ext):
        _openssl("req", "-new", *newkey, "-keyout", f"{name}-key.pem",
                 "-out", f"{name}.csr", "-config", "openssl.cnf",
                 "-subj", f"/CN=zeotemp test {name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca_name}.pem",
                 "-CAkey", f"{ca_name}-key.pem", "-set_serial",
                 str(abs(hash(name)) % 10**9 + 1), "-days", "2",
                 "-extfile", "openssl.cnf", "-extensions", ext,
                 "-out", f"{name}.pem", cwd=d)

    ca("ca")
    leaf("server", "ca", "server")
    leaf("client", "ca", "client")
    ca("other-ca")
    leaf("other-client", "other-ca", "client")
    return Certs(d)


class TLSServer(Server):
    """conftest's Server; on the python backend its zeo.conf gets an
    ``<ssl>`` section with the same files."""

    ssl_section = ""

    def _python_cmd(self):
        cmd = super()._python_cmd()
        conf = self.workdir / "zeo.conf"
        conf.write_text(conf.read_text().replace(
            "</zeo>", self.ssl_section + "</zeo>", 1))
        return cmd


@pytest.fixture
def tls_server(request, tmp_path, certs, server_factory):
    """``tls_server(client_ca=False, unix_socket=None, zeotemp_args=())``:
    a started server with the test server certificate; ``client_ca=True``
    requires client certificates signed by the test CA. Stopped (and its
    log shown on failure) with server_factory's servers."""
    servers = request.node._zeotemp_servers

    def start(client_ca=False, unix_socket=None, zeotemp_args=()):
        if IS_PYTHON and not client_ca:
            pytest.skip("the stock server's <ssl> requires authenticate "
                        "(client certificates)")
        args = ["--tls-certificate", certs.cert("server"),
                "--tls-key", certs.key("server")]
        if client_ca:
            args += ["--tls-client-ca", certs.cert("ca")]
        srv = TLSServer(tmp_path / f"tls-server{len(servers) + 1}",
                        unix_socket=unix_socket,
                        zeotemp_args=[*args, *zeotemp_args])
        srv.ssl_section = (
            f"  <ssl>\n    certificate {certs.cert('server')}\n"
            f"    key {certs.key('server')}\n"
            f"    authenticate {certs.cert('ca')}\n  </ssl>\n")
        servers.append(srv)
        return srv.start()

    return start


def client_context(certs, client=None, maximum_version=None):
    """What a stock client builds: trust the test CA, check the host name;
    ``client`` names the certificate to present (``client`` or
    ``other-client``)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                      cafile=certs.cert("ca"))
    if client:
        ctx.load_cert_chain(certs.cert(client), certs.key(client))
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    return ctx


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_frame(sock):
    (size,) = struct.unpack(">I", recv_exact(sock, 4))
    return recv_exact(sock, size)


def read_until_closed(sock, timeout):
    """Everything the server sends until it closes the connection; fails if
    it is still open after ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data
    except socket.timeout:
        pytest.fail(f"connection still open after {timeout}s "
                    f"(received {data[:40]!r})")


def log_has(srv, text, timeout=10):
    if IS_ZEOTEMP:
        wait_until(lambda: text in srv.log_text(), timeout,
                   message=f"{text!r} in the server log")


def commit_and_read_back(db, key, value):
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tm.begin()
    conn.root()[key] = value
    tm.commit()
    tm.begin()
    assert conn.root()[key] == value
    conn.close()


# -- TLS on the wire -------------------------------------------------------------

@pytest.mark.parametrize("version", [None, ssl.TLSVersion.TLSv1_2],
                         ids=["newest", "tls1.2"])
def test_server_speaks_z5_after_the_handshake(tls_server, certs, version):
    srv = tls_server()
    ctx = client_context(certs, maximum_version=version)
    with socket.create_connection(srv.address, timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() == ("TLSv1.2" if version else "TLSv1.3")
            assert read_frame(s) == b"Z5"
            # ruok through TLS: the handshake reply is the status.
            s.sendall(struct.pack(">I", 4) + b"ruok")
            assert b'"1"' in read_frame(s)


def test_listening_line_says_tls(tls_server):
    srv = tls_server(client_ca=True)
    log_has(srv, "listening on tcp 127.0.0.1:"
                 f"{srv.address[1]} (TLS, client certificate required)")


# -- ClientStorage(ssl=...) -------------------------------------------------------

def test_clientstorage_commits_reads_and_gets_invalidations(
        tls_server, certs, make_db):
    srv = tls_server()
    db_a = make_db(srv, ssl=client_context(certs))
    db_b = make_db(srv, ssl=client_context(certs))
    tm_a, tm_b = transaction.TransactionManager(), transaction.TransactionManager()
    conn_a = db_a.open(transaction_manager=tm_a)
    conn_b = db_b.open(transaction_manager=tm_b)
    tm_a.begin()
    conn_a.root()["session"] = {"user": "alice", "n": 1}
    tm_a.commit()

    def b_sees(n):
        tm_b.begin()
        return conn_b.root().get("session", {}).get("n") == n

    # B has no server-sync: it sees A's commits only through invalidations
    # pushed over its own TLS connection.
    wait_until(lambda: b_sees(1), 10, message="B sees the first commit")
    tm_a.begin()
    conn_a.root()["session"] = {"user": "alice", "n": 2}
    tm_a.commit()
    wait_until(lambda: b_sees(2), 10, message="B invalidated by A's commit")
    assert conn_b.root()["session"] == {"user": "alice", "n": 2}
    conn_a.close()
    conn_b.close()


def test_clientstorage_over_tls12(tls_server, certs, make_db):
    srv = tls_server()
    db = make_db(srv, ssl=client_context(
        certs, maximum_version=ssl.TLSVersion.TLSv1_2))
    commit_and_read_back(db, "k", "over TLS 1.2")


def test_plain_client_is_closed_and_others_go_on(tls_server, certs, make_db,
                                                 make_storage):
    srv = tls_server(zeotemp_args=["--frame-timeout", "2"])
    good = make_db(srv, ssl=client_context(certs))
    commit_and_read_back(good, "before", 1)

    # A raw client that speaks plain ZEO bytes fails the handshake at once.
    with socket.create_connection(srv.address, timeout=10) as raw:
        raw.sendall(struct.pack(">I", 2) + b"Z5")
        got = read_until_closed(raw, 10)
        assert b"Z5" not in got
    log_has(srv, "TLS handshake failed")

    # The stock client without ssl waits for the server's protocol frame,
    # which never comes in plain text; zeotemp drops it after frame-timeout.
    with pytest.raises(ClientDisconnected):
        make_storage(srv, wait_timeout=3)
    log_has(srv, "TLS handshake failed: not completed within frame-timeout")
    commit_and_read_back(good, "after", 2)


def test_silent_handshakers_block_neither_accepts_nor_others(
        tls_server, certs, make_db):
    # Connections that never finish (or start) their TLS handshake are
    # served by their own tasks: a new client connects and commits at once.
    srv = tls_server()
    silent = [socket.create_connection(srv.address, timeout=10)
              for _ in range(20)]
    try:
        silent[0].sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello's header
        started = time.monotonic()
        db = make_db(srv, ssl=client_context(certs))
        commit_and_read_back(db, "k", "v")
        assert time.monotonic() - started < 10
    finally:
        for s in silent:
            s.close()


def test_quick_close_does_not_kill_server(tls_server, certs, make_db):
    # ZEO's testZEO.quick_close_doesnt_kill_server: connections reset right
    # after connecting (SO_LINGER 0) must not hurt the TLS server.
    srv = tls_server(client_ca=True)
    for _ in range(5):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                     struct.pack("ii", 1, 0))
        s.connect(srv.address)
        s.close()
    db = make_db(srv, ssl=client_context(certs, client="client"))
    assert db.storage.is_connected()
    commit_and_read_back(db, "k", "v")


@pytest.mark.zeotemp_only(reason="max-connections is zeotemp's")
def test_connections_in_the_handshake_count_toward_max_connections(
        tls_server, certs):
    srv = tls_server(zeotemp_args=["--max-connections", "2"])
    ctx = client_context(certs)
    silent = [socket.create_connection(srv.address, timeout=10)
              for _ in range(2)]
    try:
        # Both slots are taken by connections still in their handshake
        # (once their tasks run).
        time.sleep(0.5)
        with socket.create_connection(srv.address, timeout=10) as raw:
            with pytest.raises((ssl.SSLError, OSError, EOFError)):
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    read_frame(s)
        log_has(srv, "max-connections reached")
    finally:
        for s in silent:
            s.close()
    # They close in their handshake, the count drops, a client gets in.

    def connects():
        try:
            with socket.create_connection(srv.address, timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    return read_frame(s) == b"Z5"
        except (ssl.SSLError, OSError, EOFError):
            return False
    wait_until(connects, 10, message="a slot frees up")


# -- client certificates (tls-client-ca) ---------------------------------------------

def test_client_certificate_from_the_ca_is_accepted(tls_server, certs, make_db):
    srv = tls_server(client_ca=True)
    db = make_db(srv, ssl=client_context(certs, client="client"))
    commit_and_read_back(db, "k", "authenticated")


@pytest.mark.parametrize("client", [None, "other-client"],
                         ids=["no-certificate", "other-ca"])
def test_client_without_a_good_certificate_is_refused(
        tls_server, certs, make_db, make_storage, client):
    srv = tls_server(client_ca=True)
    good = make_db(srv, ssl=client_context(certs, client="client"))
    commit_and_read_back(good, "before", 1)

    with pytest.raises(ClientDisconnected):
        make_storage(srv, ssl=client_context(certs, client=client),
                     wait_timeout=3)
    if IS_ZEOTEMP:
        # With TLS 1.3 the stock client sees its handshake complete before
        # the server refuses its certificate, and reconnects at once; the
        # retry delay (1 s per address) keeps that to a few attempts, not
        # hundreds a second.
        attempts = srv.log_text().count("TLS handshake failed")
        assert 1 <= attempts <= 6, attempts
    # The same at the socket level: no protocol frame, the server closes.
    with socket.create_connection(srv.address, timeout=10) as raw:
        with pytest.raises((ssl.SSLError, OSError, EOFError)):
            with client_context(certs, client=client).wrap_socket(
                    raw, server_hostname="127.0.0.1") as s:
                s.settimeout(10)
                read_frame(s)
    if client is None:
        log_has(srv, "TLS handshake failed: peer sent no certificates")
    else:
        log_has(srv, "TLS handshake failed: invalid peer certificate")
    commit_and_read_back(good, "after", 2)


def test_tls_applies_to_unix_sockets(tls_server, certs, tmp_path):
    # As the stock server does (every listener gets its SSL context).
    # ClientStorage cannot use TLS over a unix socket (it gives asyncio no
    # server_hostname), so this speaks to the socket directly.
    path = str(tmp_path / "zeo.sock")
    srv = tls_server(client_ca=True, unix_socket=path)
    ctx = client_context(certs, client="client")
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(10)
        raw.connect(path)
        with ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as s:
            assert read_frame(s) == b"Z5"
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(10)
        raw.connect(path)
        raw.sendall(struct.pack(">I", 2) + b"Z5")
        assert b"Z5" not in read_until_closed(raw, 10)
    log_has(srv, "TLS handshake failed")
    log_has(srv, "which the stock ZEO client cannot use over a unix socket")


# -- ZConfig: ZEO's <clientstorage> <ssl> section -------------------------------------

from zeotemp_util import ZOPE_SCHEMA as SCHEMA  # noqa: E402


def test_zope_conf_tls_stanza(tls_server, certs, make_db):
    """config/zope-temp-tls.conf, loaded whole as Zope loads zope.conf, with
    the test's files and port, against a server requiring client
    certificates."""
    srv = tls_server(client_ca=True)
    text = (CONFIG_DIR / "zope-temp-tls.conf").read_text()
    for example, real in [
            ("zeotemp.internal:8101", f"127.0.0.1:{srv.address[1]}"),
            ("/etc/zope/tls/zeotemp-ca.pem", certs.cert("ca")),
            ("/etc/zope/tls/zope-client-key.pem", certs.key("client")),
            ("/etc/zope/tls/zope-client.pem", certs.cert("client"))]:
        assert example in text
        text = text.replace(example, real)
    assert f"server-hostname {SERVER_NAME}" in text
    schema = ZConfig.loadSchemaFile(io.StringIO(SCHEMA))
    conf, _ = ZConfig.loadConfigFile(schema, io.StringIO(text))
    (db_conf,) = conf.databases
    assert db_conf.config.mount_points == ["/temp_folder"]
    storage = db_conf.config.storage.open()
    db = ZODB.DB(storage)
    try:
        commit_and_read_back(db, "session", {"user": "bob"})
    finally:
        db.close()
    # Another client sees it.
    other = make_db(srv, ssl=client_context(certs, client="client"))
    tm = transaction.TransactionManager()
    conn = other.open(transaction_manager=tm)
    tm.begin()
    assert conn.root()["session"] == {"user": "bob"}
    conn.close()


def clientstorage_config(port, ssl_lines):
    return f"""
        %import ZEO
        <clientstorage>
          server 127.0.0.1:{port}
          wait-timeout 3
          <ssl>
            {ssl_lines}
          </ssl>
        </clientstorage>
        """


@pytest.mark.parametrize("hostname_lines, works", [
    # check-hostname on (the default), name from the address: 127.0.0.1
    # is in the certificate.
    ("", True),
    (f"server-hostname {SERVER_NAME}", True),
    ("server-hostname wrong.example", False),
    ("server-hostname wrong.example\ncheck-hostname false", True),
], ids=["address", "server-hostname", "wrong-name", "check-hostname-off"])
def test_zodb_config_ssl_section(tls_server, certs, hostname_lines, works):
    srv = tls_server(client_ca=True)
    ssl_lines = "\n".join([
        f"authenticate {certs.cert('ca')}",
        f"certificate {certs.cert('client')}",
        f"key {certs.key('client')}",
        hostname_lines])
    conf = clientstorage_config(srv.address[1], ssl_lines)
    if not works:
        with pytest.raises(ClientDisconnected):
            ZODB.config.storageFromString(conf)
        return
    db = ZODB.DB(ZODB.config.storageFromString(conf))
    try:
        commit_and_read_back(db, "k", hostname_lines)
    finally:
        db.close()


def test_zodb_config_other_ca_client_refused(tls_server, certs):
    srv = tls_server(client_ca=True)
    conf = clientstorage_config(srv.address[1], "\n".join([
        f"authenticate {certs.cert('ca')}",
        f"certificate {certs.cert('other-client')}",
        f"key {certs.key('other-client')}"]))
    with pytest.raises(ClientDisconnected):
        ZODB.config.storageFromString(conf)
    log_has(srv, "TLS handshake failed: invalid peer certificate")


# -- startup -----------------------------------------------------------------------

@pytest.mark.skipif(not IS_ZEOTEMP, reason="zeotemp's command line")
@pytest.mark.parametrize("files, message", [
    (("missing", "server-key", None), "tls-certificate {missing}: cannot read"),
    (("server", "client-key", None), "does not belong to the certificate"),
    (("server", "server", None), "tls-key {server}: no private key"),
    (("server", "server-key", "server-key"), "tls-client-ca {server-key}: "
                                             "no certificate"),
    (("server", None, None), "tls-certificate needs tls-key"),
    ((None, None, "ca"), "tls-client-ca needs tls-certificate"),
], ids=["missing-file", "wrong-key", "not-a-key", "ca-not-a-cert",
        "cert-without-key", "ca-without-cert"])
def test_bad_tls_settings_stop_startup(certs, tmp_path, files, message):
    def path(name):
        if name == "missing":
            return str(tmp_path / "missing.pem")
        return certs.key(name[:-4]) if name.endswith("-key") else certs.cert(name)

    cert, key, ca = files
    args = [str(ZEOTEMP_BIN), "--address", "127.0.0.1:0"]
    for flag, name in [("--tls-certificate", cert), ("--tls-key", key),
                       ("--tls-client-ca", ca)]:
        if name:
            args += [flag, path(name)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    want = message.format(**{n: path(n) for n in
                             ("missing", "server", "server-key")})
    assert want in proc.stderr
    assert "listening" not in proc.stderr
