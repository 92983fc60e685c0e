// The page: one export and its bank's tasks; generate (tokens stream in) or classify what is typed.

import * as ort from "onnxruntime-web";

import { load } from "../src/index.js";

const $ = (id) => document.getElementById(id);
ort.env.wasm.wasmPaths = "/node_modules/onnxruntime-web/dist/";
ort.env.wasm.numThreads = Number(new URLSearchParams(location.search).get("threads") ?? 2);

function show(error) {
  $("error").textContent = error ? `${error.name}: ${error.message}` : "";
}

let model;

/** Load the export picked in the page, with the bank's tasks; the previous model goes. */
async function open(name) {
  $("generate").disabled = $("classify").disabled = true;
  $("status").textContent = `loading ${name}…`;
  window.softprompt = { ready: false };
  show(null);
  try {
    const tasks = await (await fetch("/api/tasks")).json();
    const started = performance.now();
    model = await load(`/exports/${name}/`, { ort, bank: tasks.length ? "/bank/" : undefined, tasks, sessionOptions: { executionProviders: ["wasm"] } });
    const chosen = $("task").value;
    $("task").replaceChildren(new Option("(none)", ""), ...model.tasks.map((task) => new Option(task, task)));
    if (model.tasks.includes(chosen)) $("task").value = chosen;
    $("status").textContent = `${name} loaded in ${((performance.now() - started) / 1000).toFixed(1)} s; ${model.tasks.length} tasks; ${crossOriginIsolated ? ort.env.wasm.numThreads : 1} threads`;
    $("generate").disabled = $("classify").disabled = false;
    window.softprompt = { model, export: name, ready: true };
  } catch (error) {
    $("status").textContent = `${name} not loaded`;
    show(error);
    window.softprompt = { error: error.message, ready: true };
  }
}

const names = await (await fetch("/api/exports")).json();
$("export").replaceChildren(...names.map((name) => new Option(name, name)));
$("export").addEventListener("change", () => open($("export").value));
await open(names[0]);

$("generate").addEventListener("click", async () => {
  show(null);
  $("output").textContent = "";
  $("scores").textContent = "";
  const options = { task: $("task").value || null, maxNewTokens: Number($("tokens").value) };
  const started = performance.now();
  let first = null;
  let tokens = 0;
  try {
    for await (const state of model.steps(model.templated($("input").value, model.task(options.task)), options.task, { maxNewTokens: options.maxNewTokens })) {
      tokens = state.ids.length;
      first ??= performance.now();
      $("output").textContent = state.stableText();
    }
    const seconds = (performance.now() - first) / 1000;
    $("speed").textContent = `first token ${((first - started) / 1000).toFixed(2)} s, ${tokens > 1 ? ((tokens - 1) / seconds).toFixed(1) : "-"} tokens/s`;
    $("output").dataset.done = "yes";
  } catch (error) {
    show(error);
  }
});

$("classify").addEventListener("click", async () => {
  show(null);
  $("scores").textContent = "";
  try {
    const result = await model.classify($("input").value, $("task").value || null);
    $("scores").textContent = [`label: ${result.label}`, ...Object.entries(result.scores).map(([l, p]) => `${l}: ${p.toFixed(4)}`)].join("\n");
    $("scores").dataset.label = result.label;
  } catch (error) {
    show(error);
  }
});
