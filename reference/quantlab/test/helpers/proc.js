// Process helpers for the twin's tests: run a Node script to completion, or spawn a long-lived
// one and wait for its JSON lines. Children never outlive the test process.
import { spawn } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The twin's root folder (reference/quantlab). */
export const TWIN_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

const live = new Set();
process.on('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

/**
 * A port the OS just handed out on 127.0.0.1 (for servers that need the number up front).
 * @returns {Promise<number>}
 */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/**
 * The child's environment: a minimal base (PATH, HOME, LANG, TMPDIR) plus env. The parent's
 * environment is not inherited unless inheritEnv is true, so a stray OBSERVER_TOKEN or
 * RUN_ARCHIVE_* in the shell cannot change a test.
 * @param {Record<string,string|undefined>} env
 * @param {boolean} inheritEnv
 * @returns {Record<string,string>}
 */
function childEnv(env = {}, inheritEnv = false) {
  const base = inheritEnv ? { ...process.env } : {};
  for (const name of ['PATH', 'HOME', 'LANG', 'TMPDIR', 'SYSTEMROOT']) {
    if (process.env[name] !== undefined && base[name] === undefined) base[name] = process.env[name];
  }
  const merged = { ...base, ...env };
  for (const key of Object.keys(merged)) if (merged[key] === undefined) delete merged[key];
  return merged;
}

/**
 * Start `node script ...args` with piped output and register it for cleanup.
 * @param {string} script path, relative to cwd
 * @param {string[]} args
 * @param {{env?:object, cwd?:string, inheritEnv?:boolean}} opts
 */
function startChild(script, args, { env, cwd = TWIN_ROOT, inheritEnv = false } = {}) {
  const child = spawn(process.execPath, [script, ...args], {
    cwd,
    env: childEnv(env, inheritEnv),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  child.once('exit', () => live.delete(child));
  return child;
}

/**
 * Run a Node script to completion.
 * @param {string} script
 * @param {string[]} [args]
 * @param {{env?:object, cwd?:string, inheritEnv?:boolean, timeoutMs?:number}} [opts]
 * @returns {Promise<{code:number|null, signal:string|null, stdout:string, stderr:string}>}
 *   rejects (after killing the child) when it runs longer than timeoutMs
 */
export function runNode(script, args = [], opts = {}) {
  const { timeoutMs = 20_000 } = opts;
  return new Promise((resolve, reject) => {
    const child = startChild(script, args, opts);
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk) => { stdout += chunk; });
    child.stderr.setEncoding('utf8').on('data', (chunk) => { stderr += chunk; });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${script} did not exit within ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, timeoutMs);
    child.once('error', (err) => { clearTimeout(timer); reject(err); });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/**
 * Parse every JSON line of a text (non-JSON lines are skipped).
 * @param {string} text
 * @returns {object[]}
 */
export function jsonLines(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line.trim().startsWith('{')) continue;
    try {
      out.push(JSON.parse(line));
    } catch {
      // a partial or plain-text line: not an event
    }
  }
  return out;
}

/**
 * Spawn a long-lived Node script.
 * @param {string} script
 * @param {string[]} [args]
 * @param {{env?:object, cwd?:string, inheritEnv?:boolean}} [opts]
 * @returns {{child:import('node:child_process').ChildProcess, pid:number, stdout:()=>string, stderr:()=>string,
 *   exited:Promise<{code:number|null, signal:string|null}>,
 *   waitForLine:(match:(obj:object)=>boolean, timeoutMs?:number)=>Promise<object>,
 *   waitForText:(re:RegExp, timeoutMs?:number)=>Promise<string>,
 *   stop:(signal?:string, timeoutMs?:number)=>Promise<{code:number|null, signal:string|null}>}}
 */
export function spawnNode(script, args = [], opts = {}) {
  const child = startChild(script, args, opts);
  let out = '';
  let err = '';
  const listeners = new Set();
  const notify = () => { for (const fn of listeners) fn(); };
  child.stdout.setEncoding('utf8').on('data', (chunk) => { out += chunk; notify(); });
  child.stderr.setEncoding('utf8').on('data', (chunk) => { err += chunk; notify(); });
  const exited = new Promise((resolve) => {
    child.once('close', (code, signal) => { notify(); resolve({ code, signal }); });
  });
  let done = false;
  exited.then(() => { done = true; notify(); });

  /**
   * Resolve when probe() returns a value; reject at the deadline or when the child exits first.
   * @template T
   * @param {() => T|undefined} probe
   * @param {string} what
   * @param {number} timeoutMs
   * @returns {Promise<T>}
   */
  const waitFor = (probe, what, timeoutMs) => new Promise((resolve, reject) => {
    const check = () => {
      const value = probe();
      if (value !== undefined) return finish(null, value);
      if (done) return finish(new Error(`${script} exited before ${what}\nstdout: ${out}\nstderr: ${err}`));
      return undefined;
    };
    const timer = setTimeout(() => finish(new Error(`no ${what} from ${script} within ${timeoutMs} ms\nstdout: ${out}\nstderr: ${err}`)), timeoutMs);
    const finish = (error, value) => {
      clearTimeout(timer);
      listeners.delete(check);
      if (error) reject(error); else resolve(value);
    };
    listeners.add(check);
    check();
  });

  return {
    child,
    pid: child.pid,
    stdout: () => out,
    stderr: () => err,
    exited,
    waitForLine: (match, timeoutMs = 10_000) => waitFor(
      () => jsonLines(out).concat(jsonLines(err)).find(match), 'matching JSON line', timeoutMs),
    waitForText: (re, timeoutMs = 10_000) => waitFor(
      () => (re.exec(out + err) || [])[0], `text ${re}`, timeoutMs),
    stop: async (signal = 'SIGTERM', timeoutMs = 5_000) => {
      if (!done) child.kill(signal);
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      try {
        return await exited;
      } finally {
        clearTimeout(timer);
      }
    },
  };
}
