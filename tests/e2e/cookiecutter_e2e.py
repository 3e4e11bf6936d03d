#!/usr/bin/env python3
"""Real Zope end to end with instances baked by cookiecutter-zope-instance
(driver of tests/e2e/cookiecutter.sh).

Plone 6 makes its Zope instances with the cookiecutter template
cookiecutter-zope-instance (vendored in tests/e2e/vendor/), which has no
option for a temporary storage and writes no free-form zope.conf text. This
bakes two instances A and B with `cookiecutter --no-input --config-file
instance.yaml`, whose `default_context` uses only the template's own keys:

* the lines of config/cookiecutter-instance.yaml (the ones the README
  shows; only zeotemp's port changed): `zcml_package_includes:
  zeotemp.zoperecover` and `product_config: {zeotemp: {address: ...,
  storage: 1}}`;
* `db_storage: zeo` for the main database, on a stock ZEO server (runzeo,
  FileStorage) that both share;
* `zcml_include_file_location` for a file that loads the test-only
  session views (tests/e2e/zeotemp_e2e_views).

and checks, through HTTP with cookies:

  * the generated zope.conf has the <product-config zeotemp> section and no
    <zodb_db> but the main one (nothing hand-written for /temp_folder);
  * the add-on registered the temporary database from the product-config
    and created the /temp_folder mount point;
  * sessions set through A are read through B and the other way, also
    many at once;
  * after a zeotemp restart both instances serve new sessions by
    themselves (time measured), and sessions cross again;
  * after both Zope instances restart (the mount point now exists in the
    main database), sessions cross again;
  * an unknown key in the product-config stops an instance's startup with
    a message naming it.

Prints PASS/FAIL per check, the times measured, and `N passed, M failed`;
exits 1 on any failure. Every process it starts it stops.
"""

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

from e2e_common import HERE, REPO
from e2e_common import Browser, Instance
from e2e_common import check, cross_instance, log, many_sessions
from e2e_common import prepare, restart_and_recover, run
from e2e_common import short, start_servers

TEMPLATE = HERE / 'vendor' / 'cookiecutter-zope-instance'
INSTANCE_YAML = REPO / 'config' / 'cookiecutter-instance.yaml'


def documented_context(temp_port, extra_product_config=()):
    """The default_context lines of config/cookiecutter-instance.yaml (the
    ones the README shows), zeotemp's port changed; `extra_product_config`
    lines are added to its product_config for zeotemp. Returns (text, the
    top-level keys)."""
    text = INSTANCE_YAML.read_text()
    block = text.split('\ndefault_context:\n', 1)[1]
    block, n = re.subn(r'(?m)^(\s*address:\s*)127\.0\.0\.1:8101\s*$',
                       rf'\g<1>127.0.0.1:{temp_port}', block)
    if n != 1:
        raise RuntimeError(f'no `address: 127.0.0.1:8101` in {INSTANCE_YAML}')
    for line in extra_product_config:
        block = re.sub(r'(?m)^(\s*)(storage:.*)$',
                       lambda m: f'{m.group(1)}{m.group(2)}\n'
                                 f'{m.group(1)}{line}', block, count=1)
    keys = re.findall(r'(?m)^    ([A-Za-z_]+):', block)
    return block.rstrip('\n') + '\n', keys


def yaml_value(value, indent):
    """A small YAML writer for instance.yaml: mappings and scalars (JSON
    strings are YAML strings)."""
    if isinstance(value, dict):
        pad = ' ' * indent
        return ''.join(f'\n{pad}{k}:{yaml_value(v, indent + 4)}'
                       for k, v in value.items())
    if isinstance(value, bool):
        return ' true' if value else ' false'
    if isinstance(value, int):
        return f' {value}'
    return ' ' + json.dumps(str(value))


