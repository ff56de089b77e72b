//! Issue 25, items 1 and 2: the function boundary, end to end over the real binary.
//!
//! 1. A result frame belongs to exactly one invocation: a function that writes frames of
//!    its own to its control fd can end its own instance (502 `function_crashed`) but
//!    can never make a caller receive another caller's result.
//! 2. A result that cannot be decoded (invalid UTF-8, nested deeper than the documented
//!    limit) is a 502 `invalid_result` naming why, on the API, on a route and in the
//!    CLI, never a 200 with `null` or the raw dict.
//!
//! The functions are in `fixtures/frames-*`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// `nimbus_core::result::MAX_RESULT_DEPTH`.
const MAX_DEPTH: usize = 100;

fn deploy(s: &Server, fixture_name: &str) {
    let dir = fixture(fixture_name);
    s.ok(&["deploy", dir.to_str().expect("utf-8 path")]);
}

/// Checks the one rule of item 1 for a call made with `{"n": n}`: its caller got its
/// own output or a 502 `function_crashed` that quotes nothing a function wrote.
/// Returns whether it was its own output.
fn own_or_crashed(function: &str, n: u64, status: u16, env: &Value) -> bool {
    if status == 200 && env["status"] == "success" {
        assert_eq!(
            env["result"],
            json!({ "n": n }),
            "{function}: call {n} received another answer: {env}"
        );
        return true;
    }
    assert_eq!(
        (status, env["error"]["code"].as_str()),
        (502, Some("function_crashed")),
        "{function}: call {n}: {env}"
    );
    let text = env.to_string();
    for leaked in ["injected", "forged", "not json"] {
        assert!(
            !text.contains(leaked),
            "{function}: a stray frame leaked: {text}"
        );
    }
    false
}

/// `count` calls with distinct inputs `first..`, each of which must get its own output.
fn all_own(s: &Server, function: &str, first: u64, count: u64) -> Vec<bool> {
    (first..first + count)
        .map(|n| {
            let (status, env) = invoke(s, function, &json!({ "n": n }));
            assert!(own_or_crashed(function, n, status, &env), "call {n}: {env}");
            env["coldStart"].as_bool().unwrap_or(true)
        })
        .collect()
}

// ---------------------------------------------------------------- item 1

/// The attack of the issue: every call writes an extra `S` frame before returning. Each
/// of 20 callers (distinct inputs) gets its own output or an error, never another's;
/// with result tags it is always the error, since the extra frame comes first.
#[test]
fn an_injected_result_frame_never_answers_any_caller() {
    let s = Server::start();
    deploy(&s, "frames-py");
    for n in 1..=20 {
        let (status, env) = invoke(&s, "frames-py", &json!({ "n": n, "mode": "inject" }));
        assert!(
            !own_or_crashed("frames-py", n, status, &env),
            "the injected frame was taken for the result? {env}"
        );
    }
    // One injection, then 20 honest calls: the shifted answers of the issue would give
    // call k the result of call k-1 from here on.
    let (status, env) = invoke(&s, "frames-py", &json!({ "n": 100, "mode": "inject" }));
    own_or_crashed("frames-py", 100, status, &env);
    let cold = all_own(&s, "frames-py", 101, 20);
    assert!(
        !cold[1..].iter().any(|c| *c),
        "honest calls stay warm: {cold:?}"
    );
}

/// An unparsable frame followed by the runtime's own result ends the instance, in Python
/// and in Node; so does a Node handler's injected frame. The next callers get theirs.
#[test]
fn an_unparsable_or_injected_frame_ends_the_instance_in_python_and_node() {
    let s = Server::start();
    deploy(&s, "frames-py");
    deploy(&s, "frames-node");
    for (function, mode) in [
        ("frames-py", "garbage"),
        ("frames-node", "garbage"),
        ("frames-node", "inject"),
    ] {
        for n in 1..=3 {
            let (status, env) = invoke(&s, function, &json!({ "n": n, "mode": mode }));
            assert!(
                !own_or_crashed(function, n, status, &env),
                "{function} {mode}: {env}"
            );
        }
        all_own(&s, function, 10, 20);
    }
    for n in 200..220 {
        let mode = if n % 2 == 0 { "inject" } else { "plain" };
        let (status, env) = invoke(&s, "frames-node", &json!({ "n": n, "mode": mode }));
        let own = own_or_crashed("frames-node", n, status, &env);
        assert_eq!(own, mode == "plain", "call {n} ({mode}): {env}");
    }
}

