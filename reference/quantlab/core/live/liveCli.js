// Flags and wiring shared by tools/run-canary-live.js and tools/run-live.js (CONTRACT section 5).
import { AuditWriter } from '../audit/AuditWriter.js';
import { LocalArchiveWriter, RunArchiveWriter } from '../archive/RunArchiveWriter.js';
import { envInt } from '../lib/env.js';
import { archiveSettings, createS3Client } from '../lib/s3.js';
import { RunRegistry } from '../state/RunRegistry.js';
import { LiveRun } from './LiveRun.js';
import { PromotionGuards } from './PromotionGuards.js';
import { RunBudgets } from './RunBudgets.js';
import { loadStrategy } from './strategyLoader.js';

export const DEFAULT_ARCHIVE_DIR = '/tmp/quantlab-canary-archive';
const REQUIRED = ['exchange', 'symbols', 'strategy', 'dataset-parquet', 'dataset-meta'];
const VALUED = new Set([...REQUIRED, 'seed', 'strategy-config', 'ordering-mode', 'execution-mode', 'duration-seconds', 'archive-dir']);
const BOOLEAN = new Set(['mock']);
const USAGE_FLAGS = '--exchange binance --symbols BTCUSDT,ETHUSDT --strategy FILE --dataset-parquet live --dataset-meta live '
  + '[--seed N] [--strategy-config JSON] [--ordering-mode STRICT|WARN] [--execution-mode mock] [--duration-seconds N] '
  + '[--mock] [--archive-dir DIR]';

/** A command-line mistake: the tool prints a usage line and exits 1. */
export class UsageError extends Error {}

/**
 * The one-line usage text for a tool.
 * @param {string} script e.g. 'tools/run-canary-live.js'
 * @param {string} [problem]
 * @returns {string}
 */
export function usageLine(script, problem) {
  return `Usage: node ${script} ${USAGE_FLAGS}${problem ? ` (${problem})` : ''}`;
}

/**
 * parseFlags for a tool's main(): on a usage mistake prints the usage line on stderr and returns null.
 * @param {string} script
 * @param {string[]} argv
 * @returns {Record<string, string|boolean>|null}
 */
export function parseFlagsOrUsage(script, argv) {
  try {
    return parseFlags(argv);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`${usageLine(script, err.message)}\n`);
    return null;
  }
}

/**
 * Parse --flag value, --flag=value and --mock.
 * @param {string[]} argv
 * @returns {Record<string, string|boolean>}
 */
export function parseFlags(argv) {
  const flags = {};
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (!arg.startsWith('--')) throw new UsageError(`unexpected argument ${arg}`);
    const [name, inline] = arg.slice(2).split(/=(.*)/s, 2);
    if (BOOLEAN.has(name)) {
      flags[name] = inline === undefined ? true : !['0', 'false', 'no'].includes(inline.toLowerCase());
    } else if (VALUED.has(name)) {
      const value = inline ?? argv[i + 1];
      if (inline === undefined) i += 1;
      if (value === undefined || (inline === undefined && value.startsWith('--'))) throw new UsageError(`--${name} needs a value`);
      flags[name] = value;
    } else {
      throw new UsageError(`unknown flag --${name}`);
    }
  }
  const missing = REQUIRED.filter((name) => flags[name] === undefined || flags[name] === '');
  if (missing.length > 0) throw new UsageError(`missing ${missing.map((m) => `--${m}`).join(', ')}`);
  return flags;
}

/**
 * Checked run options from flags; throws a sentence saying which flag to fix.
 * @param {Record<string, string|boolean>} flags
 * @param {{env?:Record<string,string|undefined>, defaultDurationSeconds?:number|null}} [opts]
 * @returns {object}
 */
