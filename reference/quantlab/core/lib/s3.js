// S3 settings, client and canonical JSON shared by the archive and the audit writers.
import { S3Client } from '@aws-sdk/client-s3';
import { envBool, envStr } from './env.js';

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
 * An S3 client configured the way QuantLab builds it: region 'auto', path-style
 * addressing, static credentials. QuantLab sets no request or connection timeout,
 * and keeps the SDK's default retries, so neither is set here.
 * @param {{endpoint?:string, accessKeyId?:string, secretAccessKey?:string}} settings
 * @returns {S3Client}
 */
export function createS3Client(settings) {
  const config = { region: 'auto', forcePathStyle: true };
  if (settings.endpoint) config.endpoint = settings.endpoint;
  if (settings.accessKeyId || settings.secretAccessKey) {
    config.credentials = {
      accessKeyId: settings.accessKeyId || '',
      secretAccessKey: settings.secretAccessKey || '',
    };
  }
  return new S3Client(config);
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
