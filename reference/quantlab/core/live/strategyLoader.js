// Loads a strategy file (CONTRACT section 5): an ES module whose default export, or a named
// export ending in "Strategy", is a class with onEvent(event, ctx) and optional onStart / onEnd.
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

/**
 * The export to use: the default export, else the first named export ending in "Strategy".
 * @param {Record<string, unknown>} mod
 * @returns {unknown}
 */
function pickExport(mod) {
  if (mod.default !== undefined) return mod.default;
  const name = Object.keys(mod).find((key) => key.endsWith('Strategy'));
  return name === undefined ? undefined : mod[name];
}

/**
 * A strategy instance from an export: classes and factory functions get the config,
 * a ready object is used as it is.
 * @param {unknown} exported
 * @param {object} config
 * @returns {any}
 */
function instantiate(exported, config) {
  if (typeof exported === 'function') {
    const isClass = /^class[\s{]/.test(Function.prototype.toString.call(exported));
    return isClass ? new exported(config) : exported(config);
  }
  return exported;
}

/**
 * Load and instantiate a strategy.
 * @param {string} file path to the ES module (relative paths resolve from the working directory)
 * @param {{config?:object}} [opts] parsed --strategy-config
 * @returns {Promise<{strategy:any, strategyId:string, file:string}>}
 */
export async function loadStrategy(file, { config = {} } = {}) {
  if (!file) throw new Error('No strategy file given; pass --strategy with the path to an ES module strategy.');
  const resolved = path.resolve(file);
  if (!fs.existsSync(resolved)) {
    throw new Error(`Strategy file not found: ${resolved}; pass --strategy with the path to an ES module strategy.`);
  }
  let mod;
  try {
    mod = await import(pathToFileURL(resolved).href);
  } catch (err) {
    throw new Error(`Strategy file ${resolved} could not be loaded (${err.message}); fix the module so Node can import it.`);
  }
  const exported = pickExport(mod);
  if (exported === undefined) {
    throw new Error(`Strategy file ${resolved} has no default export or export ending in "Strategy"; export a class with onEvent(event, ctx).`);
  }
  const strategy = instantiate(exported, config);
  if (!strategy || typeof strategy.onEvent !== 'function') {
    throw new Error(`Strategy in ${resolved} has no onEvent(event, ctx) method; add one that returns decisions.`);
  }
  return { strategy, strategyId: path.basename(resolved).replace(/\.[cm]?js$/, ''), file: resolved };
}
