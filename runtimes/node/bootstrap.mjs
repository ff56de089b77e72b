// nimbus Node.js runtime shim: loads a Lambda-style handler and serves invocations.
//
// Speaks the frame protocol of docs/runtime-protocol.md over fd 3. Started by the host as
// `node bootstrap.mjs` with cwd = LAMBDA_TASK_ROOT, or, with NIMBUS_STEM=1, as a stem
// cell: it says `R {"stem": true}` with no function yet and waits for an `A` frame carrying
// the handler and the function's environment (the host has mounted the code at `taskRoot`
// by then). Only three core modules are loaded: cold start is the point of this file.

import { Socket } from 'node:net';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { pathToFileURL } from 'node:url';

const FD = 3;
// The host refuses bigger frames; we answer with an error the caller understands instead.
const MAX_RESPONSE = 6 * 1024 * 1024;
const env = process.env;

const sock = new Socket({ fd: FD, readable: true, writable: true });

// `tag` starts a result frame: the request id it answers and a newline, so the host can
// tell our answer from a frame the handler wrote to fd 3 itself.
function frame(kind, payload, tag = '') {
  const body = Buffer.from(tag + payload, 'utf8');
  const head = Buffer.allocUnsafe(5);
  head.write(kind, 0, 'ascii');
  head.writeUInt32BE(body.length, 1);
  return Buffer.concat([head, body]);
}

// Pipes are written synchronously on Linux, but a stream may still hold a backlog (for
// example when stdout is a file or a TTY in tests): logs must land before the result.
async function flushStdio() {
  for (const s of [process.stdout, process.stderr]) {
    if (s.writableLength > 0) await new Promise((r) => s.write('', r));
  }
}

function send(kind, payload, then, tag = '') {
  sock.write(frame(kind, payload, tag), then);
}

function errorPayload(errorType, errorMessage, stackTrace = []) {
  return { errorType, errorMessage, stackTrace };
}

// Lambda reports err.name / err.message / the stack as lines.
function toError(err) {
  if (err instanceof Error || (err && typeof err === 'object' && typeof err.message === 'string')) {
    const stack = typeof err.stack === 'string' ? err.stack.split('\n') : [];
    return errorPayload(String(err.name ?? 'Error'), String(err.message), stack);
  }
  let message;
  if (typeof err === 'string') message = err;
  else {
    try {
      message = JSON.stringify(err) ?? String(err);
    } catch {
      message = String(err);
    }
  }
  return errorPayload('Error', message);
}

function logError(e) {
  const lines = [`[ERROR] ${e.errorType}: ${e.errorMessage}`, ...e.stackTrace.slice(1)];
  process.stderr.write(lines.join('\n') + '\n');
}

// ------------------------------------------------------------------------ init

function initFail(e) {
  logError(e);
  flushStdio().finally(() => send('F', JSON.stringify(e), () => process.exit(1)));
}

function findFile(root, base) {
  for (const ext of ['.js', '.mjs', '.cjs']) {
    const f = `${root}/${base}${ext}`;
    if (existsSync(f)) return f;
  }
  return null;
}

const requireCjs = createRequire(import.meta.url);

// Node's rule: the nearest package.json decides what a `.js` file is.
function inModuleScope(file) {
  let dir = file.slice(0, file.lastIndexOf('/')) || '/';
  for (;;) {
    let text = null;
    try {
      text = readFileSync(`${dir === '/' ? '' : dir}/package.json`, 'utf8');
    } catch {}
    if (text !== null) {
      try {
        return JSON.parse(text).type === 'module';
      } catch {
        return true; // import() reports the broken package.json as Node would
      }
    }
    if (dir === '/') return false;
    dir = dir.slice(0, dir.lastIndexOf('/')) || '/';
  }
}

function looksLikeEsm(err) {
  if (err?.code === 'ERR_REQUIRE_ESM' || err?.code === 'ERR_REQUIRE_ASYNC_MODULE') return true;
  return (
    err instanceof SyntaxError &&
    /\b(import|export)\b|import\.meta|await is only valid/.test(String(err.message))
  );
}

