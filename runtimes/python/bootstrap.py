"""nimbus Python runtime shim: loads a Lambda-style handler and serves invocations.

Speaks the frame protocol of docs/runtime-protocol.md over fd 3. Started by the host as
`python3 -I -S bootstrap.py` with cwd = LAMBDA_TASK_ROOT, or, with NIMBUS_STEM=1, as a
stem cell: it says `R {"stem": true}` with no function yet and waits for an `A` frame
carrying the handler and the function's environment (the host has mounted the code at
`taskRoot` by then).

Cold start is the point of this file, so it imports almost nothing: `posix` and `time`
are built in, and JSON goes through the `_json` C accelerator directly because the
`json` package pulls in `re` and `enum` and doubles the interpreter's start-up time.
`traceback`, `asyncio` and the `json` fallback are imported only when needed.
"""

import sys
import posix
import time

_FD = 3
# The host refuses bigger frames; we answer with an error the caller understands instead.
_MAX_RESPONSE = 6 * 1024 * 1024
_ENV = posix.environ


def _env(name, default=None):
    v = _ENV.get(name.encode())
    return default if v is None else v.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- JSON

class _DecodeCtx:
    # The attributes the C scanner reads; the same defaults as json.loads.
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {
        "-Infinity": float("-inf"),
        "Infinity": float("inf"),
        "NaN": float("nan"),
    }.__getitem__
    memo = {}


def _default(o):
    # DynamoDB hands out Decimals; Lambda's marshaller serialises them as numbers.
    dec = sys.modules.get("decimal")
    if dec is not None and isinstance(o, dec.Decimal):
        return int(o) if o == o.to_integral_value() else float(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


try:
    from _json import make_scanner as _mk_scanner
    from _json import make_encoder as _mk_encoder
    from _json import encode_basestring as _enc_str

    _scan = _mk_scanner(_DecodeCtx())

    def _loads(s):
        i, n = 0, len(s)
        while i < n and s[i] in " \t\n\r":
            i += 1
        try:
            obj, end = _scan(s, i)
        except StopIteration as e:
            raise ValueError(f"Expecting value at char {e.value}") from None
        while end < n and s[end] in " \t\n\r":
            end += 1
        if end != n:
            raise ValueError(f"Extra data at char {end}")
        return obj

    def _dumps(o):
        # Same settings as json.dumps(o, ensure_ascii=False, allow_nan=False): NaN is
        # not JSON and the host would reject the frame.
        enc = _mk_encoder({}, _default, _enc_str, None, ": ", ", ", False, False, False)
        return "".join(enc(o, 0))

    _dumps(None)
    _loads("{}")
except Exception:  # another interpreter's _json: use the slow, sure path
    import json as _json_mod

    _loads = _json_mod.loads

    def _dumps(o):
        return _json_mod.dumps(o, ensure_ascii=False, allow_nan=False, default=_default)


# ---------------------------------------------------------------- frames

def _read_exact(n):
    chunks = []
    while n:
        try:
            b = posix.read(_FD, n if n < 1048576 else 1048576)
        except InterruptedError:
            continue
        if not b:
            return None
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def _wait_readable():
    """Blocks in poll() until a frame arrives, rather than in read(). The host's read of
    our last result frees socket buffer space, and Linux then wakes whoever sleeps on
    this socket for "writable": a blocked read() is woken by that and sleeps again (a
    wasted context switch per invocation), a poll() for POLLIN filters it out."""
    global _wait_readable
    try:
        import select

        p = select.poll()
        p.register(_FD, select.POLLIN)
        _wait_readable = p.poll
    except Exception:  # no poll(): plain blocking reads still work
        _wait_readable = lambda: None  # noqa: E731
    _wait_readable()


def _read_frame():
    _wait_readable()
    head = _read_exact(5)
    if head is None:
        return None, None
    n = int.from_bytes(head[1:5], "big")
    body = _read_exact(n) if n else b""
    if body is None:
        return None, None
    return head[0:1], body


def _flush():
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            pass


def _send(kind, payload, tag=b""):
    # Logs written so far belong to this invocation: they must reach the pipe first.
    _flush()
    n = len(tag) + len(payload)
    data = memoryview(kind + n.to_bytes(4, "big") + tag + payload)
    while data:
        try:
            n = posix.write(_FD, data)
        except InterruptedError:
            continue
        data = data[n:]


def _send_json(kind, obj, tag=b""):
    _send(kind, _dumps(obj).encode("utf-8", "replace"), tag)



def _error(error_type, message, trace=None):
    return {"errorType": error_type, "errorMessage": message, "stackTrace": trace or []}


def _log_error(err):
    # Lambda writes "[ERROR] Type: message" and the traceback into the function's log.
    lines = [f"[ERROR] {err['errorType']}: {err['errorMessage']}"]
    if err["stackTrace"]:
        lines.append("Traceback (most recent call last):")
        lines.extend(t.rstrip("\n") for t in err["stackTrace"])
    try:
        sys.stderr.write("\n".join(lines) + "\n")
    except Exception:
        pass


def _trace(exc):
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    # Drop the shim's own frames so the trace starts in user code, as Lambda does.
    while frames and frames[0].filename == _SHIM_FILE:
        frames = frames[1:]
    return traceback.format_list(frames)


# ---------------------------------------------------------------- init

def _load_handler(spec):
    """Returns the handler or an error dict in Lambda's init-error vocabulary."""
    modname, sep, fname = spec.rpartition(".")
    if not sep or not modname or not fname:
        return _error(
            "Runtime.MalformedHandlerName",
            f"Bad handler '{spec}': not enough values to unpack (expected 2, got 1)",
        )
    modpath = modname.replace("/", ".")
    if modpath.split(".")[0] in sys.builtin_module_names:
        return _error(
            "Runtime.BuiltInModuleConflict",
            f"Cannot use built-in module {modname} as a handler module",
        )
    try:
        __import__(modpath)
        mod = sys.modules[modpath]
    except ImportError as e:
        return _error(
            "Runtime.ImportModuleError", f"Unable to import module '{modname}': {e}"
        )
    except SyntaxError as e:
        return _error(
            "Runtime.UserCodeSyntaxError",
            f"Syntax error in module '{modname}': {e}",
            [f'  File "{e.filename}" Line {e.lineno}\n    {(e.text or "").strip()}\n'],
        )
    except BaseException as e:  # the module raised (or called sys.exit) while loading
        return _error(type(e).__name__, str(e), _trace(e))
    fn = getattr(mod, fname, None)
    if fn is None:
        return _error(
            "Runtime.HandlerNotFound", f"Handler '{fname}' missing on module '{modname}'"
        )
    if not callable(fn):
        return _error(
            "Runtime.HandlerNotFound",
            f"Handler '{fname}' on module '{modname}' is not callable",
        )
    return fn


# ---------------------------------------------------------------- context

class _CognitoIdentity:
    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self, d):
        self.cognito_identity_id = d.get("cognitoIdentityId")
        self.cognito_identity_pool_id = d.get("cognitoIdentityPoolId")


