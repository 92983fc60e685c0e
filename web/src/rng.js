// numpy's default_rng(seed).random(): SeedSequence, then PCG64 (XSL-RR 128/64), so that a seeded request samples
// in a page what it samples in the Python runtime (sampling.js draws one random() per token, as numpy does).

const M32 = 0xffffffffn;
const M64 = (1n << 64n) - 1n;
const M128 = (1n << 128n) - 1n;
const MULTIPLIER = (0x2360ed051fc65da4n << 64n) | 0x4385df649fccf645n;
const [INIT_A, MULT_A, INIT_B, MULT_B] = [0x43b0d7e5n, 0x931e8875n, 0x8b51f9ddn, 0x58f38dedn];
const [MIX_MULT_L, MIX_MULT_R] = [0xca01f9ddn, 0x4973f715n];
const POOL = 4;

/** numpy.random.SeedSequence(seed).generate_state(words, uint32), for a whole-number seed >= 0. */
export function seedState(seed, words) {
  let entropy = [];
  for (let value = BigInt(seed); ; value >>= 32n) {
    entropy.push(value & M32);
    if (value >> 32n === 0n) break;
  }
  let hashConst = INIT_A;
  const hashmix = (value) => {
    value = (value ^ hashConst) & M32;
    hashConst = (hashConst * MULT_A) & M32;
    value = (value * hashConst) & M32;
    return value ^ (value >> 16n);
  };
  const mix = (x, y) => {
    let result = (MIX_MULT_L * x - MIX_MULT_R * y) & M32;
    return result ^ (result >> 16n);
  };
  const pool = [];
  for (let i = 0; i < POOL; i++) pool.push(hashmix(i < entropy.length ? entropy[i] : 0n));
  for (let src = 0; src < POOL; src++)
    for (let dst = 0; dst < POOL; dst++) if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
  for (let src = POOL; src < entropy.length; src++)
    for (let dst = 0; dst < POOL; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src]));
  let constB = INIT_B;
  const out = [];
  for (let i = 0; i < words; i++) {
    let value = (pool[i % POOL] ^ constB) & M32;
    constB = (constB * MULT_B) & M32;
    value = (value * constB) & M32;
    out.push(value ^ (value >> 16n));
  }
  return out;
}

/** numpy's Generator(PCG64(seed)): `random()` gives what `np.random.default_rng(seed).random()` gives. */
export class NumpyRandom {
  constructor(seed) {
    if (seed === null || seed === undefined) seed = BigInt(Math.floor(Math.random() * 2 ** 52));
    const words = seedState(seed, 8); // 4 uint64: state high, low, increment high, low (little-endian pairs)
    const u64 = (i) => words[2 * i] | (words[2 * i + 1] << 32n);
    const initState = (u64(0) << 64n) | u64(1);
    const initSeq = (u64(2) << 64n) | u64(3);
    this.inc = ((initSeq << 1n) | 1n) & M128;
    this.state = 0n;
    this.step();
    this.state = (this.state + initState) & M128;
    this.step();
  }

  step() {
    this.state = (this.state * MULTIPLIER + this.inc) & M128;
  }

  nextUint64() {
    this.step();
    const state = this.state;
    const rot = Number(state >> 122n);
    const xored = ((state >> 64n) ^ state) & M64;
    return ((xored >> BigInt(rot)) | (xored << BigInt((64 - rot) & 63))) & M64;
  }

  /** A double in [0, 1), as numpy's `random()`. */
  random() {
    return Number(this.nextUint64() >> 11n) * (1 / 9007199254740992);
  }
}