// CommonJS through require, as Lambda's runtime does: import() of CommonJS costs a
// millisecond or more (it scans the source for named exports). ES modules, and files
// that turn out to be ES modules after all, through import().
async function loadModule(file) {
  if (file.endsWith('.mjs') || (file.endsWith('.js') && inModuleScope(file))) {
    return import(pathToFileURL(file).href);
  }
  try {
    return requireCjs(file);
  } catch (err) {
    if (looksLikeEsm(err)) return import(pathToFileURL(file).href);
    throw err;
  }
}

async function loadHandler(root = env.LAMBDA_TASK_ROOT || process.cwd(), spec = env._HANDLER || '') {
  // Ours (and the manifest's) reading: file before the last dot. Lambda's reading: the
  // first dot after the last slash, the rest a property path (`index.api.get`).
  const slash = spec.lastIndexOf('/');
  const lastDot = spec.lastIndexOf('.');
  const firstDot = spec.indexOf('.', slash + 1);
  const splits = [[spec.slice(0, lastDot), [spec.slice(lastDot + 1)]]];
  if (firstDot !== lastDot) {
    splits.push([spec.slice(0, firstDot), spec.slice(firstDot + 1).split('.')]);
  }
  if (lastDot <= slash + 1 || lastDot === spec.length - 1) {
    throw errorPayload('Runtime.MalformedHandlerName', `Bad handler ${spec}`);
  }
  let file = null;
  let path = null;
  for (const [base, props] of splits) {
    file = findFile(root, base);
    if (file) {
      path = props;
      break;
    }
  }
  if (!file) {
    const base = splits[0][0];
    throw errorPayload('Runtime.ImportModuleError', `Error: Cannot find module '${base}'`, [
      `Runtime.ImportModuleError: Error: Cannot find module '${base}'`,
      `    looked for ${root}/${base}.{js,mjs,cjs}`,
    ]);
  }
  let mod;
  try {
    mod = await loadModule(file);
  } catch (err) {
    const e = toError(err);
    if (err instanceof SyntaxError) {
      e.errorType = 'Runtime.UserCodeSyntaxError';
      e.errorMessage = `${err.name}: ${err.message}`;
    } else if (err?.code === 'ERR_MODULE_NOT_FOUND' || err?.code === 'MODULE_NOT_FOUND') {
      e.errorType = 'Runtime.ImportModuleError';
      e.errorMessage = `Error: ${err.message}`;
    }
    throw e;
  }
  const pick = (obj) => path.reduce((o, k) => (o == null ? undefined : o[k]), obj);
  const fn = pick(mod) ?? pick(mod.default);
  if (fn === undefined || fn === null) {
    throw errorPayload('Runtime.HandlerNotFound', `${spec} is undefined or not exported`);
  }
  if (typeof fn !== 'function') {
    throw errorPayload('Runtime.HandlerNotFound', `${spec} is not a function`);
  }
  return fn;
}

// ------------------------------------------------------------------------ invoke

let current = null; // the invocation in flight: { settle }

function makeContext(req, settle) {
  const deadline = Number(req.deadlineMs) || 0;
  const ctx = {
    callbackWaitsForEmptyEventLoop: true,
    functionName: env.AWS_LAMBDA_FUNCTION_NAME,
    functionVersion: env.AWS_LAMBDA_FUNCTION_VERSION,
    invokedFunctionArn: req.invokedFunctionArn,
    // A string, as in Lambda's Node runtime.
    memoryLimitInMB: env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    awsRequestId: req.requestId,
    logGroupName: env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: env.AWS_LAMBDA_LOG_STREAM_NAME,
    identity: req.identity,
    clientContext: req.clientContext,
    getRemainingTimeInMillis: () => Math.max(deadline - Date.now(), 0),
    // Legacy (pre-Node 4) completion methods, still used by old handlers.
    succeed: (result) => settle(null, result),
    fail: (err) => settle(err ?? new Error('handled'), undefined),
    done: (err, result) => settle(err, result),
  };
  return ctx;
}

