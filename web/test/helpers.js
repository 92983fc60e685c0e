// What the tests share: the project's Python (the reference runtime), the committed fixture, folder readers.

import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(HERE, "../..");
export const FIXTURE = path.join(ROOT, "tests/fixture");
export const PYTHON = process.env.SOFTPROMPT_PYTHON ?? path.join(ROOT, ".venv/bin/python");

/** Run the Python runtime on `request` (python_reference.py) and return its results. */
export function pythonReference(request) {
  if (!existsSync(PYTHON)) throw new Error(`${PYTHON} missing: run make install, or set SOFTPROMPT_PYTHON`);
  const done = spawnSync(PYTHON, [path.join(HERE, "python_reference.py")], {
    input: JSON.stringify(request),
    encoding: "utf-8",
    maxBuffer: 1 << 26,
  });
  if (done.status !== 0) throw new Error(`the Python reference failed:\n${done.stderr}`);
  return JSON.parse(done.stdout);
}
