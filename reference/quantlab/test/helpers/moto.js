// A real moto S3 server for the twin's tests: started on a port from the OS, polled until it
// answers, and always killed.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { TWIN_ROOT, freePort } from './proc.js';

export const MOTO_ACCESS_KEY = 'testing-access-key';
export const MOTO_SECRET_KEY = 'testing-secret-key';

const live = new Set();
process.on('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

/**
 * The Python that has moto: $QUANTLAB_TEST_PYTHON, else <repo>/.venv/bin/python, else python3.
 * @returns {string}
 */
export function motoPython() {
  if (process.env.QUANTLAB_TEST_PYTHON) return process.env.QUANTLAB_TEST_PYTHON;
  const venv = path.resolve(TWIN_ROOT, '..', '..', '.venv', 'bin', 'python');
  return fs.existsSync(venv) ? venv : 'python3';
}

/**
 * One GET with a short timeout; resolves the status code, or null on any error.
 * @param {string} url
 * @returns {Promise<number|null>}
 */
function probe(url) {
  return new Promise((resolve) => {
    const req = http.get(url, { timeout: 1_000 }, (res) => {
      res.resume();
      resolve(res.statusCode);
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(null));
  });
}

/**
 * Start moto and wait until it answers.
 * @param {{timeoutMs?:number}} [opts]
 * @returns {Promise<{endpoint:string, port:number, stop:()=>Promise<void>}>}
 */
export async function startMoto({ timeoutMs = 30_000 } = {}) {
  const port = await freePort();
  const python = motoPython();
  const child = spawn(python, ['-m', 'moto.server', '-H', '127.0.0.1', '-p', String(port)], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, AWS_ACCESS_KEY_ID: MOTO_ACCESS_KEY, AWS_SECRET_ACCESS_KEY: MOTO_SECRET_KEY },
  });
  live.add(child);
  let stderr = '';
  let exited = false;
  child.stderr.setEncoding('utf8').on('data', (chunk) => { stderr = (stderr + chunk).slice(-4_000); });
  const closed = new Promise((resolve) => child.once('close', () => { exited = true; live.delete(child); resolve(); }));
  child.once('error', () => { exited = true; });

  const stop = async () => {
    if (!exited) child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 3_000);
    await closed;
    clearTimeout(timer);
  };

  const endpoint = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (exited) break;
    if ((await probe(`${endpoint}/`)) !== null) return { endpoint, port, stop };
    await new Promise((r) => setTimeout(r, 100));
  }
  await stop();
  throw new Error(`moto did not start with ${python} (set QUANTLAB_TEST_PYTHON to a Python with moto[server]): ${stderr}`);
}

/**
 * An S3 client for moto (test code only).
 * @param {string} endpoint
 * @returns {S3Client}
 */
export function motoClient(endpoint) {
  return new S3Client({
    region: 'us-east-1',
    endpoint,
    forcePathStyle: true,
    credentials: { accessKeyId: MOTO_ACCESS_KEY, secretAccessKey: MOTO_SECRET_KEY },
  });
}

/**
 * Create a bucket on moto.
 * @param {string} endpoint
 * @param {string} bucket
 */
export async function createBucket(endpoint, bucket) {
  const client = motoClient(endpoint);
  try {
    await client.send(new CreateBucketCommand({ Bucket: bucket }));
  } finally {
    client.destroy();
  }
}

/**
 * The RUN_ARCHIVE_* variables that point QuantLab at a moto bucket.
 * @param {string} endpoint
 * @param {string} bucket
 * @returns {Record<string,string>}
 */
export function archiveEnv(endpoint, bucket) {
  return {
    RUN_ARCHIVE_ENABLED: '1',
    RUN_ARCHIVE_S3_BUCKET: bucket,
    RUN_ARCHIVE_S3_ENDPOINT: endpoint,
    RUN_ARCHIVE_S3_ACCESS_KEY: MOTO_ACCESS_KEY,
    RUN_ARCHIVE_S3_SECRET_KEY: MOTO_SECRET_KEY,
  };
}
