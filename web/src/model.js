// A loaded decoder export and its bank: generate, stream, classify and chat under task prompts, batch 1, on any
// onnxruntime (onnxruntime-web in a page, onnxruntime-node in node). The JavaScript twin of softprompt.runtime.Model.

import { Template } from "@huggingface/jinja";

import { readTask } from "./bank.js";
import { RequestError, UnknownTaskError } from "./errors.js";
import { RowText } from "./rowtext.js";
import { chooser, settingsOf } from "./sampling.js";

function logSoftmax(values) {
  let max = -Infinity;
  for (const x of values) if (x > max) max = x;
  let total = 0;
  for (const x of values) total += Math.exp(x - max);
  const shift = max + Math.log(total);
  return (i) => values[i] - shift;
}

export class Model {
  constructor({ ort, session, config, tokenizer, table, bankReader, taskNames, tasks, chatTemplate, specialTokens }) {
    Object.assign(this, { ort, session, config, tokenizer, table, bankReader, taskNames, chatTemplate, specialTokens });
    this._tasks = tasks;
    this.inputs = new Set(session.inputNames);
    this.pastNames = session.inputNames.filter((n) => n.startsWith("past_key_values."));
    this.presentNames = session.outputNames.filter((n) => n.startsWith("present."));
    this.eos = new Set(config.eos_token_ids ?? []);
  }

  /** The names of the tasks served now. */
  get tasks() {
    return [...this._tasks.keys()];
  }

  /** Read every task of the bank again (hot swap): a task whose files fail keeps its old version, and the error. */
  async reload() {
    const next = new Map();
    const failed = {};
    for (const name of this.taskNames) {
      try {
        next.set(name, await readTask(this.bankReader, name, this.config));
      } catch (error) {
        failed[name] = error;
        if (this._tasks.has(name) && !(error instanceof UnknownTaskError)) next.set(name, this._tasks.get(name));
      }
    }
    this._tasks = next;
    return failed;
  }

  task(name) {
    if (name === null || name === undefined) return null;
    const found = this._tasks.get(name);
    if (!found) throw new UnknownTaskError(`unknown task ${JSON.stringify(name)}; the bank has ${this.tasks.map((t) => JSON.stringify(t)).join(", ") || "no tasks"}`);
    return found;
  }

  encode(text, addSpecialTokens = true) {
    return this.tokenizer.encode(text, { add_special_tokens: addSpecialTokens }).ids;
  }

  decode(ids) {
    const kept = ids.filter((t) => t >= 0);
    return kept.length ? this.tokenizer.decode(kept, { skip_special_tokens: true, clean_up_tokenization_spaces: false }) : "";
  }

  /** Token ids of `text` in the task's template (P-tuning slots as negative ids). */
  templated(text, task) {
    const spec = task?.spec;
    return spec ? spec.encode(text, (t, special) => this.encode(t, special)) : this.encode(text);
  }

