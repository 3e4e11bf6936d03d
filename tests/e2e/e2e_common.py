"""What the real-Zope end-to-end drivers share (tests/e2e/zope_e2e.py,
tests/e2e/cookiecutter_e2e.py): processes in their own session, stopped at
exit; Zope instances over HTTP; browsers with cookies; the session checks
(across instances, many sessions at once, recovery after a zeotemp
restart, under load); PASS/FAIL lines and the closing `N passed, M failed`.
"""

import concurrent.futures
import http.cookiejar
import os
import shutil
import signal
import socket
import subprocess
import types
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ADDON_TESTS = REPO / 'zope' / 'zeotemp.zoperecover' / 'tests'
sys.path.insert(0, str(REPO / 'tests' / 'python'))

from zeotemp_util import stop_group  # noqa: E402 (the real-client tests' helpers)

T0 = time.monotonic()
PROCS = []      # every process started, stopped at exit
RESULTS = []    # (ok, name, detail)
TIMES = {}      # measurement name -> text


def log(msg):
    print(f'[{time.monotonic() - T0:6.1f}s] {msg}', flush=True)


def check(name, ok, detail=''):
    RESULTS.append((bool(ok), name, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f': {detail}' if detail
                                                     else ''), flush=True)
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Proc:
    """A process in its own session, logging to a file."""

    def __init__(self, name, cmd, logfile, cwd=None, env=None):
        self.name, self.cmd, self.logfile = name, cmd, Path(logfile)
        self.cwd, self.env = cwd, env
        self.popen = None
        self.starts = 0

    def start(self):
        self.starts += 1
        out = open(self.logfile, 'ab')
        out.write(f'=== start {self.starts}: {" ".join(map(str, self.cmd))}\n'
                  .encode())
        out.flush()
        self.popen = subprocess.Popen(
            [str(c) for c in self.cmd], cwd=self.cwd, env=self.env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
        out.close()
        if self not in PROCS:
            PROCS.append(self)
        return self

    @property
    def running(self):
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout=20):
        """SIGTERM its process group, then SIGKILL after ``timeout``."""
        if self.popen is None:
            return
        stop_group(self.popen, timeout)
        self.popen = None

    def tail(self, n=25):
        try:
            lines = self.logfile.read_text(errors='replace').splitlines()
        except OSError:
            return ''
        return '\n'.join(lines[-n:])


def wait_port(proc, port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running:
            raise RuntimeError(f'{proc.name} exited:\n{proc.tail()}')
        try:
            with socket.create_connection(('127.0.0.1', port), 0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f'{proc.name} not listening on {port} after '
                       f'{timeout} s:\n{proc.tail()}')


class Browser:
    """One HTTP client with its own cookie jar (one browser, one session).

    Cookies are per host, not per port, so the session cookie set through
    one instance goes to the other, as behind a load balancer."""

    def __init__(self):
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, port, path, timeout=30, **params):
        url = f'http://127.0.0.1:{port}{path}'
        if params:
            url += '?' + urllib.parse.urlencode(params)
        try:
            with self.opener.open(url, timeout=timeout) as r:
                return r.status, r.read().decode('utf-8', 'replace')
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode('utf-8', 'replace')
        except (OSError, urllib.error.URLError) as e:
            return 0, f'{type(e).__name__}: {e}'


def short(text, n=120):
    text = ' '.join(text.split())
    return text if len(text) <= n else text[:n] + '...'


class Instance:
    """A Zope WSGI instance run by ``runwsgi`` with its ``zope.ini``
    (waitress on 127.0.0.1:``port``); how it is made is the driver's."""

    event_log_name = 'var/log/event.log'

    def __init__(self, name, home, venv, env, ini='etc/zope.ini'):
        self.name, self.home, self.venv = name, Path(home), Path(venv)
        self.port = free_port()
        self.env = env
        self.proc = Proc(f'Zope {name}',
                         [self.venv / 'bin' / 'runwsgi', self.home / ini],
                         self.home / 'runwsgi.log', cwd=self.home, env=env)

    def start(self, timeout=120):
        self.proc.start()
        wait_port(self.proc, self.port, timeout)

    def stop(self):
        self.proc.stop()

    def status(self):
        return Browser().get(self.port, '/@@e2e-status')

    def event_log(self):
        try:
            return (self.home / self.event_log_name).read_text(
                errors='replace')
        except OSError:
            return ''


# -- session operations through HTTP -------------------------------------

def session_set(browser, zope, key, value, timeout=30):
    st, body = browser.get(zope.port, '/@@e2e-session-set', timeout,
                           key=key, value=value)
    return st == 200 and body == 'OK ' + value, f'{st} {short(body)}'


