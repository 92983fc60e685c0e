// Errors a user can act on, one class per kind, as the Python runtime's (softprompt.runtime.errors).

export class SoftpromptError extends Error {
  constructor(message) {
    super(message);
    this.name = this.constructor.name;
  }
}

/** The export folder is not one this library reads (softprompt.json, a table, a graph). */
export class ExportFormatError extends SoftpromptError {}

/** A task file is bad: not .npy, a hash that does not match, another backbone's, the wrong width. */
export class PromptBankError extends SoftpromptError {}

/** A task name the bank does not hold. */
export class UnknownTaskError extends PromptBankError {}

/** A request the model cannot serve (too long, no input, bad settings). */
export class RequestError extends SoftpromptError {}