function invoke(handler, body) {
  let req;
  try {
    req = JSON.parse(body.toString('utf8'));
  } catch (err) {
    finish('E', errorPayload('Runtime.UnmarshalError', `Unable to unmarshal input: ${err.message}`), '\n');
    return;
  }
  const tag = `${req?.requestId ?? ''}\n`;
  if (req.traceId) env._X_AMZN_TRACE_ID = req.traceId;
  else delete env._X_AMZN_TRACE_ID;

  let done = false;
  const settle = (err, result) => {
    if (done) return;
    done = true;
    if (current === inv) current = null;
    if (err !== undefined && err !== null) {
      const e = toError(err);
      logError(e);
      finish('E', e, tag);
      return;
    }
    let json;
    try {
      json = JSON.stringify(result === undefined ? null : result) ?? 'null';
    } catch (e2) {
      const e = errorPayload('Runtime.MarshalError', `Unable to stringify response body: ${e2.message}`);
      logError(e);
      finish('E', e, tag);
      return;
    }
    if (Buffer.byteLength(json, 'utf8') > MAX_RESPONSE) {
      const e = errorPayload(
        'Function.ResponseSizeTooLarge',
        `Response payload size exceeded maximum allowed payload size (${MAX_RESPONSE} bytes).`,
      );
      logError(e);
      finish('E', e, tag);
      return;
    }
    finish('S', json, tag);
  };
  const inv = { settle, tag };
  current = inv;

  const context = makeContext(req, settle);
  const callback = (err, result) => settle(err, result);
  let ret;
  try {
    ret = handler(req.event, context, callback);
  } catch (err) {
    settle(err);
    return;
  }
  if (ret && typeof ret.then === 'function') {
    ret.then(
      (v) => settle(null, v),
      (err) => settle(err ?? new Error('Promise rejected with ' + String(err))),
    );
  } else if (handler.length < 3) {
    // Lambda needs async or a callback; we also accept a plain returned value.
    settle(null, ret);
  }
  // Otherwise a callback-style handler: wait for callback()/context.done().
}

let busy = false;
const queue = [];

function finish(kind, payload, tag) {
  if (dead) return;
  const text = typeof payload === 'string' ? payload : JSON.stringify(payload);
  flushStdio().finally(() =>
    send(
      kind,
      text,
      () => {
        busy = false;
        pump();
      },
      tag,
    ),
  );
}

let handlerFn = null;
let ready = false;
const stem = env.NIMBUS_STEM === '1';
// A stem cell takes nothing but `A` until it has its function.
let assigned = !stem;

function pump() {
  while (!assigned && !dead && queue.length) {
    const [kind, body] = queue.shift();
    if (kind === 'A') {
      assigned = true;
      assign(body);
    } else if (kind === 'I') {
      dead = true;
      initFail(errorPayload('Runtime.InvalidState', 'invocation before assignment'));
    }
    // other host frames are for newer shims
  }
  while (!busy && handlerFn && queue.length) {
    const [kind, body] = queue.shift();
    if (kind !== 'I') continue; // unknown host frames are for newer shims
    busy = true;
    invoke(handlerFn, body);
  }
}

// An error that escapes the handler's promise chain fails the invocation in flight and
// ends the instance, as Lambda does: its state can no longer be trusted.
let dead = false;
function fatal(errorPayloadValue, code) {
  if (dead) return;
  dead = true;
  if (!ready) {
    initFail(errorPayloadValue);
    return;
  }
  logError(errorPayloadValue);
  const inv = current;
  current = null;
  const text = JSON.stringify(errorPayloadValue);
  if (inv) {
    flushStdio().finally(() => send('E', text, () => process.exit(code), inv.tag));
  } else {
    process.exit(code);
  }
}

process.on('uncaughtException', (err) => fatal(toError(err), 129));
process.on('unhandledRejection', (reason) => {
  const msg = reason instanceof Error ? `${reason.name}: ${reason.message}` : String(reason);
  const stack = reason instanceof Error && reason.stack ? reason.stack.split('\n') : [];
  fatal(errorPayload('Runtime.UnhandledPromiseRejection', msg, stack), 128);
});

