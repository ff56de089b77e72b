"""Tests for the runtime shims (runtimes/python, runtimes/node) and examples/exec-hello.

Each test starts a shim exactly as the worker does: a Unix stream socketpair whose child
end is fd 3, stdout and stderr on one pipe, stdin /dev/null, cwd = LAMBDA_TASK_ROOT, and
Lambda's environment. Stdlib only. Run from the repo root:

    python3 runtimes/tests/test_shims.py

It exits non-zero on failure and then prints spawn-to-ready timings (not asserted).
"""

import fcntl
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY_SHIM_DIR = os.path.join(REPO, "runtimes", "python")
NODE_SHIM_DIR = os.path.join(REPO, "runtimes", "node")
EXAMPLES = os.path.join(REPO, "examples")
# The `python3` on PATH may be a slow version-manager shim; the shim's speed is what we
# measure, so run it on the real interpreter.
PYTHON = sys.executable
NODE = shutil.which("node")
TIMEOUT = 15.0


def python_argv():
    return [PYTHON, "-I", "-S", os.path.join(PY_SHIM_DIR, "bootstrap.py")]


def node_argv():
    return [NODE, os.path.join(NODE_SHIM_DIR, "bootstrap.mjs")]


# What a stem cell learns only from the `A` frame.
STEM_UNKNOWN = ("_HANDLER", "LAMBDA_TASK_ROOT", "AWS_LAMBDA_FUNCTION_NAME",
                "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME")


def frame(kind, payload):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return kind + len(body).to_bytes(4, "big") + body


