// console-ui as a real process: `npm run start` as its unit runs it, health, auth, the status page
// over live health routes, bad config, SIGTERM.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';
import { test } from 'node:test';
import { TWIN_ROOT, freePort, jsonLines, runNode, spawnNode } from './helpers/proc.js';

const CONSOLE_DIR = path.join(TWIN_ROOT, 'console-ui');
const TOKEN = 'console-test-token-a81f44';

async function get(url, headers = {}) {
  const res = await fetch(url, { headers, signal: AbortSignal.timeout(5_000) });
  const text = await res.text();
  return { status: res.status, headers: res.headers, text, json: () => JSON.parse(text) };
}

/** A stand-in health route on a port from the OS (the console only reads its JSON). */
async function startHealthStub(t, body) {
  const server = http.createServer((req, res) => {
    res.writeHead(req.url === '/health' ? 200 : 404, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise((resolve) => { server.closeAllConnections(); server.close(resolve); }));
  return `http://127.0.0.1:${server.address().port}`;
}

/** Poll until text matches, with a deadline. */
async function waitForText(read, re, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const match = re.exec(read());
    if (match) return match;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`no ${re} within ${timeoutMs} ms: ${read()}`);
}

test('`npm run start` in console-ui serves /health, and the unit-style SIGTERM to its group stops it cleanly', async (t) => {
  // Like systemd's control group: npm and its node child share one process group, signalled together.
  const child = spawn('npm', ['run', 'start'], {
    cwd: CONSOLE_DIR,
    env: { PATH: process.env.PATH, HOME: process.env.HOME, CONSOLE_PORT: '0', CONSOLE_TOKEN: TOKEN },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (c) => { out += c; });
  child.stderr.setEncoding('utf8').on('data', (c) => { out += c; });
  const exited = new Promise((resolve) => child.once('close', resolve));
  const killGroup = (signal) => { try { process.kill(-child.pid, signal); } catch { /* already gone */ } };
  let stopped = false;
  t.after(() => { if (!stopped) killGroup('SIGKILL'); });

  const [, port] = await waitForText(() => out, /"event":"console_ui_listening","port":(\d+)/);
  const health = await get(`http://127.0.0.1:${port}/health`);
  assert.equal(health.status, 200);
  assert.deepEqual(health.json(), { status: 'ok', service: 'console-ui', title: 'QuantLab console' });

  killGroup('SIGTERM');
  await waitForText(() => out, /"event":"console_ui_stopped","signal":"SIGTERM"/, 2_000);
  await exited;
  stopped = true;
  assert.ok(!out.includes(TOKEN));
});

test('console-ui shows the other services on its status page, behind its token, and exits 0 on SIGTERM', async (t) => {
  const replayd = await startHealthStub(t, { status: 'ok', service: 'replayd' });
  const closedPort = await freePort();
  const proc = spawnNode('server.js', [], {
    cwd: CONSOLE_DIR,
    env: {
      CONSOLE_PORT: '0', CONSOLE_TOKEN: TOKEN, CONSOLE_TITLE: 'Twin console <test>', OBSERVER_TOKEN: 'observer-secret-3c9d',
      CONSOLE_REPLAYD_URL: replayd, CONSOLE_WORKER_URL: `http://127.0.0.1:${closedPort}`,
      CONSOLE_OBSERVER_URL: `http://127.0.0.1:${closedPort}`, CONSOLE_PROBE_TIMEOUT_MS: '1000',
    },
  });
  t.after(() => proc.stop('SIGKILL'));
  const { port } = await proc.waitForLine((o) => o.event === 'console_ui_listening');
  const base = `http://127.0.0.1:${port}`;

  const anonymous = await get(`${base}/api/status`);
  assert.equal(anonymous.status, 401);
  assert.match(anonymous.headers.get('www-authenticate'), /^Basic /);
  assert.equal((await get(`${base}/`, { authorization: 'Bearer nope' })).status, 401);

  const status = (await get(`${base}/api/status`, { authorization: `Bearer ${TOKEN}` })).json();
  assert.equal(status.services.replayd.ok, true);
  assert.equal(status.services.replayd.body.service, 'replayd');
  assert.equal(status.services.worker.ok, false);
  assert.equal(status.services.observer.ok, false);
  assert.deepEqual(status.runs, []);

  // A browser logs in with basic auth; the token is the password.
  const basic = Buffer.from(`ops:${TOKEN}`).toString('base64');
  const page = await get(`${base}/`, { authorization: `Basic ${basic}` });
  assert.equal(page.status, 200);
  assert.match(page.headers.get('content-type'), /^text\/html/);
  assert.match(page.text, /<title>Twin console &#60;test&#62;<\/title>/, 'the title is escaped');
  assert.match(page.text, /<td>replayd<\/td><td class="up">up<\/td>/);
  assert.match(page.text, /<td>worker<\/td><td class="down">down<\/td>/);
  assert.ok(!page.text.includes('observer-secret-3c9d'));

  const started = Date.now();
  assert.deepEqual(await proc.stop('SIGTERM'), { code: 0, signal: null });
  assert.ok(Date.now() - started < 1_000, `took ${Date.now() - started} ms to stop`);
  assert.ok(jsonLines(proc.stdout()).some((o) => o.event === 'console_ui_stopped'));
});

test('console-ui exits 2 with one [config] line on bad config', async () => {
  const cases = [
    [{ CONSOLE_PORT: '99999' }, /^\[config\] CONSOLE_PORT must be a port number from 0 to 65535 \(got "99999"\)/],
    [{ CONSOLE_PORT: '0', CONSOLE_OBSERVER_URL: 'ftp://host' }, /^\[config\] CONSOLE_OBSERVER_URL must be an http\(s\) URL/],
  ];
  for (const [env, pattern] of cases) {
    const res = await runNode('server.js', [], { cwd: CONSOLE_DIR, env, timeoutMs: 10_000 });
    assert.equal(res.code, 2, res.stderr);
    assert.match(res.stderr, pattern);
    assert.equal(res.stderr.trim().split('\n').length, 1);
  }
});
