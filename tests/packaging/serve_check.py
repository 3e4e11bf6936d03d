#!/usr/bin/env python3
"""Start an installed zeotemp, check that it speaks ZEO, stop it.

Usage: serve_check.py PATH-TO-ZEOTEMP

Runs the binary on a free loopback port, connects, reads the server's
first message (a 4-byte big-endian length and the protocol, b'Z5'), then
sends SIGTERM and expects exit status 0 within 15 s. Standard library only,
so it runs with any Python 3 (tests/packaging/wheel.sh uses it for the
binary from the sdist, in a venv with nothing else). Exits 1 on failure.
"""

import signal
import socket
import struct
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def recv_exact(sock, n):
    data = b''
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f'closed after {len(data)} of {n} bytes')
        data += chunk
    return data


def main():
    binary = sys.argv[1]
    port = free_port()
    proc = subprocess.Popen([binary, '--address', f'127.0.0.1:{port}'],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f'exited with {proc.returncode} before '
                                   'listening')
            try:
                sock = socket.create_connection(('127.0.0.1', port), 0.5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f'not listening on {port} after 15 s')
                time.sleep(0.1)
        with sock:
            sock.settimeout(5)
            (length,) = struct.unpack('>I', recv_exact(sock, 4))
            hello = recv_exact(sock, length)
        if hello != b'Z5':
            raise RuntimeError(f'first message {hello!r}, expected b"Z5"')
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(15)
        if status != 0:
            raise RuntimeError(f'exit status {status} after SIGTERM')
    except Exception as e:  # report, with the server's log
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0].decode(errors='replace')
        print(f'FAIL {binary}: {e}\n{out[-2000:]}')
        return 1
    out = proc.communicate()[0].decode(errors='replace').splitlines()
    print(f'{binary}: listened on 127.0.0.1:{port}, sent {hello!r}, '
          f'stopped with status 0 on SIGTERM'
          + (f' ({out[-1].strip()})' if out else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
