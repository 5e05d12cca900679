// The twin's systemd unit files, parsed: each carries the runbook's safety defaults, the deploy
// conventions of CONTRACT section 8, and an ExecStart that points at a script the twin really has.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { TWIN_ROOT } from './helpers/proc.js';

const ROOT = '/home/deploy/quantlab-backend';

/**
 * Parse a unit file: {section: {key: [values]}}, joining backslash continuations as systemd does.
 * @param {string} text
 */
function parseUnit(text) {
  const units = {};
  let section = null;
  const logical = text.replace(/\\\r?\n/g, ' ').split(/\r?\n/);
  for (const raw of logical) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[([^\]]+)\]$/.exec(line);
    if (header) {
      section = header[1];
      units[section] ??= {};
      continue;
    }
    const eq = line.indexOf('=');
    assert.ok(section && eq > 0, `not a unit file line: ${line}`);
    const key = line.slice(0, eq).trim();
    const value = line.slice(eq + 1).trim().replace(/\s+/g, ' ');
    (units[section][key] ??= []).push(value);
  }
  return units;
}

/** The one value of a key (the last, as systemd keeps for single-valued settings). */
function one(unit, section, key) {
  const values = unit[section]?.[key];
  assert.ok(values, `${key}= missing from [${section}]`);
  return values[values.length - 1];
}

const SERVICES = {
  'ops/systemd/quantlab-replayd.service': {
    env: 'replayd.env', cwd: `${ROOT}/services/replayd`,
    exec: `/usr/bin/node ${ROOT}/services/replayd/server.js`,
    script: 'services/replayd/server.js',
  },
  'ops/systemd/quantlab-worker.service': {
    env: 'worker.env', cwd: ROOT,
    exec: '/usr/bin/env node core/worker/job_worker.js --poll_ms 2000 --max_retries 3 --backoff_ms 2000',
    script: 'core/worker/job_worker.js',
    extra: { LimitNOFILE: '104857' },
  },
  'ops/systemd/quantlab-console-ui.service': {
    env: 'console.env', cwd: `${ROOT}/console-ui`, exec: '/usr/bin/env npm run start', script: 'console-ui/server.js',
  },
  'ops/systemd/quantlab-live.service': {
    env: 'live.env', cwd: ROOT,
    exec: `/usr/bin/node ${ROOT}/tools/run-live.js --exchange binance --symbols BTCUSDT,ETHUSDT ` +
      `--strategy ${ROOT}/strategies/canary-strategy.js --dataset-parquet live --dataset-meta live`,
    script: 'tools/run-live.js',
  },
  'core/observer-api/quantlab-observer.service': {
    env: 'observer.env', cwd: ROOT, exec: `/usr/bin/node ${ROOT}/core/observer/index.js`, script: 'core/observer/index.js',
  },
  'core/compressor/quantlab-compact.service': {
    env: 'compact.env', cwd: ROOT, exec: `/usr/bin/python3 ${ROOT}/core/compressor/run.py --mode daily`,
    script: 'core/compressor/run.py', type: 'oneshot',
  },
};

// The runbook's "Safety Defaults (systemd + limits)", written exactly as it writes them.
const SAFETY_UNIT = { StartLimitIntervalSec: '60s', StartLimitBurst: '5' };
const SAFETY_SERVICE = { Restart: 'on-failure', RestartSec: '5s', MemoryMax: '2G', CPUQuota: '80%', TimeoutStopSec: '20s' };

function readUnit(rel) {
  return parseUnit(fs.readFileSync(path.join(TWIN_ROOT, rel), 'utf8'));
}

for (const [rel, want] of Object.entries(SERVICES)) {
  test(`${rel} carries the runbook's safety defaults and the deploy conventions`, () => {
    const unit = readUnit(rel);
    assert.ok(one(unit, 'Unit', 'Description').length > 0);
    assert.equal(one(unit, 'Unit', 'After'), 'network-online.target');
    for (const [key, value] of Object.entries(SAFETY_UNIT)) {
      assert.equal(one(unit, 'Unit', key), value, `[Unit] ${key}`);
      assert.equal(unit.Service[key], undefined, `${key} belongs in [Unit], where systemd reads it`);
    }
    for (const [key, value] of Object.entries({ ...SAFETY_SERVICE, ...want.extra })) {
      assert.equal(one(unit, 'Service', key), value, `[Service] ${key}`);
    }
    assert.equal(one(unit, 'Service', 'Type'), want.type || 'simple');
    assert.equal(one(unit, 'Service', 'User'), 'deploy');
    assert.equal(one(unit, 'Service', 'WorkingDirectory'), want.cwd);
    assert.equal(one(unit, 'Service', 'EnvironmentFile'), `/etc/quantlab/${want.env}`);
    assert.equal(one(unit, 'Service', 'ExecStart'), want.exec);
    assert.equal(one(unit, 'Install', 'WantedBy'), 'multi-user.target');
    assert.ok(fs.existsSync(path.join(TWIN_ROOT, want.script)), `${want.script} (started by ${rel}) is missing from the twin`);
  });
}

test('the observer unit runs the 9150 observer, as the runbook expects', () => {
  const unit = readUnit('core/observer-api/quantlab-observer.service');
  assert.ok(unit.Service.Environment.includes('OBSERVER_PORT=9150'));
});

test('unit files use the real-world forms: a line continuation and a quoted Environment with a space', () => {
  const texts = Object.keys(SERVICES).map((rel) => fs.readFileSync(path.join(TWIN_ROOT, rel), 'utf8'));
  assert.ok(texts.some((t) => /\\\n/.test(t)), 'no ExecStart continued with a backslash');
  assert.ok(texts.some((t) => /^Environment="[A-Z_]+=[^"]* [^"]*"$/m.test(t)), 'no quoted Environment= with a space');
  const console = readUnit('ops/systemd/quantlab-console-ui.service');
  assert.deepEqual(console.Service.Environment, ['"CONSOLE_TITLE=QuantLab console"']);
});

test('the compact timer fires nightly at 02:30 with catch-up and jitter', () => {
  const unit = readUnit('core/compressor/quantlab-compact.timer');
  assert.equal(one(unit, 'Timer', 'OnCalendar'), '*-*-* 02:30:00');
  assert.equal(one(unit, 'Timer', 'Persistent'), 'true');
  assert.equal(one(unit, 'Timer', 'RandomizedDelaySec'), '300');
  assert.equal(one(unit, 'Timer', 'Unit'), 'quantlab-compact.service');
  assert.equal(one(unit, 'Install', 'WantedBy'), 'timers.target');
});

test('the unit parser joins continuations and keeps repeated keys', () => {
  const unit = parseUnit('[Service]\nExecStart=/bin/a \\\n   --flag x\nEnvironment=A=1\nEnvironment="B=2 3"\n# c\n');
  assert.deepEqual(unit.Service.ExecStart, ['/bin/a --flag x']);
  assert.deepEqual(unit.Service.Environment, ['A=1', '"B=2 3"']);
});