/// A frame left over after a result (here: the runtime's real result, after the handler
/// forged one with its own request id) never answers the next caller. Either it arrives
/// before the instance is frozen and the idle check retires the instance (the next
/// caller starts cold, without an error), or the freezer stops the runtime before it is
/// written and it arrives once the instance is thawed for the next call, whose id it
/// does not carry (that call is a 502 `function_crashed`). In an exec function an
/// untagged extra frame ends the instance in the call that wrote it.
#[test]
fn a_frame_left_over_after_a_result_never_answers_the_next_caller() {
    let s = Server::start();
    deploy(&s, "frames-py");
    deploy(&s, "frames-exec");
    for round in 0..3u64 {
        let n = 1000 * (round + 1);
        let (status, env) = invoke(&s, "frames-py", &json!({ "n": n, "mode": "forge" }));
        // The function answered its own call with what it wrote: its own business.
        assert_eq!(status, 200, "{env}");
        assert_eq!(env["result"], json!({ "n": "forged" }), "{env}");
        std::thread::sleep(Duration::from_millis(300));
        let (status, env) = invoke(&s, "frames-py", &json!({ "n": n + 1 }));
        if own_or_crashed("frames-py", n + 1, status, &env) {
            assert_eq!(env["coldStart"], true, "the stale instance served: {env}");
        }
        all_own(&s, "frames-py", n + 2, 5);

        let (status, env) = invoke(&s, "frames-exec", &json!({ "n": n, "mode": "inject" }));
        assert!(!own_or_crashed("frames-exec", n, status, &env), "{env}");
        let cold = all_own(&s, "frames-exec", n + 1, 5);
        assert!(cold[0], "a new instance after the crash: {cold:?}");
    }
}

/// An instance that does not tag its results (the protocol before result tags) is never
/// invoked: the caller gets the init error that says what the protocol asks.
#[test]
fn an_instance_that_does_not_tag_its_results_is_refused_at_init() {
    let s = Server::start();
    deploy(&s, "frames-exec-untagged");
    for _ in 0..2 {
        let (status, env) = invoke(&s, "frames-exec-untagged", &json!({ "n": 1 }));
        let text = env.to_string();
        assert_ne!(env["status"], "success", "{status}: {text}");
        assert!(text.contains("Runtime.UntaggedResults"), "{status}: {text}");
        assert!(text.contains("taggedResults"), "{status}: {text}");
    }
}

/// Well-behaved functions are unaffected: 20 distinct calls, each its own result, warm
/// after the first, in every runtime and in an exec function that tags by hand.
#[test]
fn well_behaved_functions_get_their_own_results_warm() {
    let s = Server::start();
    for f in ["frames-py", "frames-node", "frames-exec"] {
        deploy(&s, f);
        let cold = all_own(&s, f, 1, 20);
        assert!(!cold[1..].iter().any(|c| *c), "{f}: {cold:?}");
    }
    s.ok(&["deploy", example("exec-hello").to_str().expect("path")]);
    for name in ["ada", "bob", "cy"] {
        let (status, env) = invoke(&s, "hello-exec", &json!({ "name": name }));
        assert_eq!(status, 200, "{env}");
        assert_eq!(env["result"]["message"], format!("hello {name}"), "{env}");
    }
}

// ---------------------------------------------------------------- item 2

fn assert_invalid_result(what: &str, status: u16, body: &Value, why: &str) {
    assert_eq!(status, 502, "{what}: {body}");
    assert_eq!(body["error"]["code"], "invalid_result", "{what}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(why),
        "{what}: `{message}` should say `{why}`"
    );
    assert!(
        body.get("result").is_none_or(Value::is_null),
        "{what}: {body}"
    );
}