class _Obj:
    def __init__(self, d, fields):
        for f in fields:
            setattr(self, f, d.get(f))


class LambdaContext:
    # Set once by _bind_context (a stem cell learns them late): they do not change for
    # the life of the instance.
    function_name = None
    function_version = None
    # A str, as in Lambda's own runtime (awslambdaric reads the env var verbatim).
    memory_limit_in_mb = None
    log_group_name = None
    log_stream_name = None

    def __init__(self, request_id, deadline_ms, arn, identity=None, client_context=None):
        self.aws_request_id = request_id
        self.invoked_function_arn = arn
        self.tenant_id = None
        self._deadline_ms = deadline_ms
        self.identity = _CognitoIdentity(identity if isinstance(identity, dict) else {})
        self.client_context = None
        if isinstance(client_context, dict):
            cc = _Obj(client_context, ("custom", "env", "client"))
            if isinstance(cc.client, dict):
                cc.client = _Obj(
                    cc.client,
                    (
                        "installation_id",
                        "app_title",
                        "app_version_name",
                        "app_version_code",
                        "app_package_name",
                    ),
                )
            self.client_context = cc

    def get_remaining_time_in_millis(self):
        left = self._deadline_ms - int(time.time() * 1000)
        return left if left > 0 else 0

    def log(self, msg):
        sys.stdout.write(str(msg))

    def __repr__(self):
        return (
            f"LambdaContext([aws_request_id={self.aws_request_id},"
            f"function_name={self.function_name},"
            f"function_version={self.function_version},"
            f"invoked_function_arn={self.invoked_function_arn}])"
        )


def _bind_context():
    c = LambdaContext
    c.function_name = _env("AWS_LAMBDA_FUNCTION_NAME")
    c.function_version = _env("AWS_LAMBDA_FUNCTION_VERSION")
    c.memory_limit_in_mb = _env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
    c.log_group_name = _env("AWS_LAMBDA_LOG_GROUP_NAME")
    c.log_stream_name = _env("AWS_LAMBDA_LOG_STREAM_NAME")