  /** One graph call: logits of the kept positions (the last, or all) and the present keys and values. */
  async forward(embeds, length, pastLength, past, firstPosition, allLogits = false) {
    const { ort, config } = this;
    const E = config.hidden_size;
    const total = pastLength + length;
    const feeds = {
      inputs_embeds: new ort.Tensor("float32", embeds, [1, length, E]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
    };
    if (this.inputs.has("position_ids")) {
      feeds.position_ids = new ort.Tensor("int64", BigInt64Array.from({ length }, (_, i) => BigInt(firstPosition + i)), [1, length]);
    }
    if (this.inputs.has("logits_to_keep")) feeds.logits_to_keep = new ort.Tensor("int64", BigInt64Array.of(allLogits ? 0n : 1n), [1]);
    this.pastNames.forEach((name, i) => (feeds[name] = past[i]));
    const out = await this.session.run(feeds);
    return { logits: out.logits, present: this.presentNames.map((n) => out[n]) };
  }

  _past(task) {
    const { ort, config } = this;
    const shape = (p) => [1, config.num_kv_heads, p, config.head_size];
    if (task?.past) return task.past.map((values) => new ort.Tensor("float32", values, shape(task.prefixLength)));
    return this.pastNames.map(() => new ort.Tensor("float32", new Float32Array(0), shape(0)));
  }

  /** [prompt rows, then each id's row] of one input: what the model reads after a prefix task's past. */
  _embed(ids, task) {
    const E = this.config.hidden_size;
    const rows = task?.rows ?? 0;
    const out = new Float32Array((rows + ids.length) * E);
    if (rows) out.set(task.vectors);
    ids.forEach((id, i) => {
      const at = (rows + i) * E;
      if (id >= 0) this.table.row(id, out, at);
      else {
        if (!task || -id > task.innerRows) throw new RequestError(`token id ${id} names a slot vector the task does not have`);
        out.set(task.inner.subarray((-id - 1) * E, -id * E), at);
      }
    });
    return { embeds: out, length: rows + ids.length };
  }

  _check(ids, task, newTokens) {
    const held = task ? (task.past ? task.prefixLength : task.rows + task.innerRows) : 0;
    if (held + ids.length === 0) throw new RequestError("the input is empty and has no task prompt: nothing to continue from");
    if (task?.past && !ids.length) throw new RequestError(`prefix task ${JSON.stringify(task.name)} needs at least one input token`);
    const limit = this.config.max_positions;
    const total = held + ids.length + newTokens;
    if (limit && total > limit) {
      throw new RequestError(`the input needs ${held} prompt + ${ids.length} input + ${newTokens} new = ${total} positions; the model has ${limit}`);
    }
    const bad = ids.filter((t) => t >= this.config.vocab_size);
    if (bad.length) throw new RequestError(`token ids ${bad.slice(0, 5)} are outside [0, ${this.config.vocab_size})`);
  }

  _rowText(task, settings) {
    const labels = task && Object.keys(task.spec.labels).length && !settings.minNewTokens
      ? Object.values(task.spec.verbalizerIds((t, s) => this.encode(t, s)))
      : [];
    return new RowText((ids) => this.decode(ids), this.eos, settings.stop, labels);
  }

  /** The row's state after every generated token (the last is final): the loop `generate` and `stream` drive. */
  async *steps(ids, taskName = null, options = {}) {
    const settings = settingsOf(options);
    const task = this.task(taskName);
    this._check(ids, task, settings.maxNewTokens);
    const state = this._rowText(task, settings);
    const choose = chooser(settings, this.eos);
    const E = this.config.hidden_size;
    let { embeds, length } = this._embed(ids, task);
    let past = this._past(task);
    let pastLength = task?.past ? task.prefixLength : 0;
    let position = pastLength;
    while (true) {
      const { logits, present } = await this.forward(embeds, length, pastLength, past, position);
      const V = this.config.vocab_size;
      const data = logits.data;
      const token = choose(data.subarray(data.length - V));
      state.add(token);
      if (state.ids.length >= settings.maxNewTokens) state.finish();
      yield state;
      if (state.done || options.signal?.aborted) return;
      past = present;
      pastLength += length;
      position += length;
      embeds = new Float32Array(E);
      this.table.row(token, embeds);
      length = 1;
    }
  }

  /** `{text, tokenIds, finishReason, task}` for one text under `options.task`. */
  async generate(text, options = {}) {
    const { task = null, ...rest } = options;
    return this._complete(this.templated(text, this.task(task)), task, rest);
  }

  async _complete(ids, task, options) {
    let state;
    for await (state of this.steps(ids, task, options));
    return { text: state.text, tokenIds: state.ids, finishReason: state.finishReason ?? "length", task };
  }

  /** The generated text in pieces as they become certain (an async iterator). */
  async *stream(text, options = {}) {
    const { task = null, ...rest } = options;
    yield* this._stream(this.templated(text, this.task(task)), task, rest);
  }

  async *_stream(ids, task, options) {
    let shown = 0;
    for await (const state of this.steps(ids, task, options)) {
      const stable = state.stableText();
      if (stable.length > shown) {
        yield stable.slice(shown);
        shown = stable.length;
      }
    }
  }

  /** `{label, scores: {label: probability}}`: each label's verbalizer log-probability after the templated text. */
  async classify(text, taskName) {
    const task = this.task(taskName);
    if (!task || !Object.keys(task.spec.labels).length) {
      throw new RequestError(`task ${JSON.stringify(taskName)} has no labels; classify needs a task with labels`);
    }
    const ids = this.templated(text, task);
    const labels = Object.entries(task.spec.verbalizerIds((t, s) => this.encode(t, s)));
    const sums = [];
    const V = this.config.vocab_size;
    if (labels.every(([, words]) => words.length === 1)) {
      const logits = await this._logits(ids, task);
      const at = logits.subarray(logits.length - V);
      const logp = logSoftmax(at);
      for (const [, words] of labels) sums.push(logp(words[0]));
    } else {
      for (const [, words] of labels) {
        const row = [...ids, ...words];
        const logits = await this._logits(row, task);
        const positions = logits.length / V;
        let sum = 0;
        words.forEach((word, m) => {
          const at = positions - words.length - 1 + m;
          sum += logSoftmax(logits.subarray(at * V, (at + 1) * V))(word);
        });
        sums.push(sum);
      }
    }
    const max = Math.max(...sums);
    const total = sums.reduce((a, s) => a + Math.exp(s - max), 0);
    const scores = Object.fromEntries(labels.map(([label], i) => [label, Math.exp(sums[i] - max) / total]));
    const label = labels[sums.indexOf(max)][0];
    return { label, scores };
  }

  async _logits(ids, task) {
    this._check(ids, task, 0);
    const { embeds, length } = this._embed(ids, task);
    const pastLength = task?.past ? task.prefixLength : 0;
    const { logits } = await this.forward(embeds, length, pastLength, this._past(task), pastLength, true);
    return logits.data;
  }

  /** The text `chat` feeds the model: the export's chat template over `messages`, the task's template on the last
   * user message. */
  renderChat(messages, taskName = null) {
    if (!this.chatTemplate) throw new RequestError("this export has no chat template: the model was not tuned for chat; use generate()");
    const task = this.task(taskName);
    if (task?.innerRows) throw new RequestError(`task ${JSON.stringify(taskName)} places vectors inside its template (a P-tuning pattern); chat cannot`);
    const copy = messages.map((m) => ({ ...m }));
    if (task) {
      const users = copy.flatMap((m, i) => (m.role === "user" ? [i] : []));
      if (!users.length) throw new RequestError(`task ${JSON.stringify(taskName)} has a template for the user's text; the messages have no user message`);
      copy[users.at(-1)].content = task.spec.apply(copy[users.at(-1)].content);
    }
    try { // @huggingface/jinja provides raise_exception (and strftime_now) itself, as transformers does
      return new Template(this.chatTemplate).render({ messages: copy, add_generation_prompt: true, ...this.specialTokens });
    } catch (error) {
      throw new RequestError(`the chat template refused the messages: ${error.message}`);
    }
  }

  /** Answer a conversation in the model's chat format, under the task's soft prompt. */
  async chat(messages, options = {}) {
    const { task = null, ...rest } = options;
    return this._complete(this.encode(this.renderChat(messages, task), false), task, rest);
  }

  streamChat(messages, options = {}) {
    const { task = null, ...rest } = options;
    return this._stream(this.encode(this.renderChat(messages, task), false), task, rest);
  }
}