def session_get(browser, zope, key, timeout=30):
    """The value, 'MISSING', or None on an error; and the response."""
    st, body = browser.get(zope.port, '/@@e2e-session-get', timeout,
                           key=key)
    if st == 200 and body.startswith('VALUE '):
        return body[6:], f'{st} {short(body)}'
    if st == 200 and body == 'MISSING':
        return 'MISSING', f'{st} {body}'
    return None, f'{st} {short(body)}'


def cross_instance(a, b):
    """A new session's value set through a is read through b."""
    br = Browser()
    value = f'from-{a.name}-{time.time_ns()}'
    ok, resp = session_set(br, a, 'k', value)
    if not ok:
        return False, f'set through {a.name}: {resp}'
    got, resp = session_get(br, b, 'k')
    if got != value:
        return False, f'set {value!r} through {a.name}, {b.name} answered {resp}'
    return True, f'set through {a.name}, read through {b.name}'


def many_sessions(a, b, sessions, rounds, workers):
    """Each session: `rounds` writes alternating between a and b, each read
    back through the other instance; at the end both instances must return
    the last write. Sessions run concurrently (`workers` threads)."""
    pair = (a, b)

    def one(i):
        br = Browser()
        errors = []
        last = None
        for r in range(rounds):
            w, rd = pair[(i + r) % 2], pair[(i + r + 1) % 2]
            value = f's{i}-r{r}'
            ok, resp = session_set(br, w, 'v', value)
            if not ok:
                errors.append(f'session {i} round {r}: set through {w.name}: '
                              f'{resp}')
                continue
            last = value
            got, resp = session_get(br, rd, 'v')
            if got != value:
                errors.append(f'session {i} round {r}: wrote {value} through '
                              f'{w.name}, {rd.name} answered {resp}')
        for z in pair:
            got, resp = session_get(br, z, 'v')
            if last is None or got != last:
                errors.append(f'session {i} at the end: last write {last}, '
                              f'{z.name} answered {resp}')
        return errors

    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        errors = [e for errs in ex.map(one, range(sessions)) for e in errs]
    elapsed = time.monotonic() - t
    requests = sessions * (2 * rounds + 2)
    detail = (f'{sessions} sessions x {rounds} alternating writes, '
              f'{workers} at once: {requests} requests in {elapsed:.1f} s, '
              f'{len(errors)} wrong')
    if errors:
        detail += '; first: ' + '; '.join(errors[:3])
    return not errors, detail


def serves_sessions(z):
    """A new session set through z is read back through z."""
    br = Browser()
    value = f'probe-{time.time_ns()}'
    ok, resp = session_set(br, z, 'p', value, timeout=10)
    if not ok:
        return False, resp
    got, resp = session_get(br, z, 'p', timeout=10)
    return got == value, resp


def wait_serving(zopes, since, bound, interval=0.5):
    """Poll until every instance serves new sessions by itself; return
    {name: seconds since `since`} for those that did within `bound`, and the
    last failure of the others."""
    recovered, last = {}, {}
    errors = {z.name: 0 for z in zopes}
    while True:
        for z in zopes:
            if z.name in recovered:
                continue
            ok, resp = serves_sessions(z)
            if ok:
                recovered[z.name] = time.monotonic() - since
            else:
                errors[z.name] += 1
                last[z.name] = resp
        if len(recovered) == len(zopes) or time.monotonic() - since > bound:
            return recovered, last, errors
        time.sleep(interval)


class Load:
    """Browsers that keep starting new sessions (set, then read back through
    the other instance) until stopped: requests in flight while zeotemp
    restarts."""

    def __init__(self, zopes, threads):
        self.zopes, self.stopping = zopes, threading.Event()
        self.ok = self.failed = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,),
                                         daemon=True) for i in range(threads)]

    def run(self, i):
        n = 0
        while not self.stopping.is_set():
            a, b = self.zopes[(i + n) % 2], self.zopes[(i + n + 1) % 2]
            n += 1
            ok, _ = cross_instance(a, b)
            with self.lock:
                if ok:
                    self.ok += 1
                else:
                    self.failed += 1
            time.sleep(0.02)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.threads:
            t.join(60)


def restart_zeotemp(zeotemp, port):
    """SIGTERM zeotemp, start it again on the same port; return the moment
    it listens again and how long it was down."""
    t = time.monotonic()
    zeotemp.stop()
    zeotemp.start()
    wait_port(zeotemp, port, 30)
    up = time.monotonic()
    return up, up - t