class Instance:
    """One function instance, driven as the host drives it."""

    def __init__(self, argv, task_root, handler, runtime_dir, env=None, stem=False):
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        r, w = os.pipe()
        e = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": "/tmp",
            "TZ": "UTC",
            "_HANDLER": handler,
            "LAMBDA_TASK_ROOT": task_root,
            "LAMBDA_RUNTIME_DIR": runtime_dir,
            "AWS_LAMBDA_FUNCTION_NAME": "fn",
            "AWS_LAMBDA_FUNCTION_VERSION": "3",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
            "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/fn",
            "AWS_LAMBDA_LOG_STREAM_NAME": "2024/01/01/[3]abc",
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_REGION": "local",
            "AWS_DEFAULT_REGION": "local",
            "NIMBUS_CONTROL_FD": "3",
        }
        if stem:
            # A stem cell starts before its function is known: nothing of it in the env.
            for k in STEM_UNKNOWN:
                e.pop(k)
            e["NIMBUS_STEM"] = "1"
        e.update(env or {})
        cfd = child.fileno()

        def to_fd3():
            # dup2 leaves the new descriptor inheritable, so the shim keeps it over exec.
            os.dup2(cfd, 3)

        self.t0 = time.perf_counter()
        # close_fds=False: Popen would otherwise close fd 3 after preexec_fn; every other
        # descriptor of ours is close-on-exec already.
        self.proc = subprocess.Popen(
            argv,
            cwd=task_root,
            env=e,
            stdin=subprocess.DEVNULL,
            stdout=w,
            stderr=w,
            close_fds=False,
            preexec_fn=to_fd3,
        )
        child.close()
        os.close(w)
        self.logfd = r
        fl = fcntl.fcntl(r, fcntl.F_GETFL)
        fcntl.fcntl(r, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        self.log = b""
        self.sock.settimeout(TIMEOUT)
        self.n = 0
        # Whether the last `R` announced tagged results, and the ids of the invocations
        # sent and not answered yet, oldest first: the tags results must carry.
        self.tagged = False
        self.in_flight = []

    def drain(self):
        while True:
            try:
                b = os.read(self.logfd, 65536)
            except BlockingIOError:
                return self.log.decode("utf-8", "replace")
            if not b:
                return self.log.decode("utf-8", "replace")
            self.log += b

    def _exact(self, n):
        data = b""
        while len(data) < n:
            self.drain()  # keep the child from blocking on a full log pipe
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"instance closed the channel; log:\n{self.drain()}")
            data += chunk
        return data

    def recv_raw(self):
        head = self._exact(5)
        n = int.from_bytes(head[1:], "big")
        return head[:1].decode(), self._exact(n) if n else b""

    def recv(self):
        """The next frame as the host reads it: a result frame of a tagged instance must
        start with the oldest unanswered request id and a newline, which is removed."""
        kind, body = self.recv_raw()
        if kind in "SE" and self.in_flight:
            rid = self.in_flight.pop(0)
            tag = rid.encode() + b"\n"
            assert not self.tagged or body.startswith(tag), (kind, body[:80], rid)
            body = body[len(tag):] if self.tagged else body
        body = json.loads(body)
        if kind == "R":
            self.tagged = body.get("taggedResults") is True
        return kind, body

    def ready(self):
        kind, body = self.recv()
        assert kind == "R", (kind, body, self.drain())
        return body

    def request(self, event, deadline_ms=None, request_id=None, **extra):
        self.n += 1
        req = {
            "requestId": request_id or f"req-{self.n}-\u00e9",
            "deadlineMs": deadline_ms or int(time.time() * 1000) + 10_000,
            "invokedFunctionArn": "arn:aws:lambda:local:000000000000:function:fn:live",
            "event": event,
        }
        req.update(extra)
        self.in_flight.append(req["requestId"])
        return frame(b"I", req)

    def invoke(self, event, **kw):
        self.sock.sendall(self.request(event, **kw))
        return self.recv()

    def close(self):
        """EOF on fd 3; returns the exit code."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            self.sock.close()
            self.drain()
            os.close(self.logfd)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            self.sock.close()
            os.close(self.logfd)
        except OSError:
            pass


def write_tree(root, files):
    for rel, text in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(textwrap.dedent(text))


class ShimCase(unittest.TestCase):
    argv = None
    runtime_dir = None

    def start(self, files, handler, env=None, root=None):
        if root is None:
            d = tempfile.TemporaryDirectory()
            self.addCleanup(d.cleanup)
            root = d.name
            write_tree(root, files)
        inst = Instance(self.argv(), root, handler, self.runtime_dir, env)
        inst.root = root
        self.addCleanup(inst.kill)
        return inst

    def start_stem(self):
        # The cwd is not the code: a stem cell gets that only with its assignment.
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        inst = Instance(self.argv(), d.name, "", self.runtime_dir, stem=True)
        self.addCleanup(inst.kill)
        return inst

    def assignment(self, files, handler, **extra):
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        write_tree(d.name, files)
        a = {"handler": handler, "env": {"GREETING": "hi"}, "functionName": "sf",
             "functionVersion": 7, "memoryLimitMB": 256, "logGroupName": "/aws/lambda/sf",
             "logStreamName": "2024/01/01/[7]stem", "taskRoot": d.name}
        a.update(extra)
        return a

    def assertInitFails(self, files, handler, error_type, message_part=""):
        inst = self.start(files, handler)
        kind, body = inst.recv()
        self.assertEqual(kind, "F", body)
        self.assertEqual(body["errorType"], error_type, body)
        self.assertIn(message_part, body["errorMessage"])
        self.assertIsInstance(body["stackTrace"], list)
        self.assertEqual(inst.proc.wait(TIMEOUT), 1)
        return body


class StemCases:
    """Stem mode (NIMBUS_STEM=1), the same for every shim. Subclasses give `files`, a
    handler that reports what it sees, and `bad_files` whose handler cannot load."""

    files = None
    bad_files = None

    def test_stem_assign_then_invoke(self):
        inst = self.start_stem()
        r = inst.ready()
        self.assertIs(r.get("stem"), True, r)
        self.assertTrue(r["runtime"], r)
        a = self.assignment(self.files, "main.handler",
                            env={"GREETING": "hi", "AWS_LAMBDA_FUNCTION_NAME": "not-mine"})
        inst.sock.sendall(frame(b"A", a))
        self.assertEqual(inst.recv(), ("R", {"taggedResults": True}))
        kind, r = inst.invoke({"k": 1})
        self.assertEqual(kind, "S", r)
        self.assertEqual(r["event"], {"k": 1})
        self.assertEqual(r["greeting"], "hi")
        self.assertEqual(r["h"], "main.handler")
        # The reserved variables come from the assignment, whatever its env says.
        self.assertEqual((r["name"], r["envname"]), ("sf", "sf"))
        self.assertEqual((r["version"], r["mem"]), ("7", "256"))
        self.assertEqual((r["group"], r["stream"]), ("/aws/lambda/sf", "2024/01/01/[7]stem"))
        self.assertEqual(r["root"], a["taskRoot"])
        self.assertEqual(os.path.realpath(r["cwd"]), os.path.realpath(a["taskRoot"]))
        self.assertIsNone(r["stem"])
        self.assertEqual(r["region"], "local")  # the stem's own environment stays
        self.assertEqual(inst.invoke(2)[1]["event"], 2)
        self.assertEqual(inst.close(), 0)

    def test_stem_bad_handler_after_assign_fails_init(self):
        inst = self.start_stem()
        inst.ready()
        inst.sock.sendall(frame(b"A", self.assignment(self.bad_files, "main.handler")))
        kind, body = inst.recv()
        self.assertEqual(kind, "F", body)
        self.assertEqual(body["errorType"], "Runtime.HandlerNotFound", body)
        self.assertEqual(inst.proc.wait(TIMEOUT), 1)

    def test_stem_missing_task_root_fails_init(self):
        inst = self.start_stem()
        inst.ready()
        a = self.assignment(self.files, "main.handler", taskRoot="/does/not/exist/nimbus")
        inst.sock.sendall(frame(b"A", a))
        kind, body = inst.recv()
        self.assertEqual((kind, body["errorType"]), ("F", "Runtime.InvalidAssignment"))
        self.assertEqual(inst.proc.wait(TIMEOUT), 1)

    def test_stem_invoke_before_assign_fails(self):
        inst = self.start_stem()
        inst.ready()
        inst.sock.sendall(inst.request({}))
        kind, body = inst.recv()
        self.assertEqual((kind, body["errorType"]), ("F", "Runtime.InvalidState"))
        self.assertEqual(inst.proc.wait(TIMEOUT), 1)

    def test_stem_exits_on_eof_before_assign(self):
        inst = self.start_stem()
        inst.ready()
        self.assertEqual(inst.close(), 0)


# ------------------------------------------------------------------------ python

class TaggedCases:
    """Result frames name the invocation they answer; a frame a handler writes to fd 3
    itself does not, so the host can refuse it. `injecting` is a handler that writes an
    untagged `S` frame (the event) to fd 3 and then returns {"own": event}, or raises
    when the event is "raise"."""

    injecting = None

    def test_results_carry_the_request_id_and_injected_frames_do_not(self):
        inst = self.start(self.injecting, "main.handler")
        self.assertIs(inst.ready().get("taggedResults"), True)
        inst.sock.sendall(inst.request(7, request_id="0190-\u00e9-a"))
        kind, injected = inst.recv_raw()
        self.assertEqual((kind, injected), ("S", b"7"))  # untagged: the host refuses it
        self.assertEqual(inst.recv(), ("S", {"own": 7}))  # tagged with "0190-é-a"
        kind, err = inst.invoke("raise", request_id="b\n")
        self.assertEqual(kind, "E", err)
        inst.sock.sendall(frame(b"I", b"[not an object"))
        kind, body = inst.recv_raw()
        self.assertEqual(kind, "E")
        self.assertTrue(body.startswith(b"\n{"), body[:40])  # no id to echo: never matches


class PythonShim(ShimCase, StemCases, TaggedCases):
    injecting = {"main.py": textwrap.dedent("""
        import os
        def handler(e, c):
            if e == "raise":
                raise ValueError("no")
            p = str(e).encode()
            os.write(3, b"S" + len(p).to_bytes(4, "big") + p)
            return {"own": e}
        """)}
    argv = staticmethod(python_argv)
    runtime_dir = PY_SHIM_DIR
    files = {"main.py": """
        import os, sys
        def handler(e, c):
            g = os.environ.get
            return {"event": e, "greeting": g("GREETING"), "h": g("_HANDLER"),
                    "name": c.function_name, "envname": g("AWS_LAMBDA_FUNCTION_NAME"),
                    "version": c.function_version, "mem": c.memory_limit_in_mb,
                    "group": c.log_group_name, "stream": c.log_stream_name,
                    "root": g("LAMBDA_TASK_ROOT"), "cwd": os.getcwd(), "stem": g("NIMBUS_STEM"),
                    "region": g("AWS_REGION"), "path0": sys.path[0]}
        """}
    bad_files = {"main.py": "other = 1\n"}

    def test_stem_sys_path_and_subprocess_env(self):
        files = {"main.py": """
            import subprocess, sys
            def handler(e, c):
                out = subprocess.run([sys.executable, "-c",
                                      "import os; print(os.environ.get('GREETING'))"],
                                     capture_output=True, text=True).stdout.strip()
                return {"path0": sys.path[0], "child": out}
            """}
        inst = self.start_stem()
        inst.ready()
        a = self.assignment(files, "main.handler")
        inst.sock.sendall(frame(b"A", a))
        inst.ready()
        kind, r = inst.invoke({})
        self.assertEqual((kind, r), ("S", {"path0": a["taskRoot"], "child": "hi"}))

    def test_ready_result_and_eof_exit(self):
        inst = self.start({"main.py": "def handler(e, c):\n    return {'got': e}\n"}, "main.handler")
        self.assertTrue(inst.ready()["runtime"].startswith("python 3."))
        ev = {"a": [1, 2.5, None, True], "s": "h\u00e9llo \u2603"}
        self.assertEqual(inst.invoke(ev), ("S", {"got": ev}))
        self.assertEqual(inst.invoke("plain"), ("S", {"got": "plain"}))
        self.assertEqual(inst.close(), 0)

    def test_context_fields_and_remaining_time(self):
        inst = self.start({"main.py": """
            import time
            def handler(event, context):
                a = context.get_remaining_time_in_millis()
                time.sleep(0.05)
                b = context.get_remaining_time_in_millis()
                return {
                    "id": context.aws_request_id, "name": context.function_name,
                    "version": context.function_version, "arn": context.invoked_function_arn,
                    "mem": context.memory_limit_in_mb, "group": context.log_group_name,
                    "stream": context.log_stream_name,
                    "identity": context.identity.cognito_identity_id,
                    "cc": context.client_context, "a": a, "b": b,
                }
            """}, "main.handler")
        inst.ready()
        kind, r = inst.invoke({}, request_id="rid-7", deadline_ms=int(time.time() * 1000) + 3000)
        self.assertEqual(kind, "S", r)
        self.assertEqual(r["id"], "rid-7")
        self.assertEqual(r["name"], "fn")
        self.assertEqual(r["version"], "3")
        self.assertEqual(r["arn"], "arn:aws:lambda:local:000000000000:function:fn:live")
        self.assertEqual(r["mem"], "128")  # a str, as awslambdaric gives it
        self.assertEqual(r["group"], "/aws/lambda/fn")
        self.assertEqual(r["stream"], "2024/01/01/[3]abc")
        self.assertIsNone(r["identity"])
        self.assertIsNone(r["cc"])
        self.assertTrue(0 < r["a"] <= 3000, r)
        self.assertTrue(r["b"] <= r["a"] - 40, r)
        # A passed deadline reads 0, never negative.
        kind, r = inst.invoke({}, deadline_ms=int(time.time() * 1000) - 5000)
        self.assertEqual((r["a"], r["b"]), (0, 0))

    def test_env_and_sys_path(self):
        inst = self.start({"main.py": """
            import os, sys
            def handler(e, c):
                return {k: os.environ.get(k) for k in
                        ("GREETING", "_HANDLER", "AWS_REGION", "LAMBDA_TASK_ROOT",
                         "_X_AMZN_TRACE_ID")} | {"path0": sys.path[0], "cwd": os.getcwd(),
                                                 "fd3_inheritable": os.get_inheritable(3)}
            """}, "main.handler", env={"GREETING": "hi"})
        inst.ready()
        kind, r = inst.invoke({}, traceId="Root=1-abc")
        self.assertEqual(r["GREETING"], "hi")
        self.assertEqual(r["_HANDLER"], "main.handler")
        self.assertEqual(r["AWS_REGION"], "local")
        self.assertEqual(r["path0"], r["LAMBDA_TASK_ROOT"])
        self.assertEqual(os.path.realpath(r["cwd"]), os.path.realpath(r["LAMBDA_TASK_ROOT"]))
        self.assertEqual(r["_X_AMZN_TRACE_ID"], "Root=1-abc")
        # The handler's own subprocesses must not get the control channel.
        self.assertIs(r["fd3_inheritable"], False)
        kind, r = inst.invoke({})
        self.assertIsNone(r["_X_AMZN_TRACE_ID"])

    def test_exception_is_reported_and_shim_keeps_serving(self):
        inst = self.start({"main.py": """
            def helper(x):
                raise ValueError(f"bad input {x}")
            def handler(e, c):
                if e.get("fail"):
                    helper(e["fail"])
                return "ok"
            """}, "main.handler")
        inst.ready()
        kind, err = inst.invoke({"fail": 42})
        self.assertEqual(kind, "E")
        self.assertEqual(err["errorType"], "ValueError")
        self.assertEqual(err["errorMessage"], "bad input 42")
        self.assertIsInstance(err["stackTrace"], list)
        self.assertIn("in helper", "".join(err["stackTrace"]))
        self.assertNotIn("bootstrap.py", "".join(err["stackTrace"]))
        log = inst.drain()
        self.assertIn("[ERROR] ValueError: bad input 42", log)
        self.assertIn("Traceback (most recent call last):", log)
        self.assertEqual(inst.invoke({}), ("S", "ok"))

    def test_none_marshal_error_and_system_exit(self):
        inst = self.start({"main.py": """
            import sys
            def handler(e, c):
                if e == "none": return None
                if e == "set": return {1, 2}
                if e == "nan": return float("nan")
                if e == "exit": sys.exit(3)
                if e == "kbd": raise KeyboardInterrupt()
                return "alive"
            """}, "main.handler")
        inst.ready()
        self.assertEqual(inst.invoke("none"), ("S", None))
        kind, err = inst.invoke("set")
        self.assertEqual((kind, err["errorType"]), ("E", "Runtime.MarshalError"))
        self.assertIn("set", err["errorMessage"])
        kind, err = inst.invoke("nan")
        self.assertEqual((kind, err["errorType"]), ("E", "Runtime.MarshalError"))
        kind, err = inst.invoke("exit")
        self.assertEqual((kind, err["errorType"]), ("E", "Runtime.ExitError"))
        self.assertIn("3", err["errorMessage"])
        kind, err = inst.invoke("kbd")
        self.assertEqual((kind, err["errorType"]), ("E", "KeyboardInterrupt"))
        self.assertEqual(inst.invoke("x"), ("S", "alive"))
        self.assertIsNone(inst.proc.poll())

    def test_logs_arrive_before_result(self):
        inst = self.start({"main.py": """
            import sys
            def handler(e, c):
                print("to stdout", e)
                sys.stdout.write("no newline")
                print("to stderr", e, file=sys.stderr)
                return 1
            """}, "main.handler")
        inst.ready()
        for i in range(3):
            before = len(inst.drain())
            self.assertEqual(inst.invoke(i), ("S", 1))
            # Nothing more is read from the pipe between the S frame and this check.
            part = inst.log[before:].decode()
            self.assertIn(f"to stdout {i}", part)
            self.assertIn("no newline", part)
            self.assertIn(f"to stderr {i}", part)

    def test_logging_module_gets_lambda_format(self):
        inst = self.start({"main.py": """
            import logging
            logger = logging.getLogger()
            logger.setLevel(logging.INFO)
            def handler(e, c):
                logger.info("info line %s", e)
                return 0
            """}, "main.handler")
        inst.ready()
        inst.invoke("x", request_id="rid-log")
        log = inst.drain()
        self.assertRegex(log, r"\[INFO\]\t\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\trid-log\tinfo line x\n")

    def test_nested_handlers_decimal_async_and_bytes(self):
        files = {
            "pkg/__init__.py": "",
            "pkg/mod.py": "def func(e, c):\n    return 'pkg'\n",
            "raw.py": "def handler(e, c):\n    return b'{\"raw\": true}' if e else b'not json'\n",
            "src/app.py": textwrap.dedent("""
                import decimal
                async def handler(e, c):
                    return {"d": decimal.Decimal("1.5"), "i": decimal.Decimal("7")}
                """),
        }
        inst = self.start(files, "pkg.mod.func")
        inst.ready()
        self.assertEqual(inst.invoke({}), ("S", "pkg"))
        inst = self.start(files, "src/app.handler")
        inst.ready()
        self.assertEqual(inst.invoke({}), ("S", {"d": 1.5, "i": 7}))
        inst = self.start(files, "raw.handler")
        inst.ready()
        self.assertEqual(inst.invoke(1), ("S", {"raw": True}))  # JSON bytes pass through
        kind, err = inst.invoke(0)
        self.assertEqual((kind, err["errorType"]), ("E", "Runtime.MarshalError"))

    def test_large_event_round_trip(self):
        inst = self.start({"main.py": "def handler(e, c):\n    return len(e)\n"}, "main.handler")
        inst.ready()
        big = "x" * (3 * 1024 * 1024)
        self.assertEqual(inst.invoke(big), ("S", len(big)))
        inst = self.start({"main.py": "def handler(e, c):\n    return 'y' * (7 * 1024 * 1024)\n"},
                          "main.handler")
        inst.ready()
        kind, err = inst.invoke({})
        self.assertEqual((kind, err["errorType"]), ("E", "Function.ResponseSizeTooLarge"))

    def test_init_errors(self):
        self.assertInitFails({}, "main.handler", "Runtime.ImportModuleError", "'main'")
        self.assertInitFails({"main.py": "import not_there_xyz\n"}, "main.handler",
                             "Runtime.ImportModuleError", "not_there_xyz")
        self.assertInitFails({"main.py": "x = 1\n"}, "main.handler",
                             "Runtime.HandlerNotFound", "handler")
        self.assertInitFails({"main.py": "handler = 5\n"}, "main.handler",
                             "Runtime.HandlerNotFound", "not callable")
        body = self.assertInitFails({"main.py": "def handler(e, c)\n    pass\n"}, "main.handler",
                                    "Runtime.UserCodeSyntaxError", "main")
        self.assertTrue(body["stackTrace"])
        self.assertInitFails({"main.py": "raise RuntimeError('boom at import')\n"},
                             "main.handler", "RuntimeError", "boom at import")
        self.assertInitFails({"main.py": "import sys\nsys.exit(2)\n"}, "main.handler",
                             "SystemExit")
        self.assertInitFails({"main.py": ""}, "nodot", "Runtime.MalformedHandlerName")

    def test_example_python_hello(self):
        root = os.path.join(EXAMPLES, "python-hello")
        inst = self.start(None, "main.handler", env={"GREETING": "hello"}, root=root)
        inst.ready()
        kind, r = inst.invoke({"name": "ada"}, request_id="r1")
        self.assertEqual((kind, r), ("S", {"message": "hello ada", "function": "fn", "requestId": "r1"}))
        self.assertIn("greeting ada", inst.drain())
        ev = {"version": "2.0", "requestContext": {"http": {"method": "GET"}},
              "pathParameters": {"name": "bob"}}
        self.assertEqual(inst.invoke(ev)[1]["message"], "hello bob")
        self.assertEqual(inst.invoke({})[1]["message"], "hello world")
        self.assertEqual(inst.close(), 0)


# ------------------------------------------------------------------------ node

@unittest.skipUnless(NODE, "node is not installed")
class NodeShim(ShimCase, StemCases, TaggedCases):
    injecting = {"main.mjs": """
        import { writeSync } from 'node:fs';
        export const handler = async (e) => {
          if (e === 'raise') throw new Error('no');
          const p = Buffer.from(String(e));
          const head = Buffer.alloc(5);
          head.write('S', 0, 'ascii');
          head.writeUInt32BE(p.length, 1);
          writeSync(3, Buffer.concat([head, p]));
          return { own: e };
        };
        """}
    argv = staticmethod(node_argv)
    runtime_dir = NODE_SHIM_DIR
    files = {"main.mjs": """
        export const handler = async (e, c) => {
          const g = (k) => process.env[k] ?? null;
          return { event: e, greeting: g('GREETING'), h: g('_HANDLER'), name: c.functionName,
            envname: g('AWS_LAMBDA_FUNCTION_NAME'), version: c.functionVersion,
            mem: c.memoryLimitInMB, group: c.logGroupName, stream: c.logStreamName,
            root: g('LAMBDA_TASK_ROOT'), cwd: process.cwd(), stem: g('NIMBUS_STEM'),
            region: g('AWS_REGION') };
        };
        """}
    bad_files = {"main.mjs": "export const other = 1;\n"}

    def test_esm_async_context_and_eof_exit(self):
        inst = self.start({"index.mjs": """
            export const handler = async (event, context) => {
              const a = context.getRemainingTimeInMillis();
              await new Promise((r) => setTimeout(r, 50));
              const b = context.getRemainingTimeInMillis();
              return { event, a, b, id: context.awsRequestId, name: context.functionName,
                version: context.functionVersion, arn: context.invokedFunctionArn,
                mem: context.memoryLimitInMB, group: context.logGroupName,
                stream: context.logStreamName, wait: context.callbackWaitsForEmptyEventLoop,
                greeting: process.env.GREETING, h: process.env._HANDLER };
            };
            """}, "index.handler", env={"GREETING": "hi"})
        self.assertTrue(inst.ready()["runtime"].startswith("node "))
        kind, r = inst.invoke({"k": [1, "\u2603"]}, request_id="rid-9",
                              deadline_ms=int(time.time() * 1000) + 3000)
        self.assertEqual(kind, "S", r)
        self.assertEqual(r["event"], {"k": [1, "\u2603"]})
        self.assertEqual(r["id"], "rid-9")
        self.assertEqual((r["name"], r["version"], r["mem"]), ("fn", "3", "128"))
        self.assertEqual(r["arn"], "arn:aws:lambda:local:000000000000:function:fn:live")
        self.assertEqual((r["group"], r["stream"]), ("/aws/lambda/fn", "2024/01/01/[3]abc"))
        self.assertIs(r["wait"], True)
        self.assertEqual((r["greeting"], r["h"]), ("hi", "index.handler"))
        self.assertTrue(0 < r["a"] <= 3000 and r["b"] <= r["a"] - 40, r)
        self.assertEqual(inst.close(), 0)

    def test_commonjs_js_cjs_and_type_module(self):
        cases = [
            ({"index.js": "exports.handler = async (e) => 'cjs-js:' + e;\n"}, "cjs-js:"),
            ({"index.cjs": "module.exports = { handler: (e, c, cb) => cb(null, 'cjs:' + e) };\n"},
             "cjs:"),
            ({"index.js": "const h = {}; h.handler = async (e) => 'dyn:' + e; module.exports = h;\n"},
             "dyn:"),
            ({"package.json": '{"type": "module"}',
              "index.js": "export async function handler(e) { return 'esm-js:' + e; }\n"},
             "esm-js:"),
            ({"index.mjs": "export default { handler: async (e) => 'default:' + e };\n"},
             "default:"),
            # ES module syntax in a .js without package.json: require fails, import loads it.
            ({"index.js": "export const handler = async (e) => 'detected:' + e;\n"},
             "detected:"),
            ({"package.json": '{"type": "module"}',
              "index.js": "await Promise.resolve();\nexport const handler = async (e) => 'tla:' + e;\n"},
             "tla:"),
            ({"lib/package.json": '{"type": "module"}',
              "lib/index.js": "export const handler = async (e) => 'nested-scope:' + e;\n"},
             "nested-scope:"),
        ]
        for files, prefix in cases:
            with self.subTest(prefix=prefix):
                handler = "lib/index.handler" if "lib/index.js" in files else "index.handler"
                inst = self.start(files, handler)
                inst.ready()
                self.assertEqual(inst.invoke("x"), ("S", prefix + "x"))

    def test_sync_callback_and_legacy_forms(self):
        inst = self.start({"index.mjs": """
            export const sync = (e) => ({ sync: e });
            export const nothing = () => {};
            export const cb = (e, c, callback) => {
              setTimeout(() => e === 'err' ? callback(new RangeError('cb failed'))
                                           : callback(null, { cb: e }), 10);
            };
            export const legacy = (e, context, callback) => { setTimeout(() => context.succeed('old'), 5); };
            export const twice = async (e, c, callback) => { callback(null, 'first'); return 'second'; };
            """}, "index.sync")
        root = inst.root
        inst.ready()
        self.assertEqual(inst.invoke(1), ("S", {"sync": 1}))
        for handler, event, want in [
            ("nothing", 0, ("S", None)),
            ("cb", "v", ("S", {"cb": "v"})),
            ("legacy", 0, ("S", "old")),
            ("twice", 0, ("S", "first")),
        ]:
            with self.subTest(handler=handler):
                inst = self.start(None, f"index.{handler}", root=root)
                inst.ready()
                self.assertEqual(inst.invoke(event), want)
        inst = self.start(None, "index.cb", root=root)
        inst.ready()
        kind, err = inst.invoke("err")
        self.assertEqual((kind, err["errorType"], err["errorMessage"]), ("E", "RangeError", "cb failed"))
        self.assertEqual(inst.invoke("ok"), ("S", {"cb": "ok"}))

    def test_errors_keep_serving(self):
        inst = self.start({"index.mjs": """
            export const handler = async (e) => {
              if (e === 'throw') null.boom;
              if (e === 'string') throw 'just a string';
              if (e === 'reject') return Promise.reject({ code: 7 });
              if (e === 'undef') return undefined;
              if (e === 'bigint') return { n: 10n };
              return 'fine';
            };
            """}, "index.handler")
        inst.ready()
        kind, err = inst.invoke("throw")
        self.assertEqual((kind, err["errorType"]), ("E", "TypeError"))
        self.assertIn("null", err["errorMessage"])
        self.assertTrue(err["stackTrace"][0].startswith("TypeError"), err)
        self.assertTrue(any("index.mjs" in l for l in err["stackTrace"]), err)
        self.assertIn("[ERROR] TypeError", inst.drain())
        kind, err = inst.invoke("string")
        self.assertEqual((kind, err["errorType"], err["errorMessage"]), ("E", "Error", "just a string"))
        kind, err = inst.invoke("reject")
        self.assertEqual((kind, err["errorType"]), ("E", "Error"))
        self.assertIn("7", err["errorMessage"])
        self.assertEqual(inst.invoke("undef"), ("S", None))
        kind, err = inst.invoke("bigint")
        self.assertEqual((kind, err["errorType"]), ("E", "Runtime.MarshalError"))
        self.assertEqual(inst.invoke("x"), ("S", "fine"))

    def test_uncaught_exception_and_unhandled_rejection_fail_the_invocation(self):
        files = {"index.mjs": """
            export const timer = async () => {
              setTimeout(() => { throw new Error('late boom'); }, 10);
              await new Promise((r) => setTimeout(r, 5000));
              return 'never';
            };
            export const rejection = async () => {
              Promise.reject(new Error('nobody listens'));
              await new Promise((r) => setTimeout(r, 5000));
              return 'never';
            };
            """}
        inst = self.start(files, "index.timer")
        inst.ready()
        t = time.monotonic()
        kind, err = inst.invoke({})
        self.assertEqual((kind, err["errorType"], err["errorMessage"]), ("E", "Error", "late boom"))
        self.assertLess(time.monotonic() - t, 3)
        self.assertEqual(inst.proc.wait(TIMEOUT), 129)
        inst = self.start(files, "index.rejection")
        inst.ready()
        kind, err = inst.invoke({})
        self.assertEqual((kind, err["errorType"]), ("E", "Runtime.UnhandledPromiseRejection"))
        self.assertIn("nobody listens", err["errorMessage"])
        self.assertEqual(inst.proc.wait(TIMEOUT), 128)

    def test_logs_arrive_before_result(self):
        inst = self.start({"index.mjs": """
            export const handler = async (e) => {
              console.log('to stdout', e);
              process.stdout.write('no newline');
              console.error('to stderr', e);
              return 1;
            };
            """}, "index.handler")
        inst.ready()
        for i in range(3):
            before = len(inst.drain())
            self.assertEqual(inst.invoke(i), ("S", 1))
            part = inst.log[before:].decode()
            self.assertIn(f"to stdout {i}", part)
            self.assertIn("no newline", part)
            self.assertIn(f"to stderr {i}", part)

    def test_frames_split_and_batched(self):
        inst = self.start({"index.mjs": "export const handler = async (e) => typeof e === 'number' ? e * 2 : e.length;\n"},
                          "index.handler")
        inst.ready()
        two = inst.request(1) + inst.request(2)
        inst.sock.sendall(two)  # two frames in one write
        self.assertEqual([inst.recv(), inst.recv()], [("S", 2), ("S", 4)])
        one = inst.request(5)
        for piece in (one[:2], one[2:7], one[7:]):  # one frame in three writes
            inst.sock.sendall(piece)
            time.sleep(0.02)
        self.assertEqual(inst.recv(), ("S", 10))
        big = inst.request("x" * (2 * 1024 * 1024))
        inst.sock.sendall(big)
        self.assertEqual(inst.recv(), ("S", 2 * 1024 * 1024))
        self.assertEqual(inst.close(), 0)

    def test_nested_path_and_lambda_property_path(self):
        files = {
            "src/app.js": "exports.handler = async () => 'nested';\n",
            "index.mjs": "export const api = { get: async () => 'prop' };\n",
        }
        inst = self.start(files, "src/app.handler")
        inst.ready()
        self.assertEqual(inst.invoke({}), ("S", "nested"))
        inst = self.start(files, "index.api.get")  # Lambda: module `index`, export `api.get`
        inst.ready()
        self.assertEqual(inst.invoke({}), ("S", "prop"))

    def test_init_errors(self):
        self.assertInitFails({}, "index.handler", "Runtime.ImportModuleError", "index")
        self.assertInitFails({"index.mjs": "export const other = 1;\n"}, "index.handler",
                             "Runtime.HandlerNotFound", "index.handler")
        self.assertInitFails({"index.mjs": "export const handler = 1;\n"}, "index.handler",
                             "Runtime.HandlerNotFound", "not a function")
        self.assertInitFails({"index.mjs": "export const handler = async ( => 1;\n"},
                             "index.handler", "Runtime.UserCodeSyntaxError")
        self.assertInitFails({"index.js": "exports.handler = async ( => 1;\n"},
                             "index.handler", "Runtime.UserCodeSyntaxError")
        self.assertInitFails({"index.mjs": "import x from 'not-there-xyz';\nexport const handler = x;\n"},
                             "index.handler", "Runtime.ImportModuleError", "not-there-xyz")
        self.assertInitFails({"index.js": "require('not-there-xyz');\n"},
                             "index.handler", "Runtime.ImportModuleError", "not-there-xyz")
        self.assertInitFails({"index.mjs": "throw new TypeError('init boom');\n"},
                             "index.handler", "TypeError", "init boom")

    def test_example_node_hello(self):
        root = os.path.join(EXAMPLES, "node-hello")
        inst = self.start(None, "index.handler", env={"GREETING": "hello"}, root=root)
        inst.ready()
        kind, r = inst.invoke({"name": "ada"}, request_id="r1")
        self.assertEqual((kind, r), ("S", {"message": "hello ada", "function": "fn", "requestId": "r1"}))
        self.assertIn("greeting ada", inst.drain())
        ev = {"version": "2.0", "requestContext": {"http": {"method": "GET"}},
              "pathParameters": {"name": "bob"}}
        self.assertEqual(inst.invoke(ev)[1]["message"], "hello bob")
        self.assertEqual(inst.close(), 0)


# ------------------------------------------------------------------------ exec

class ExecExample(unittest.TestCase):
    def test_exec_hello(self):
        root = os.path.join(EXAMPLES, "exec-hello")
        path = os.path.join(root, "handler")
        self.assertTrue(os.access(path, os.X_OK), "handler must be executable")
        # Its shebang is `/usr/bin/env python3`; point PATH's python3 at this interpreter
        # so the test does not depend on a version manager's shim.
        bindir = tempfile.TemporaryDirectory()
        self.addCleanup(bindir.cleanup)
        os.symlink(PYTHON, os.path.join(bindir.name, "python3"))
        env = {"PATH": bindir.name + os.pathsep + os.environ.get("PATH", ""), "GREETING": "hello"}
        inst = Instance([path], root, "handler", root, env)
        self.addCleanup(inst.kill)
        inst.ready()
        kind, r = inst.invoke({"name": "ada"}, request_id="r1")
        self.assertEqual((kind, r), ("S", {"message": "hello ada", "function": "fn", "requestId": "r1"}))
        self.assertIn("greeting ada", inst.drain())
        ev = {"version": "2.0", "requestContext": {}, "pathParameters": {"name": "bob"}}
        self.assertEqual(inst.invoke(ev)[1]["message"], "hello bob")
        self.assertEqual(inst.close(), 0)


# ------------------------------------------------------------------------ timings

def median_ms(fn, n=10):
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def spawn_to_ready(argv, root, handler, runtime_dir):
    def run():
        inst = Instance(argv, root, handler, runtime_dir, {"GREETING": "hello"})
        try:
            inst.ready()
        finally:
            inst.close()
    # Instance() starts the clock inside; include the socketpair/pipe set-up as the host would.
    return median_ms(run)


def stem_assign_to_ready(argv, root, handler, runtime_dir, n=10):
    """A -> R of a stem cell that is already up: the shim's share of a stem cold start."""
    samples = []
    for _ in range(n):
        inst = Instance(argv, tempfile.gettempdir(), "", runtime_dir, stem=True)
        try:
            inst.ready()
            a = {"handler": handler, "env": {"GREETING": "hello"}, "functionName": "fn",
                 "functionVersion": 1, "memoryLimitMB": 128, "taskRoot": root}
            t = time.perf_counter()
            inst.sock.sendall(frame(b"A", a))
            inst.ready()
            samples.append((time.perf_counter() - t) * 1000)
        finally:
            inst.close()
    return statistics.median(samples)


