// Choosing the next token, as softprompt.runtime.sampling does: greedy, temperature, top-k, top-p, in float64,
// one numpy-compatible random() per sampled token, end-of-sequence masked until min_new_tokens.

import { RequestError } from "./errors.js";
import { NumpyRandom } from "./rng.js";

export const DEFAULTS = { maxNewTokens: 64, minNewTokens: 0, temperature: 0, topK: null, topP: null, seed: null, stop: [] };

/** Settings checked once, with the Python runtime's defaults and refusals. */
export function settingsOf(options = {}) {
  const known = new Set([...Object.keys(DEFAULTS), "task", "signal"]);
  const unknown = Object.keys(options).filter((key) => !known.has(key));
  if (unknown.length) throw new RequestError(`unknown generation settings ${unknown}; expected some of ${Object.keys(DEFAULTS)}`);
  const s = { ...DEFAULTS, ...Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) };
  s.stop = typeof s.stop === "string" ? [s.stop] : [...(s.stop ?? [])];
  if (!Number.isInteger(s.maxNewTokens) || s.maxNewTokens < 1) throw new RequestError(`maxNewTokens ${s.maxNewTokens}; expected at least 1`);
  if (!Number.isInteger(s.minNewTokens) || s.minNewTokens < 0 || s.minNewTokens > s.maxNewTokens) {
    throw new RequestError(`minNewTokens ${s.minNewTokens}; expected 0..maxNewTokens (${s.maxNewTokens})`);
  }
  if (!(s.temperature >= 0 && s.temperature < Infinity)) throw new RequestError(`temperature ${s.temperature}; expected 0 (greedy) or a finite positive value`);
  if (s.topK !== null && !(Number.isInteger(s.topK) && s.topK >= 1)) throw new RequestError(`topK ${s.topK}; expected at least 1`);
  if (s.topP !== null && !(s.topP > 0 && s.topP <= 1)) throw new RequestError(`topP ${s.topP}; expected a value in (0, 1]`);
  if (s.seed !== null && !((Number.isInteger(s.seed) || typeof s.seed === "bigint") && s.seed >= 0 && BigInt(s.seed) < 2n ** 64n)) {
    throw new RequestError(`seed ${s.seed}; expected 0 to 2**64 - 1`);
  }
  for (const stop of s.stop) if (typeof stop !== "string" || !stop) throw new RequestError(`stop string ${JSON.stringify(stop)}; expected non-empty text`);
  return s;
}

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

/** A request's `choose(logits: Float32Array[V]) -> id`, counting its steps (one chooser per row). */
export function chooser(settings, eos) {
  const { temperature, topK, topP, minNewTokens } = settings;
  const rng = new NumpyRandom(settings.seed);
  const ends = [...eos].sort((a, b) => a - b);
  let step = 0;
  return (logits) => {
    const masking = step++ < minNewTokens && ends.length > 0;
    if (temperature === 0) {
      if (!masking) return argmax(logits);
      const top = argmax(logits);
      if (!ends.includes(top)) return top;
      logits = Float32Array.from(logits);
      for (const e of ends) logits[e] = -Infinity;
      return argmax(logits);
    }
    if (masking) {
      logits = Float32Array.from(logits);
      for (const e of ends) logits[e] = -Infinity;
    }
    const V = logits.length;
    let scores = Float64Array.from(logits, (x) => x / temperature);
    if (topK !== null && topK < V) {
      const kth = Float64Array.from(scores).sort()[V - topK];
      scores = scores.map((x) => (x < kth ? -Infinity : x));
    }
    let max = -Infinity;
    for (const x of scores) if (x > max) max = x;
    let probs = scores.map((x) => Math.exp(x - max));
    let total = probs.reduce((a, b) => a + b, 0);
    probs = probs.map((p) => p / total);
    if (topP !== null && topP < 1) {
      const order = [...probs.keys()].sort((a, b) => probs[b] - probs[a]);
      const keep = new Uint8Array(V);
      let mass = 0;
      for (const i of order) {
        if (mass < topP) keep[i] = 1;
        mass += probs[i];
      }
      probs = probs.map((p, i) => (keep[i] ? p : 0));
      total = probs.reduce((a, b) => a + b, 0);
      probs = probs.map((p) => p / total);
    }
    const draw = rng.random();
    let cumulative = 0;
    let picked = 0;
    for (let i = 0; i < V; i++) {
      cumulative += probs[i];
      if (cumulative < draw) picked++;
    }
    return Math.min(picked, V - 1);
  };
}