class BakedZope(Instance):
    """A Zope WSGI instance baked by cookiecutter-zope-instance."""

    event_log_name = 'var/log/event.log'

    def instance_yaml(self, main_port):
        """The test's own default_context keys (the zeotemp ones come from
        config/cookiecutter-instance.yaml); template keys only."""
        return {
            'target': self.home.name,
            'wsgi_listen': f'127.0.0.1:{self.port}',
            'initial_user_name': 'admin',
            'initial_user_password': 'admin-e2e-password',
            'db_storage': 'zeo',
            'db_zeo_server': f'127.0.0.1:{main_port}',
            'db_zeo_name': 'main',
            'db_blob_mode': 'cache',
            'db_zeo_cache_size': '32MB',
            'log_stdout': False,
            'log_file': True,
            'log_file_path': str(self.home / self.event_log_name),
            'access_log_enabled': False,   # its translogger needs Paste
            # the test views (zcml_package_includes is the documented one's)
            'zcml_include_file_location': str(self.home.parent /
                                              'e2e-views.zcml'),
        }

    def bake(self, cookiecutter, template, main_port, documented):
        """Write instance.yaml (the test's keys, then the documented
        ones) and bake; return (ok, detail)."""
        documented_text, documented_keys = documented
        own = self.instance_yaml(main_port)
        work = self.home.parent
        (work / 'e2e-views.zcml').write_text(
            '<configure xmlns="http://namespaces.zope.org/zope">\n'
            '  <include package="zeotemp_e2e_views" />\n</configure>\n')
        config = work / f'{self.name}-instance.yaml'
        config.write_text(
            f'cookiecutters_dir: {json.dumps(str(work / "cookiecutters"))}\n'
            f'replay_dir: {json.dumps(str(work / "replay"))}\n'
            'default_context:' + yaml_value(own, 4) + '\n'
            + documented_text)
        context = dict.fromkeys(list(own) + documented_keys)
        if len(context) != len(own) + len(documented_keys):
            return False, f'a key twice in {config.name}'
        self.context = context
        r = subprocess.run([cookiecutter, '--no-input', '-f',
                            '--config-file', config, '--output-dir', work,
                            template], capture_output=True, text=True,
                           env=self.env)
        self.config = config
        if r.returncode != 0:
            return False, short(r.stdout + r.stderr, 600)
        return True, f'{config.name} -> {self.home.relative_to(work)}/etc'

    def zope_conf(self):
        return (self.home / 'etc' / 'zope.conf').read_text()

    def site_zcml(self):
        return (self.home / 'etc' / 'site.zcml').read_text()

    def dbtab(self):
        return Browser().get(self.port, '/@@e2e-dbtab')


def template_keys(template):
    return set(json.loads((Path(template) / 'cookiecutter.json').read_text()))


def generated_config_check(z, temp_port, template):
    """zope.conf: <product-config zeotemp> with the address; exactly one
    <zodb_db>, the main one on ZEO; nothing for /temp_folder by hand;
    site.zcml includes the add-on; instance.yaml used template keys only."""
    conf, zcml = z.zope_conf(), z.site_zcml()
    problems = []
    unknown = set(z.context) - template_keys(template)
    if unknown:
        problems.append(f'instance.yaml keys not in cookiecutter.json: '
                        f'{sorted(unknown)}')
    section = re.search(r'(?ms)^<product-config zeotemp>\n(.*?)^'
                        r'</product-config>', conf)
    if not section:
        problems.append('no <product-config zeotemp> section')
    else:
        lines = sorted(' '.join(ln.split()) for ln in
                       section.group(1).splitlines() if ln.strip())
        if lines != [f'address 127.0.0.1:{temp_port}', 'storage 1']:
            problems.append(f'product-config lines {lines}')
    dbs = re.findall(r'(?m)^\s*<zodb_db\s+([^>]*)>', conf)
    if dbs != ['main']:
        problems.append(f'<zodb_db> sections: {dbs}')
    for word in ('temp_folder', 'TemporaryContainer', 'clientstorage',
                 '%import ZEO', 'temporary'):
        if word in conf:
            problems.append(f'zope.conf mentions {word!r}')
    if '<zeoclient>' not in conf:
        problems.append('the main database is not a <zeoclient>')
    if '<include package="zeotemp.zoperecover" />' not in zcml:
        problems.append('site.zcml does not include zeotemp.zoperecover')
    if problems:
        return False, '; '.join(problems)
    return True, ('<product-config zeotemp> (address, storage), one '
                  '<zodb_db main> (<zeoclient>), nothing for /temp_folder; '
                  'site.zcml includes zeotemp.zoperecover; instance.yaml '
                  f'uses {len(z.context)} template keys only')


