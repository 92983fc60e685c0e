// One row's text as it is generated: end of sequence, stop strings, a classification task's labels, and the text
// safe to show so far (softprompt.runtime.generate.RowText).

export class RowText {
  constructor(decode, eos, stops = [], labels = []) {
    this.decode = decode;
    this.eos = new Set(eos);
    this.stops = stops.filter(Boolean);
    this.labels = new Set(labels.filter((l) => l.length).map((l) => l.join(",")));
    this.longest = Math.max(0, ...labels.map((l) => l.length));
    this.goingOn = new Set(labels.flatMap((l) => l.slice(1).map((_, k) => l.slice(0, k + 1).join(","))));
    this.ids = [];
    this.finishReason = null;
    this._text = "";
    this._decoded = 0;
  }

  get done() {
    return this.finishReason !== null;
  }

  get text() {
    if (this._decoded !== this.ids.length) {
      this._text = this.decode(this.ids);
      this._decoded = this.ids.length;
    }
    return this._text;
  }

  add(token) {
    if (this.done) return;
    if (this.eos.has(token)) {
      this._text = this.text;
      this.ids.push(token);
      this._decoded = this.ids.length;
      this.finishReason = "stop";
      return;
    }
    this.ids.push(token);
    if (this.labels.size) {
      const written = this.ids.join(",");
      if (this.ids.length >= this.longest || (this.labels.has(written) && !this.goingOn.has(written))) {
        this.finishReason = "stop";
        return;
      }
    }
    if (!this.stops.length) return;
    const text = this.text;
    const cuts = this.stops.map((s) => text.indexOf(s)).filter((i) => i >= 0);
    if (cuts.length) {
      this._text = text.slice(0, Math.min(...cuts));
      this.finishReason = "stop";
    }
  }

  finish() {
    if (!this.done) this.finishReason = "length";
  }

  /** Text later tokens cannot change: no half-decoded character, no possible start of a stop string. */
  stableText() {
    if (this.done) return this.text;
    const text = this.text.replace(/\ufffd+$/, "");
    let hold = 0;
    for (const stop of this.stops) {
      for (let size = Math.min(stop.length - 1, text.length); size > 0; size--) {
        if (text.endsWith(stop.slice(0, size))) {
          hold = Math.max(hold, size);
          break;
        }
      }
    }
    return text.slice(0, text.length - hold);
  }
}
