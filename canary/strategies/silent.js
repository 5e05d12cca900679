// Never decides: a run with it ends below the min_decisions promotion guard.
export default class SilentStrategy {
  onEvent() {
    return null;
  }
}
