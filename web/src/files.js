// Where an export folder or a bank is read from: a URL (fetch, in a page) or anything with `read(name)`.

import { SoftpromptError } from "./errors.js";

/** A reader for `base`: `read(name)` resolves to an ArrayBuffer, or null when the file is not there. */
export function readerOf(base, fetcher = globalThis.fetch) {
  if (base && typeof base.read === "function") return base;
  const root = String(base).endsWith("/") ? String(base) : `${base}/`;
  return {
    where: root,
    async read(name, { cache = "default" } = {}) {
      let response;
      try {
        response = await fetcher(new URL(name, new URL(root, globalThis.location?.href ?? "http://localhost/")), { cache });
      } catch (error) {
        throw new SoftpromptError(`${root}${name}: could not be fetched (${error.message})`);
      }
      if (response.status === 404) return null;
      if (!response.ok) throw new SoftpromptError(`${root}${name}: HTTP ${response.status}`);
      return response.arrayBuffer();
    },
  };
}

export async function readJson(reader, name, Error) {
  const bytes = await reader.read(name, { cache: "no-store" });
  if (bytes === null) return null;
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch (error) {
    throw new Error(`${reader.where ?? ""}${name}: not valid JSON (${error.message})`);
  }
}