def sessions_cross(a, b, label, args):
    check(f'[{label}] session set through A is read through B',
          *cross_instance(a, b))
    check(f'[{label}] session set through B is read through A',
          *cross_instance(b, a))
    check(f'[{label}] many sessions alternating A/B keep their last write',
          *many_sessions(a, b, args.sessions, args.rounds, args.workers))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--venv', default=REPO / 'target' / 'e2e-venv-zope6',
                   help='the Zope venv (with the add-on installed)')
    p.add_argument('--cookiecutter', default='cookiecutter',
                   help='the cookiecutter command')
    p.add_argument('--template', default=TEMPLATE)
    p.add_argument('--zeotemp', default=REPO / 'target' / 'release' /
                   'zeotemp')
    p.add_argument('--workdir', default=REPO / 'target' /
                   'e2e-cookiecutter-run')
    p.add_argument('--bound', type=float, default=60,
                   help='seconds to wait for a recovery (default 60)')
    p.add_argument('--sessions', type=int, default=40)
    p.add_argument('--rounds', type=int, default=6)
    p.add_argument('--workers', type=int, default=8)
    args = p.parse_args()

    template = Path(args.template).resolve()
    s = prepare(args, f'; template {template}')
    venv, work, env = s.venv, s.work, s.env
    main_port, temp_port = s.main_port, s.temp_port
    zeotemp = s.zeotemp
    a = BakedZope('A', work / 'A', venv, env)
    b = BakedZope('B', work / 'B', venv, env)
    zopes = (a, b)
    documented = documented_context(temp_port)

    # ---- bake ------------------------------------------------------------
    for z in zopes:
        ok = check(f'[bake] cookiecutter bakes instance {z.name}',
                   *z.bake(args.cookiecutter, template, main_port,
                           documented))
        if not ok:
            return
    for z in zopes:
        check(f'[bake] {z.name}: generated zope.conf has only the '
              'product-config for zeotemp',
              *generated_config_check(z, temp_port, template))

    start_servers(s, zopes)

    # ---- run -------------------------------------------------------------
    for z in zopes:
        t = time.monotonic()
        z.start()
        log(f'Zope {z.name} started in {time.monotonic() - t:.1f} s')
    want = '/temp_folder temporary product-config opened'
    for z in zopes:
        st, body = z.dbtab()
        check(f'[product-config] {z.name}: /temp_folder\'s database comes '
              'from <product-config zeotemp>, opened at startup',
              st == 200 and want in body.splitlines(),
              f'{st} {short(body, 200)}')
    line = (f"temporary database 'temporary' at /temp_folder from "
            f'<product-config zeotemp>: ZEO server 127.0.0.1:{temp_port}, '
            'storage 1')
    check('[product-config] both event logs say where the temporary '
          'database comes from', all(line in z.event_log() for z in zopes),
          line)
    st, body = a.status()
    check('[product-config] /temp_folder mount point created at startup',
          st == 200 and 'temp_folder=Temporary_Folder mount_point=yes '
          'addon=yes' in body, f'{st} {short(body)}')
    sessions_cross(a, b, 'product-config', args)

    restart_and_recover(zeotemp, temp_port, zopes, args.bound,
                        'product-config instances',
                        '[zeotemp restarted] both instances serve new '
                        'sessions by themselves',
                        '[zeotemp restarted] sessions from before the '
                        'restart are gone')
    sessions_cross(a, b, 'zeotemp restarted', args)

    log('restarting both Zope instances (the mount point exists now)')
    for z in zopes:
        z.stop()
    for z in zopes:
        z.start()
    st, body = b.status()
    created = sum(z.event_log().count('created the mount point')
                  for z in zopes)
    check('[Zope restarted] /temp_folder is mounted again from the '
          'product-config, not created a second time',
          st == 200 and 'temp_folder=Temporary_Folder mount_point=yes'
          in body and created == 1,
          f'{st} {short(body)}; "created the mount point" {created} time(s) '
          'in the event logs')
    sessions_cross(a, b, 'Zope restarted', args)
    for z in zopes:
        z.stop()

    # ---- a mistake in the product-config --------------------------------
    c = BakedZope('C', work / 'C', venv, env)
    ok, detail = c.bake(args.cookiecutter, template, main_port,
                        documented_context(temp_port, ['sever-sync: on']))
    if check('[bad key] cookiecutter bakes instance C with a typo in the '
             'product-config (sever-sync)', ok, detail):
        c.proc.start()
        deadline = time.monotonic() + 60
        while c.proc.running and time.monotonic() < deadline:
            time.sleep(0.2)
        running = c.proc.running
        c.stop()
        output, events = c.proc.tail(40), c.event_log()
        want = "<product-config zeotemp>: unknown key 'sever-sync'"
        check('[bad key] the instance does not start, and says why',
              not running and want in output and want in events,
              f'{"still running" if running else "exited"}; '
              f'stderr and event log: {want!r}' if want in output
              and want in events else short(output[-600:], 600))


if __name__ == '__main__':
    run(main)