# ---------------------------------------------------------------- logging module

_request_id = ""
_logging_ready = False


def _setup_logging():
    """Lambda gives the root logger a handler with its line format. Importing `logging`
    costs more than the rest of this shim, so we only do it once user code has."""
    global _logging_ready
    logging = sys.modules.get("logging")
    if logging is None:
        return
    _logging_ready = True
    root = logging.getLogger()
    if root.handlers:  # the user configured logging already
        return

    class _Handler(logging.Handler):
        def emit(self, record):
            try:
                sys.stdout.write(self.format(record))
            except Exception:
                self.handleError(record)

    class _Filter(logging.Filter):
        def filter(self, record):
            record.aws_request_id = _request_id
            return True

    logging.Formatter.converter = time.gmtime
    h = _Handler()
    h.setFormatter(
        logging.Formatter(
            "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s\n",
            "%Y-%m-%dT%H:%M:%S",
        )
    )
    h.addFilter(_Filter())
    root.addHandler(h)
    level = _env("AWS_LAMBDA_LOG_LEVEL")
    if level and level.upper() in logging._nameToLevel:
        root.setLevel(level.upper())


# ---------------------------------------------------------------- invoke

def _setenv(key, value):
    # What os.environ[key] = value does (its mapping is posix.environ), without
    # needing `os`: the C environment for subprocesses, the dict for os.environ.
    if value is not None:
        _ENV[key.encode("utf-8", "surrogateescape")] = value.encode("utf-8", "surrogateescape")
        posix.putenv(key, value)
    elif _ENV.pop(key.encode("utf-8", "surrogateescape"), None) is not None:
        posix.unsetenv(key)


_trace_id = None


def _set_trace_id(trace_id):
    # Most invocations carry no trace id: skip the environment update when nothing changes.
    global _trace_id
    trace_id = trace_id or None
    if trace_id != _trace_id:
        _trace_id = trace_id
        _setenv("_X_AMZN_TRACE_ID", trace_id)


def _invoke(handler, body):
    """Runs one invocation; returns the result frame's kind, payload and tag (the request
    id and a newline, so the host can tell our answer from a frame the handler wrote to
    fd 3 itself)."""
    global _request_id
    tag = b"\n"
    try:
        req = _loads(body.decode("utf-8", "surrogatepass"))
        tag = str(req.get("requestId", "")).encode("utf-8", "surrogatepass") + b"\n"
        event = req.get("event")
        ctx = LambdaContext(
            req.get("requestId", ""),
            int(req.get("deadlineMs") or 0),
            req.get("invokedFunctionArn"),
            req.get("identity"),
            req.get("clientContext"),
        )
    except Exception as e:
        return b"E", _error("Runtime.UnmarshalError", f"Unable to unmarshal input: {e}"), tag
    _request_id = ctx.aws_request_id
    _set_trace_id(req.get("traceId"))
    if not _logging_ready:
        _setup_logging()
    try:
        result = handler(event, ctx)
        if hasattr(result, "__await__"):  # lenient: an `async def` handler
            import asyncio

            async def _await(aw):
                return await aw

            result = asyncio.run(_await(result))
    except SystemExit as e:
        err = _error(
            "Runtime.ExitError", f"Handler exited with sys.exit({e.code!r})", _trace(e)
        )
        _log_error(err)
        return b"E", err, tag
    except BaseException as e:
        err = _error(type(e).__name__, str(e), _trace(e))
        _log_error(err)
        return b"E", err, tag
    try:
        if isinstance(result, (bytes, bytearray)):  # Lambda passes bytes through
            payload = bytes(result)
            _loads(payload.decode("utf-8"))
        else:
            payload = _dumps(result).encode("utf-8")
    except Exception as e:
        err = _error("Runtime.MarshalError", f"Unable to marshal response: {e}")
        _log_error(err)
        return b"E", err, tag
    if len(payload) > _MAX_RESPONSE:
        err = _error(
            "Function.ResponseSizeTooLarge",
            f"Response payload size ({len(payload)} bytes) exceeded maximum allowed "
            f"payload size ({_MAX_RESPONSE} bytes).",
        )
        _log_error(err)
        return b"E", err, tag
    return b"S", payload, tag


# The name our frames carry in tracebacks (also right when the host runs a compiled .pyc).
_SHIM_FILE = _invoke.__code__.co_filename