def prepare(args, note=''):
    """What both drivers start from: the venv (``--venv``), a fresh work
    directory (``--workdir``), the environment of the processes they start,
    the add-on's unit tests, and (not started yet) a stock ZEO server for
    the main database and zeotemp (``--zeotemp``) on free ports."""
    venv = Path(args.venv).resolve()
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(HERE), NO_COLOR='1')
    env.pop('PYTHONHOME', None)

    log(f'work directory {work}{note}')
    check('add-on unit tests', *run_addon_tests(venv))

    main_port, temp_port = free_port(), free_port()
    runzeo = Proc('runzeo (main)', [venv / 'bin' / 'runzeo', '-a',
                                    f'127.0.0.1:{main_port}', '-f',
                                    work / 'Data.fs'],
                  work / 'runzeo.log', cwd=work, env=env)
    zeotemp = Proc('zeotemp', [Path(args.zeotemp).resolve(), '--address',
                               f'127.0.0.1:{temp_port}', '--storage', '1'],
                   work / 'zeotemp.log', cwd=work, env=env)
    return types.SimpleNamespace(venv=venv, work=work, env=env,
                                 main_port=main_port, temp_port=temp_port,
                                 runzeo=runzeo, zeotemp=zeotemp)


def start_servers(s, zopes):
    """Starts what ``prepare`` made (runzeo, then zeotemp) and waits until
    both listen."""
    s.runzeo.start()
    wait_port(s.runzeo, s.main_port, 60)
    s.zeotemp.start()
    wait_port(s.zeotemp, s.temp_port, 30)
    a, b = zopes
    log(f'runzeo on {s.main_port}, zeotemp on {s.temp_port}; '
        f'Zope A on {a.port}, B on {b.port}')


def restart_and_recover(zeotemp, temp_port, zopes, bound, label,
                        serve_check, gone_check):
    """Restarts zeotemp under ``zopes`` (a session written through the first
    before), and checks that each serves new sessions again by itself within
    ``bound`` seconds (``serve_check``; the times go to ``TIMES[label]``) and
    that the session from before is gone (``gone_check``)."""
    a, b = zopes[0], zopes[-1]
    old = Browser()
    session_set(old, a, 'old', 'before-restart')
    log('restarting zeotemp')
    up, down = restart_zeotemp(zeotemp, temp_port)
    recovered, last, _errors = wait_serving(zopes, up, bound)
    times = ', '.join(f'{n} {s:.1f} s' for n, s in sorted(recovered.items()))
    ok = len(recovered) == len(zopes)
    TIMES[label] = (
        f'{times} after zeotemp listened again (down {down:.1f} s)'
        if ok else f'not within {bound:.0f} s ({times or "none"})')
    check(serve_check, ok, TIMES[label] + ('' if ok else f'; last: {last}'))
    got, resp = session_get(old, b, 'old')
    check(gone_check, got == 'MISSING', resp)


def zope_version(venv):
    """The version of Zope installed in ``venv``."""
    r = subprocess.run([Path(venv) / 'bin' / 'python', '-c',
                        'import importlib.metadata as m; '
                        'print(m.version("Zope"))'],
                       capture_output=True, text=True)
    return r.stdout.strip() or '?'


def run_addon_tests(venv):
    r = subprocess.run([Path(venv) / 'bin' / 'python', '-m', 'pytest', '-q',
                        '-p', 'no:cacheprovider', str(ADDON_TESTS)],
                       capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else r.stderr.strip()[-200:]
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-2000:], sep='\n')
    return r.returncode == 0, f'pytest {ADDON_TESTS.relative_to(REPO)}: ' \
                              f'{summary}'


def stop_all():
    for proc in reversed(PROCS):
        try:
            proc.stop()
        except Exception as e:  # keep stopping the others
            print(f'stopping {proc.name}: {e}', file=sys.stderr)


def on_signal(signum, frame):
    raise SystemExit(128 + signum)


def run(main):
    """Run ``main()``; stop every process started, also on an error, Ctrl-C
    or SIGTERM; print the times, the totals, and exit 1 on any failure."""
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    error = None
    try:
        main()
    except BaseException as e:  # errors, Ctrl-C, SIGTERM (SystemExit)
        error = e
        import traceback
        traceback.print_exc()
    finally:
        stop_all()
    if error is not None:
        check('the run finished', False, f'{type(error).__name__}: '
                                         f'{short(str(error), 400)}')
    for name, text in TIMES.items():
        print(f'recovery {name}: {text}')
    passed = sum(1 for ok, _, _ in RESULTS if ok)
    failed = len(RESULTS) - passed
    print(f'total {time.monotonic() - T0:.0f} s')
    print(f'{passed} passed, {failed} failed')
    sys.exit(1 if failed else 0)
