// docs/runbook.md against the operators' runbook: same sections, commands, codes and values, the
// same markdown shape; the only additions are the live runner unit the twin names.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { TWIN_ROOT } from './helpers/proc.js';

const TWIN_RUNBOOK = path.join(TWIN_ROOT, 'docs', 'runbook.md');
// The comparison with the operators' runbook is opt-in (the project's tests do not read files outside the
// repository): QUANTLAB_PROD_RUNBOOK=/path/to/quantlab-prod-runbook.md npm test
const PROD_RUNBOOK = process.env.QUANTLAB_PROD_RUNBOOK || '';
const ADDED = ['ops/systemd/quantlab-live.service', 'sudo systemctl restart quantlab-live.service'];

const headings = (md) => md.split('\n').filter((l) => /^#{1,6} /.test(l));
const codeSpans = (md) => new Set([...md.matchAll(/`([^`\n]+)`/g)].map((m) => m[1]));

/** The runbook's sections: heading -> body text. */
function sections(md) {
  const out = {};
  let current = null;
  for (const line of md.split('\n')) {
    if (/^## /.test(line)) {
      current = line.slice(3).trim();
      out[current] = '';
    } else if (current) {
      out[current] += `${line}\n`;
    }
  }
  return out;
}

/** "Most Common Failures": [{title, symptom, fix}] from `N) **Title**` items with Symptom:/Fix: sub-bullets. */
function failures(md) {
  const body = sections(md)['Most Common Failures (Top 5)'] || '';
  return [...body.matchAll(/^(\d+)\) \*\*(.+?)\*\*\n {3}- Symptom: (.+)\n {3}- Fix: (.+)$/gm)]
    .map(([, n, title, symptom, fix]) => ({ n: Number(n), title, symptom, fix }));
}

/** Backticked values of the nested safety lists, per list label. */
function safetyDefaults(md) {
  const body = sections(md)['Safety Defaults (systemd + limits)'] || '';
  const out = [];
  for (const line of body.split('\n')) {
    if (/^- /.test(line)) out.push([]);
    const value = /^ {2}- `([^`]+)`$/.exec(line);
    if (value) out[out.length - 1].push(value[1]);
  }
  return out;
}

const prodText = () => fs.readFileSync(PROD_RUNBOOK, 'utf8');
const twinText = () => fs.readFileSync(TWIN_RUNBOOK, 'utf8');
const hasProd = PROD_RUNBOOK !== '' && fs.existsSync(PROD_RUNBOOK);

test('the twin runbook has the same headings, in the same order', { skip: !hasProd && 'set QUANTLAB_PROD_RUNBOOK to compare with the operators\' runbook' }, () => {
  assert.deepEqual(headings(twinText()), headings(prodText()));
});

/** Each non-blank line's kind (heading level, bullet depth, numbered item, paragraph): the markdown shape. */
function lineShape(md) {
  return md.split('\n').filter((l) => l.trim()).map((l) => {
    const heading = /^(#+) /.exec(l);
    if (heading) return `h${heading[1].length}`;
    const bullet = /^( *)- /.exec(l);
    if (bullet) return `li${bullet[1].length}`;
    return /^\d+\) /.test(l) ? 'ol' : 'p';
  });
}

test('the twin runbook has the same markdown shape, plus one bullet for the live unit', { skip: !hasProd && 'set QUANTLAB_PROD_RUNBOOK to compare with the operators\' runbook' }, () => {
  const twinLines = twinText().split('\n').filter((l) => l !== `- \`${ADDED[0]}\``).join('\n');
  assert.deepEqual(lineShape(twinLines), lineShape(prodText()));
});

test('every command, path, env name, code and value of the operators\' runbook is in the twin\'s', { skip: !hasProd && 'set QUANTLAB_PROD_RUNBOOK to compare with the operators\' runbook' }, () => {
  const prod = codeSpans(prodText());
  const twin = codeSpans(twinText());
  assert.deepEqual([...prod].filter((s) => !twin.has(s)), [], 'missing from docs/runbook.md');
  assert.deepEqual([...twin].filter((s) => !prod.has(s)).sort(), [...ADDED].sort(), 'only the live unit is added');
  // Each section keeps its own commands (nothing moved to another section).
  const prodSections = sections(prodText());
  const twinSections = sections(twinText());
  for (const [name, body] of Object.entries(prodSections)) {
    for (const span of codeSpans(body)) assert.ok(codeSpans(twinSections[name]).has(span), `${span} not under "${name}"`);
  }
});

test('the Top 5 failures keep their titles, codes and Symptom:/Fix: shape', { skip: !hasProd && 'set QUANTLAB_PROD_RUNBOOK to compare with the operators\' runbook' }, () => {
  const prod = failures(prodText());
  const twin = failures(twinText());
  assert.equal(prod.length, 5, 'the operators\' runbook parsed');
  assert.deepEqual(twin.map((f) => [f.n, f.title]), prod.map((f) => [f.n, f.title]));
  for (const [i, item] of prod.entries()) {
    assert.deepEqual(codeSpans(twin[i].symptom), codeSpans(item.symptom), `${item.title}: symptom codes`);
    assert.deepEqual(codeSpans(twin[i].fix), codeSpans(item.fix), `${item.title}: fix codes`);
    // Codes written bare in the operators' text (401, RunArchiveWriter) are kept too.
    for (const word of `${item.symptom} ${item.fix}`.match(/\b(\d{3}|[A-Z][a-z]+[A-Z]\w+)\b/g) || []) {
      assert.ok(`${twin[i].symptom} ${twin[i].fix}`.includes(word), `${item.title}: ${word}`);
    }
  }
});

test('the safety defaults lists are identical', { skip: !hasProd && 'set QUANTLAB_PROD_RUNBOOK to compare with the operators\' runbook' }, () => {
  const prod = safetyDefaults(prodText());
  assert.equal(prod.length, 2);
  assert.deepEqual(safetyDefaults(twinText()), prod);
});

test('the twin runbook is written in its own words and names the live runner unit', () => {
  const twin = twinText();
  assert.match(twin, /^- Disable live WS ingest if needed: .*`CORE_LIVE_WS_ENABLED=0`.*`sudo systemctl restart quantlab-live\.service`/m);
  if (hasProd) {
    const prodProse = new Set(prodText().split('\n').filter((l) => l.trim() && !l.includes('`') && !/^#/.test(l) && !/^\d\) /.test(l) && !/:$/.test(l)));
    const copied = twin.split('\n').filter((l) => prodProse.has(l));
    assert.deepEqual(copied, [], 'prose lines copied verbatim');
  }
});

test('every script and unit file the twin runbook names exists in the twin', () => {
  const files = [...codeSpans(twinText())]
    .flatMap((span) => span.split(/\s+/))
    .filter((word) => /^(core|ops|tools)\/.+\.(js|service)$/.test(word));
  assert.ok(files.length >= 9, `found only ${files.join(', ')}`);
  for (const rel of files) assert.ok(fs.existsSync(path.join(TWIN_ROOT, rel)), `${rel} is missing`);
});