# ---------------------------------------------------------------- stem cells

# What the `A` payload's fields become (Lambda's reserved variables).
_ASSIGN_ENV = (
    ("functionName", "AWS_LAMBDA_FUNCTION_NAME"),
    ("functionVersion", "AWS_LAMBDA_FUNCTION_VERSION"),
    ("memoryLimitMB", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"),
    ("logGroupName", "AWS_LAMBDA_LOG_GROUP_NAME"),
    ("logStreamName", "AWS_LAMBDA_LOG_STREAM_NAME"),
)


def _preload():
    """What handlers almost always import, loaded while nobody waits: a stem cell's
    cold start then only pays for the function's own code."""
    import os  # noqa: F401
    import json  # noqa: F401
    import traceback  # noqa: F401

    # The compiler's first use costs about a millisecond; the function's module (no
    # __pycache__ unless its deploy compiled one) would otherwise pay it.
    exec(compile("def handler(event, context):\n    return {'k': [event, 1.5]}\n", "<warm>", "exec"), {})


def _fail_init(err):
    _log_error(err)
    try:
        _send_json(b"F", err)
    finally:
        posix._exit(1)


def _await_assignment():
    """Blocks until the host's `A` frame; returns its payload (EOF: exit quietly)."""
    while True:
        kind, body = _read_frame()
        if kind is None:
            _flush()
            posix._exit(0)
        if kind == b"A":
            break
        if kind == b"I":
            _fail_init(_error("Runtime.InvalidState", "invocation before assignment"))
        # other host frames are for newer shims
    try:
        a = _loads(body.decode("utf-8", "surrogatepass"))
        if not isinstance(a, dict):
            raise ValueError("the assignment is not a JSON object")
        env = a.get("env") or {}
        if not isinstance(env, dict):
            raise ValueError("env is not an object")
        if not isinstance(a.get("handler"), str):
            raise ValueError("handler is not a string")
    except Exception as e:
        _fail_init(_error("Runtime.InvalidAssignment", f"Unable to read the assignment: {e}"))
    return a


def _apply_assignment(a):
    """The function's environment, then Lambda's reserved variables (which win), then
    its code as the working directory. Returns the task root."""
    root = a.get("taskRoot") or "/var/task"
    try:
        for k, v in a["env"].items() if a.get("env") else ():
            _setenv(str(k), str(v))
        for field, var in _ASSIGN_ENV:
            v = a.get(field)
            if v is not None:
                _setenv(var, str(v))
        _setenv("_HANDLER", a["handler"])
        _setenv("LAMBDA_TASK_ROOT", root)
        _setenv("NIMBUS_STEM", None)
        posix.chdir(root)
    except Exception as e:
        _fail_init(_error("Runtime.InvalidAssignment", f"Unable to apply the assignment: {e}"))
    return root


def main():
    # Subprocesses of the handler must not inherit (and be able to write to) the channel.
    posix.set_inheritable(_FD, False)
    # Line-buffered output (not `-u`): a print() is one write, not one per argument and
    # newline, and a complete line still reaches the log at once, so a function that
    # is then killed at its deadline keeps what it printed. _send flushes the rest
    # before each frame.
    try:
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
    except Exception:
        pass
    # The code is read-only in the sandbox (and content-addressed outside it): reading a
    # shipped __pycache__ is fine, trying to write one is wasted time.
    sys.dont_write_bytecode = True
    v = sys.version_info
    runtime = f"python {v[0]}.{v[1]}.{v[2]}"
    if _env("NIMBUS_STEM") == "1":
        _preload()
        _send_json(b"R", {"stem": True, "runtime": runtime})
        root = _apply_assignment(_await_assignment())
        ready = {"taggedResults": True}
    else:
        root = _env("LAMBDA_TASK_ROOT") or posix.getcwd()
        ready = {"runtime": runtime, "taggedResults": True}
    _bind_context()
    sys.path.insert(0, root)
    handler = _load_handler(_env("_HANDLER", ""))
    if isinstance(handler, dict):
        _fail_init(handler)
    _setup_logging()
    _send_json(b"R", ready)
    while True:
        kind, body = _read_frame()
        if kind is None:
            break
        if kind != b"I":
            continue  # unknown host frames are for newer shims
        out, result, tag = _invoke(handler, body)
        if out == b"S":
            _send(b"S", result, tag)
        else:
            _send_json(b"E", result, tag)
    _flush()
    posix._exit(0)


main()