// ------------------------------------------------------------------------ channel

let buf = Buffer.alloc(0);
sock.on('data', (chunk) => {
  buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
  while (buf.length >= 5) {
    const n = buf.readUInt32BE(1);
    if (buf.length < 5 + n) break;
    queue.push([String.fromCharCode(buf[0]), buf.subarray(5, 5 + n)]);
    buf = buf.subarray(5 + n);
  }
  pump();
});
sock.on('end', () => process.exit(0));
sock.on('error', () => process.exit(1));

async function init(readyPayload) {
  try {
    handlerFn = await loadHandler();
  } catch (err) {
    if (!dead) {
      dead = true;
      initFail(err && typeof err.errorType === 'string' ? err : toError(err));
    }
  }
  if (handlerFn && !dead) {
    ready = true;
    send('R', JSON.stringify(readyPayload));
    pump();
  }
}

// ------------------------------------------------------------------------ stem cells

// What the `A` payload's fields become (Lambda's reserved variables).
const ASSIGN_ENV = [
  ['functionName', 'AWS_LAMBDA_FUNCTION_NAME'],
  ['functionVersion', 'AWS_LAMBDA_FUNCTION_VERSION'],
  ['memoryLimitMB', 'AWS_LAMBDA_FUNCTION_MEMORY_SIZE'],
  ['logGroupName', 'AWS_LAMBDA_LOG_GROUP_NAME'],
  ['logStreamName', 'AWS_LAMBDA_LOG_STREAM_NAME'],
];

// The function's environment, then Lambda's reserved variables (which win), then its
// code as the working directory; then the handler loads as in a normal start.
function assign(body) {
  let root;
  try {
    const a = JSON.parse(body.toString('utf8'));
    if (a === null || typeof a !== 'object' || Array.isArray(a)) {
      throw new Error('the assignment is not a JSON object');
    }
    if (typeof a.handler !== 'string') throw new Error('handler is not a string');
    const fnEnv = a.env ?? {};
    if (typeof fnEnv !== 'object' || Array.isArray(fnEnv)) throw new Error('env is not an object');
    for (const [k, v] of Object.entries(fnEnv)) env[k] = String(v);
    for (const [field, name] of ASSIGN_ENV) {
      if (a[field] !== undefined && a[field] !== null) env[name] = String(a[field]);
    }
    root = typeof a.taskRoot === 'string' && a.taskRoot ? a.taskRoot : '/var/task';
    env._HANDLER = a.handler;
    env.LAMBDA_TASK_ROOT = root;
    delete env.NIMBUS_STEM;
    process.chdir(root);
  } catch (err) {
    dead = true;
    initFail(errorPayload('Runtime.InvalidAssignment', `Unable to apply the assignment: ${err.message}`));
    return;
  }
  init({ taggedResults: true });
}

// Loads a throwaway ES module and a CommonJS one the way a handler loads, so the module
// loader's first-use costs (the CommonJS export lexer alone is a WebAssembly module that
// takes milliseconds to compile) are paid before anyone waits. Best effort.
async function warmLoader() {
  let dir;
  try {
    dir = mkdtempSync(`${tmpdir()}/.nimbus-warm-`);
    writeFileSync(`${dir}/esm.mjs`, 'export const handler = () => 1;\n');
    writeFileSync(`${dir}/cjs.cjs`, 'exports.handler = () => 1;\n');
    await loadHandler(dir, 'esm.handler');
    await loadHandler(dir, 'cjs.handler');
  } catch {
    // a slower first load, nothing worse
  } finally {
    if (dir) {
      try {
        rmSync(dir, { recursive: true, force: true });
      } catch {}
    }
  }
}

const runtime = `node ${process.versions.node}`;
if (stem) {
  await warmLoader();
  send('R', JSON.stringify({ stem: true, runtime }));
  pump();
} else {
  await init({ runtime, taggedResults: true });
}