/// Deep results: the documented limit passes, one level more and serde_json's 128 fail
/// with a 502 `invalid_result` that names the limit; invalid UTF-8 names its byte.
#[test]
fn undecodable_results_are_502_invalid_result_on_the_api() {
    let s = Server::start();
    deploy(&s, "frames-py");
    deploy(&s, "frames-exec");
    let (status, env) = invoke(
        &s,
        "frames-py",
        &json!({ "mode": "deep", "depth": MAX_DEPTH }),
    );
    assert_eq!((status, &env["status"]), (200, &json!("success")), "{env}");
    let mut v = &env["result"];
    for _ in 0..MAX_DEPTH {
        v = &v[0];
    }
    assert_eq!(v, &json!(1), "the deepest result arrives whole");
    let too_deep = format!("nested deeper than {MAX_DEPTH} levels");
    for depth in [MAX_DEPTH + 1, 128, 500] {
        let (status, env) = invoke(&s, "frames-py", &json!({ "mode": "deep", "depth": depth }));
        assert_invalid_result(&format!("depth {depth}"), status, &env, &too_deep);
    }
    let (status, env) = invoke(&s, "frames-exec", &json!({ "mode": "bad-utf8" }));
    assert_invalid_result("bad UTF-8", status, &env, "invalid UTF-8 at byte 10");
    // The instance answered in protocol: it keeps serving.
    let (status, env) = invoke(&s, "frames-py", &json!({ "n": 1 }));
    assert_eq!((status, &env["result"]), (200, &json!({ "n": 1 })), "{env}");
    assert_eq!(env["coldStart"], false, "{env}");
}

/// On an HTTP route the same results are a 502 `invalid_result`, never the raw dict.
#[test]
fn undecodable_results_are_502_invalid_result_on_a_route() {
    let s = Server::start();
    deploy(&s, "frames-py");
    deploy(&s, "frames-exec");
    let get = |path: &str| {
        let r = s.http().get(s.url(path)).send().expect("route");
        let status = r.status().as_u16();
        let text = r.text().expect("body");
        (status, text)
    };
    // At the limit the proxy response is mapped: its body is the (stringified) list.
    let (status, text) = get(&format!("/frames-py/deep/{MAX_DEPTH}"));
    assert_eq!(status, 200, "{text}");
    assert!(
        text.starts_with("[[[") && !text.contains("statusCode"),
        "{text}"
    );
    let too_deep = format!("nested deeper than {MAX_DEPTH} levels");
    for depth in [MAX_DEPTH + 1, 128] {
        let (status, text) = get(&format!("/frames-py/deep/{depth}"));
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_invalid_result(&format!("route depth {depth}"), status, &body, &too_deep);
    }
    let (status, text) = get("/frames-exec/bad-utf8");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_invalid_result("route bad UTF-8", status, &body, "invalid UTF-8 at byte 32");
}

/// `nimbus invoke -o json` prints the failed envelope with the reason and exits non-zero
/// (it printed "server answered 200 OK" when the result came back as `null`).
#[test]
fn the_cli_reports_an_undecodable_result() {
    let s = Server::start();
    deploy(&s, "frames-py");
    let event = json!({ "mode": "deep", "depth": 128 }).to_string();
    let out = s.cli(&["invoke", "frames-py", "--data", &event, "-o", "json"]);
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let stdout = stdout_of(&out);
    let env: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\nstderr: {}", stderr_of(&out)));
    assert_eq!(env["status"], "invalid_result", "{env}");
    let too_deep = format!("nested deeper than {MAX_DEPTH} levels");
    assert!(
        env["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&too_deep),
        "{env}"
    );
    // The table output names it on stderr.
    let out = s.cli(&["invoke", "frames-py", "--data", &event]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("Nimbus.InvalidResult") && err.contains(&too_deep),
        "{err}"
    );
}