def report_timings():
    rows = [("python3 -I -S -c pass (exit)",
             median_ms(lambda: subprocess.run([PYTHON, "-I", "-S", "-c", "pass"], check=True))),
            ("python shim, spawn -> R",
             spawn_to_ready(python_argv(), os.path.join(EXAMPLES, "python-hello"),
                            "main.handler", PY_SHIM_DIR))]
    rows.append(("python stem, A -> R",
                 stem_assign_to_ready(python_argv(), os.path.join(EXAMPLES, "python-hello"),
                                      "main.handler", PY_SHIM_DIR)))
    if NODE:
        rows += [("node -e 0 (exit)", median_ms(lambda: subprocess.run([NODE, "-e", "0"], check=True))),
                 ("node shim, spawn -> R",
                  spawn_to_ready(node_argv(), os.path.join(EXAMPLES, "node-hello"),
                                 "index.handler", NODE_SHIM_DIR)),
                 ("node stem, A -> R",
                  stem_assign_to_ready(node_argv(), os.path.join(EXAMPLES, "node-hello"),
                                       "index.handler", NODE_SHIM_DIR))]
    print("\nspawn-to-ready (stem: assignment-to-ready), median of 10:")
    for name, ms in rows:
        print(f"  {name:32s} {ms:7.1f} ms")


if __name__ == "__main__":
    prog = unittest.main(exit=False, verbosity=2)
    ok = prog.result.wasSuccessful()
    if ok and os.environ.get("NIMBUS_SKIP_TIMINGS") != "1":
        report_timings()
    sys.exit(0 if ok else 1)