export function runOptions(flags, { env = process.env, defaultDurationSeconds = null } = {}) {
  const exchange = String(flags.exchange).toLowerCase();
  if (exchange !== 'binance') throw new Error(`Unsupported exchange ${flags.exchange}; use --exchange binance.`);
  const symbols = String(flags.symbols).split(',').map((s) => s.trim().toUpperCase()).filter(Boolean);
  if (symbols.length === 0) throw new Error('--symbols lists no symbol; pass a comma list such as BTCUSDT,ETHUSDT.');
  const orderingMode = String(flags['ordering-mode'] || 'STRICT').toUpperCase();
  if (!['STRICT', 'WARN'].includes(orderingMode)) throw new Error(`--ordering-mode ${flags['ordering-mode']} is not known; use STRICT or WARN.`);
  const executionMode = String(flags['execution-mode'] || 'mock').toLowerCase();
  if (executionMode !== 'mock') throw new Error(`--execution-mode ${flags['execution-mode']} is not supported by the twin; use --execution-mode mock (fills are simulated).`);
  return {
    exchange, symbols, orderingMode, executionMode,
    strategyFile: String(flags.strategy),
    strategyConfig: parseStrategyConfig(flags['strategy-config']),
    durationMs: durationMs(flags['duration-seconds'], env, defaultDurationSeconds),
    seed: flags.seed ?? null,
    mock: flags.mock === true,
    archiveDir: String(flags['archive-dir'] || DEFAULT_ARCHIVE_DIR),
    datasetParquet: String(flags['dataset-parquet']),
    datasetMeta: String(flags['dataset-meta']),
  };
}

/**
 * @param {unknown} raw --strategy-config
 * @returns {object}
 */
function parseStrategyConfig(raw) {
  if (raw === undefined) return {};
  let parsed;
  try {
    parsed = JSON.parse(String(raw));
  } catch (err) {
    throw new Error(`--strategy-config is not valid JSON (${err.message}); pass a JSON object such as '{"qty":0.001}'.`);
  }
  if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new Error('--strategy-config must be a JSON object; pass something like \'{"qty":0.001}\'.');
  }
  return parsed;
}

/**
 * Run length: --duration-seconds, else the default (the canary uses GO_LIVE_CANARY_SECONDS, 30).
 * @param {unknown} raw
 * @param {Record<string,string|undefined>} env
 * @param {number|null} defaultSeconds null: run until stopped
 * @returns {number|null}
 */
function durationMs(raw, env, defaultSeconds) {
  if (raw === undefined) {
    if (defaultSeconds === null) return null;
    return envInt('GO_LIVE_CANARY_SECONDS', defaultSeconds, env) * 1000;
  }
  const seconds = Number(raw);
  if (!(seconds > 0) || !Number.isFinite(seconds)) throw new Error(`--duration-seconds ${raw} is not a positive number of seconds; pass e.g. --duration-seconds 30.`);
  return Math.round(seconds * 1000);
}

/**
 * The archive writer a run uses: a local folder for --mock, S3 when archiving is on, else none.
 * @param {object} options from runOptions
 * @param {Record<string,string|undefined>} env
 * @returns {RunArchiveWriter|LocalArchiveWriter|null}
 */
export function archiveWriter(options, env) {
  if (options.mock) return new LocalArchiveWriter({ dir: options.archiveDir });
  const settings = archiveSettings(env);
  if (!settings.enabled) return null;
  return new RunArchiveWriter({ s3Client: createS3Client(settings), bucket: settings.bucket });
}

/**
 * Load the strategy and build the run with every collaborator from env.
 * @param {object} options from runOptions
 * @param {Record<string,string|undefined>} env
 * @returns {Promise<{run:LiveRun, audit:AuditWriter, archive:any}>}
 */
export async function buildRun(options, env) {
  const { strategy, strategyId } = await loadStrategy(options.strategyFile, { config: options.strategyConfig });
  const audit = AuditWriter.fromEnv(env);
  const archive = archiveWriter(options, env);
  const run = new LiveRun({
    ...options, strategy, strategyId, env, audit, archive,
    registry: RunRegistry.fromEnv(env),
    budgets: RunBudgets.fromEnv(env),
    guards: PromotionGuards.fromEnv(env),
  });
  return { run, audit, archive };
}

/**
 * SIGTERM / SIGINT stop the run as MANUAL_STOP (it then finishes and archives as usual).
 * @param {LiveRun} run
 */
export function stopOnSignals(run) {
  for (const signal of ['SIGTERM', 'SIGINT']) process.once(signal, () => run.stop('MANUAL_STOP'));
}

/**
 * Wait for background audit uploads, but not forever (each upload is bounded by the S3 timeout; this bounds them all).
 * @param {AuditWriter} audit
 * @param {number} [ms]
 * @returns {Promise<void>}
 */
export async function flushAudit(audit, ms = 5000) {
  let timer;
  await Promise.race([audit.flush(), new Promise((resolve) => { timer = setTimeout(resolve, ms); })]);
  clearTimeout(timer);
}
