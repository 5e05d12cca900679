// The default reporter of `make test-twin`: node's dot reporter (one character a test, then every failure in full)
// and, as it prints none, the totals after it: "node --test: N passed, N failed, N skipped", the closing line that
// a reader and CI look for. `make test-twin V=1` uses the TAP reporter instead, every test by name.
import { dot } from 'node:test/reporters';

export default async function* terse(source) {
  const totals = { passed: 0, failed: 0, skipped: 0 };
  async function* counted() {
    for await (const event of source) {
      const { type, data } = event;
      if (data?.nesting === 0 && data.details?.type !== 'suite') { // a test's subtests count with it
        if (type === 'test:fail') totals.failed += 1;
        else if (type === 'test:pass') totals[data.skip || data.todo ? 'skipped' : 'passed'] += 1;
      }
      yield event;
    }
  }
  yield* dot(counted());
  yield `\nnode --test: ${totals.passed} passed, ${totals.failed} failed, ${totals.skipped} skipped\n`;
}
