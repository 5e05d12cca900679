// S3 settings, client and canonical JSON shared by the archive and the audit writers.
import { createRequire } from 'node:module';
import { envBool, envInt, envStr } from './env.js';

const require = createRequire(import.meta.url);
let sdk = null;

/**
 * The AWS SDK's S3 module, loaded on its first use: a process that makes no S3 client (archiving off) does not
 * load it, and `require` loads the SDK's CommonJS build without the ESM loader's scan of each file for its named
 * exports, which doubled the cost of loading it (the SDK has no ESM entry for Node).
 * @returns {typeof import('@aws-sdk/client-s3')}
 */
export function s3Sdk() {
  sdk ??= require('@aws-sdk/client-s3');
  return sdk;
}

/** The twin's bound on every S3 call, in ms (QuantLab itself sets none). */
export const S3_TIMEOUT_ENV = 'RUN_ARCHIVE_S3_TIMEOUT_MS';
export const DEFAULT_S3_TIMEOUT_MS = 3000;

/**
 * The S3 call bound from the environment: a positive integer of ms, else the default.
 * @param {Record<string,string|undefined>} [env]
 * @returns {number}
 */
export function s3TimeoutMs(env = process.env) {
  const value = envInt(S3_TIMEOUT_ENV, DEFAULT_S3_TIMEOUT_MS, env);
  return value > 0 ? value : DEFAULT_S3_TIMEOUT_MS;
}

/**
 * Archive settings from the environment (CONTRACT section 2).
 * @param {Record<string,string|undefined>} [env]
 * @returns {{enabled:boolean, bucket:string, endpoint:string, accessKeyId:string, secretAccessKey:string}}
 */
export function archiveSettings(env = process.env) {
  return {
    enabled: envBool('RUN_ARCHIVE_ENABLED', false, env),
    bucket: envStr('RUN_ARCHIVE_S3_BUCKET', '', env).trim(),
    endpoint: envStr('RUN_ARCHIVE_S3_ENDPOINT', '', env).trim(),
    accessKeyId: envStr('RUN_ARCHIVE_S3_ACCESS_KEY', '', env),
    secretAccessKey: envStr('RUN_ARCHIVE_S3_SECRET_KEY', '', env),
  };
}

/**
 * An S3 client configured the way QuantLab builds it (region 'auto', path-style addressing, static
 * credentials, the SDK's default retries), except that every call is bounded: a call given no abortSignal
 * of its own is aborted after `timeoutMs`, and fails with an error that says S3 did not answer in time.
 * The runbook's "self-test fails on S3 check" needs this; QuantLab sets no timeout, so its calls can hang.
 * @param {{endpoint?:string, accessKeyId?:string, secretAccessKey?:string}} settings
 * @param {number} [timeoutMs]
 * @returns {import('@aws-sdk/client-s3').S3Client}
 */
export function createS3Client(settings, timeoutMs = s3TimeoutMs()) {
  const config = { region: 'auto', forcePathStyle: true };
  if (settings.endpoint) config.endpoint = settings.endpoint;
  if (settings.accessKeyId || settings.secretAccessKey) {
    config.credentials = {
      accessKeyId: settings.accessKeyId || '',
      secretAccessKey: settings.secretAccessKey || '',
    };
  }
  const { S3Client } = s3Sdk();
  const client = new S3Client(config);
  const send = client.send.bind(client);
  client.send = async (command, options = {}) => {
    if (options.abortSignal) return send(command, options);
    const signal = AbortSignal.timeout(timeoutMs);
    try {
      return await send(command, { ...options, abortSignal: signal });
    } catch (err) {
      if (!signal.aborted) throw err;
      const timeout = new Error(`S3 did not answer within ${timeoutMs} ms (${command.constructor.name})`);
      timeout.name = 'S3Timeout';
      throw timeout;
    }
  };
  return client;
}

/**
 * Recursively copy a value with every object's keys in sorted order.
 * @param {unknown} value
 * @returns {unknown}
 */
function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value && typeof value === 'object' && value.constructor === Object) {
    const out = {};
    for (const key of Object.keys(value).sort()) out[key] = sortKeys(value[key]);
    return out;
  }
  return value;
}

/**
 * Canonical JSON: object keys sorted recursively, no whitespace. Bigints become strings.
 * @param {unknown} value
 * @returns {string}
 */
export function canonicalJson(value) {
  const normalised = JSON.parse(
    JSON.stringify(value, (_key, v) => (typeof v === 'bigint' ? v.toString() : v)) ?? 'null',
  );
  return JSON.stringify(sortKeys(normalised));
}

/**
 * A one-line description of an S3 / network error (the SDK's errors can be terse).
 * @param {any} err
 * @returns {string}
 */
export function s3ErrorMessage(err) {
  if (!err) return 'unknown error';
  const name = err.name && err.name !== 'Error' ? err.name : '';
  const message = err.message && err.message !== 'UnknownError' ? err.message : '';
  const status = err.$metadata?.httpStatusCode;
  const parts = [name, message && message !== name ? message : '', status ? `HTTP ${status}` : ''].filter(Boolean);
  return parts.length ? parts.join(': ') : String(err.code || err);
}

/**
 * True when an S3 error means "no such object" (GetObject NoSuchKey or HeadObject 404).
 * @param {any} err
 * @returns {boolean}
 */
export function isNotFound(err) {
  if (!err) return false;
  if (err.name === 'NoSuchKey' || err.name === 'NotFound' || err.Code === 'NoSuchKey') return true;
  return err.$metadata?.httpStatusCode === 404 && err.name !== 'NoSuchBucket';
}
