// A task's template and labels (softprompt.formats.task.TaskSpec): the text around the input, P-tuning's {soft:N}
// slots (vectors after the lead stand in the ids as -1, -2, ...), and each label's verbalizer ids.

import { PromptBankError } from "./errors.js";

const PLACEHOLDER = "{text}";
const SLOT = /\{soft:(\d+)\}/g;

export class TaskSpec {
  constructor(template = PLACEHOLDER, labels = {}, where = "task record") {
    if (typeof template !== "string" || template.split(PLACEHOLDER).length !== 2) {
      throw new PromptBankError(`${where}: template ${JSON.stringify(template)} must contain ${PLACEHOLDER} exactly once`);
    }
    this.template = template;
    this.labels = { ...labels };
    this.slots = [...template.matchAll(SLOT)].map((m) => Number(m[1]));
  }

  static fromExtra(extra = {}, where) {
    return new TaskSpec(extra.template ?? PLACEHOLDER, extra.labels ?? {}, where);
  }

  /** Vectors before the template's first text (null: no slots, all of them lead). */
  get lead() {
    return this.slots.length ? leadingSlots(this.template)[0] : null;
  }

  apply(text) {
    return this.template.replace(SLOT, "").replace(PLACEHOLDER, () => text);
  }

  /** Token ids of the templated text; `encode(text, addSpecialTokens)` is the model's tokenizer. */
  encode(text, encode) {
    if (!this.slots.length) return encode(this.apply(text), true);
    const rest = leadingSlots(this.template)[1];
    const fill = (piece) => piece.replace(PLACEHOLDER, () => text);
    if (!new RegExp(SLOT.source).test(rest)) return encode(fill(rest), true);
    const [before, after] = specials(encode);
    const ids = [...before];
    let inner = 0;
    let position = 0;
    for (const match of rest.matchAll(SLOT)) {
      const piece = rest.slice(position, match.index);
      if (piece) ids.push(...encode(fill(piece), false));
      const count = Number(match[1]);
      for (let k = 0; k < count; k++) ids.push(-(inner + k + 1));
      inner += count;
      position = match.index + match[0].length;
    }
    if (rest.slice(position)) ids.push(...encode(fill(rest.slice(position)), false));
    return [...ids, ...after];
  }

  /** Each label's ids, tokenized alone without special tokens. */
  verbalizerIds(encode) {
    return Object.fromEntries(Object.entries(this.labels).map(([label, words]) => [label, encode(words, false)]));
  }
}

function leadingSlots(template) {
  let count = 0;
  const lead = /^\{soft:(\d+)\}/;
  for (let m = lead.exec(template); m; m = lead.exec(template)) {
    count += Number(m[1]);
    template = template.slice(m[0].length);
  }
  return [count, template];
}

function specials(encode) {
  const plain = encode("x", false);
  const full = encode("x", true);
  for (let start = 0; start <= full.length - plain.length; start++) {
    if (plain.every((id, i) => full[start + i] === id)) return [full.slice(0, start), full.slice(start + plain.length)];
  }
  return [[], []];
}
