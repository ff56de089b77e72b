//! WebSocket routes end to end, over real sockets: a conversation (connect, messages
//! echoed in order, the connection id in the event), pushes and closes through
//! `/v1/connections/{id}` with a `connections`-scoped key, refusals (no credentials,
//! an unscoped key, `$connect` saying no, a plain GET, a keyed route without a key),
//! the message size limit, `$disconnect` exactly once, and the drain closing sockets.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

type Ws = WebSocket<TcpStream>;

fn create_key(s: &Server, name: &str, scope: &str) -> String {
    let v = s.json(&["keys", "create", name, "--scope", scope]);
    v["key"].as_str().expect("key").to_string()
}

/// Opens a WebSocket to `path` on `addr`, with extra request headers.
fn connect(addr: &str, path: &str, headers: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            http::HeaderValue::from_str(v).expect("value"),
        );
    }
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    match tungstenite::client(req, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            panic!("blocking handshake interrupted")
        }
    }
}

/// The status and JSON error code of a refused upgrade.
fn refusal(r: Result<Ws, tungstenite::Error>) -> (u16, String) {
    match r {
        Err(tungstenite::Error::Http(resp)) => {
            let body: Value = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            (
                resp.status().as_u16(),
                body["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

/// The next data frame as text (pings and pongs skipped).
fn next_text(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("read a frame") {
            Message::Text(t) => return t.as_str().to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// Reads until the server's close frame; its code.
fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match ws.read() {
            Ok(Message::Close(f)) => return f.map(|f| f.code),
            Ok(_) => continue,
            Err(e) => panic!("socket failed before a close frame: {e}"),
        }
    }
}

fn error_code(r: reqwest::blocking::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let body: Value = r.json().unwrap_or(Value::Null);
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

/// The `disconnect <id>` lines the function printed (records are written in batches).
fn disconnect_lines(s: &Server, id: &str, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let logs = s.ok(&["logs", "ws"]);
        let n = logs.matches(&format!("disconnect {id}")).count();
        if n >= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_websocket_conversation_with_pushes_and_closes() {
    let s = Server::start();
    s.ok(&["deploy", fixture("ws-py").to_str().expect("path")]);
    let key = create_key(&s, "pusher", "connections");
    let unscoped = create_key(&s, "caller", "invoke:ws");

    // The conversation: the id in the event, then three echoes in order.
    let mut ws = connect(&s.addr, "/chat?room=a", &[]).expect("connect");
    ws.send(Message::text("whoami")).expect("send");
    let id = next_text(&mut ws);
    assert!(
        id.len() >= 16
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)),
        "{id}"
    );
    for m in ["one", "two", "three"] {
        ws.send(Message::text(m)).expect("send");
    }
    for m in ["one", "two", "three"] {
        assert_eq!(next_text(&mut ws), format!("echo: {m}"));
    }
    // A failing message handler answers AWS's error frame; the connection stays.
    ws.send(Message::text("boom")).expect("send");
    let err: Value = serde_json::from_str(&next_text(&mut ws)).expect("json frame");
    assert_eq!(err["message"], "Internal server error", "{err}");
    assert_eq!(err["connectionId"], id.as_str(), "{err}");
    ws.send(Message::text("still")).expect("send");
    assert_eq!(next_text(&mut ws), "echo: still");

    let conn_url = s.url(&format!("/v1/connections/{id}"));
    let http = s.http();

    // Credentials: none is 401, a key without the scope 403.
    assert_eq!(
        error_code(http.post(&conn_url).body("x").send().expect("post")),
        (401, "unauthorized".into())
    );
    assert_eq!(
        error_code(
            http.post(&conn_url)
                .header("x-api-key", &unscoped)
                .body("x")
                .send()
                .expect("post")
        ),
        (403, "forbidden".into())
    );

    // A scoped key pushes (either header) and reads the connection's info.
    let r = http
        .post(&conn_url)
        .header("x-api-key", &key)
        .body("pushed by key")
        .send()
        .expect("post");
    assert_eq!(r.status(), 200);
    assert_eq!(next_text(&mut ws), "pushed by key");
    let r = http
        .post(&conn_url)
        .bearer_auth(s.token())
        .body("pushed by admin")
        .send()
        .expect("post");
    assert_eq!(r.status(), 200);
    assert_eq!(next_text(&mut ws), "pushed by admin");
    let r = http.get(&conn_url).bearer_auth(&key).send().expect("get");
    assert_eq!(r.status(), 200);
    let info: Value = r.json().expect("json");
    assert_eq!(info["identity"]["sourceIp"], "127.0.0.1", "{info}");
    for field in ["connectedAt", "lastActiveAt"] {
        assert!(
            info[field].as_str().is_some_and(|t| t.ends_with('Z')),
            "{field}: {info}"
        );
    }

    // DELETE closes the socket with 1000; `$disconnect` runs once.
    let r = http
        .delete(&conn_url)
        .header("x-api-key", &key)
        .send()
        .expect("delete");
    assert_eq!(r.status(), 204);
    assert_eq!(close_code(&mut ws), Some(CloseCode::Normal));
    drop(ws);
    assert_eq!(disconnect_lines(&s, &id, 1), 1);
    // Give a second `$disconnect` (there must be none) the time to show up.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(disconnect_lines(&s, &id, 2), 1);

    // The id is gone: AWS's GoneException.
    for req in [
        http.post(&conn_url).header("x-api-key", &key).body("late"),
        http.get(&conn_url).header("x-api-key", &key),
        http.delete(&conn_url).header("x-api-key", &key),
    ] {
        assert_eq!(error_code(req.send().expect("send")), (410, "gone".into()));
    }

    // A message over 128 KiB closes the connection with 1009.
    let mut ws = connect(&s.addr, "/chat", &[]).expect("connect");
    ws.send(Message::text("whoami")).expect("send");
    let big_id = next_text(&mut ws);
    ws.send(Message::binary(vec![b'x'; 128 * 1024 + 1]))
        .expect("send big");
    assert_eq!(close_code(&mut ws), Some(CloseCode::Size));
    assert_eq!(disconnect_lines(&s, &big_id, 1), 1);

    // A client that closes itself gets `$disconnect` too.
    let mut ws = connect(&s.addr, "/chat", &[]).expect("connect");
    ws.send(Message::text("whoami")).expect("send");
    let own_id = next_text(&mut ws);
    ws.close(None).expect("close");
    while ws.read().is_ok() {}
    assert_eq!(disconnect_lines(&s, &own_id, 1), 1);

    let metrics = s
        .admin(reqwest::Method::GET, "/metrics")
        .send()
        .expect("metrics");
    let text = metrics.text().unwrap_or_default();
    assert!(
        text.contains("nimbus_gateway_websocket_messages_total{direction=\"in\"}"),
        "{text}"
    );
    assert!(
        text.contains("nimbus_gateway_websocket_connections"),
        "{text}"
    );
}

#[test]
fn websocket_routes_refuse_what_they_should() {
    let s = Server::start();
    s.ok(&["deploy", fixture("ws-py").to_str().expect("path")]);

    // `$connect` answering 403 refuses the upgrade with it.
    assert_eq!(
        refusal(connect(&s.addr, "/chat?deny=1", &[])),
        (403, "connect_refused".into())
    );
    // A plain GET is told to upgrade.
    let r = s.http().get(s.url("/chat")).send().expect("get");
    assert_eq!(r.headers()["upgrade"], "websocket");
    assert_eq!(error_code(r), (426, "upgrade_required".into()));
    // A keyed WebSocket route checks the key at the upgrade.
    assert_eq!(
        refusal(connect(&s.addr, "/keyed-chat", &[])),
        (401, "unauthorized".into())
    );
    let other = create_key(&s, "other", "invoke:hello");
    assert_eq!(
        refusal(connect(&s.addr, "/keyed-chat", &[("x-api-key", &other)])),
        (403, "forbidden".into())
    );
    // A plain GET to it: credentials first, so a stranger learns nothing of the route.
    let r = s.http().get(s.url("/keyed-chat")).send().expect("get");
    assert_eq!(error_code(r), (401, "unauthorized".into()));
    let key = create_key(&s, "chatter", "invoke:ws");
    let r = s
        .http()
        .get(s.url("/keyed-chat"))
        .header("x-api-key", &key)
        .send()
        .expect("get");
    assert_eq!(error_code(r), (426, "upgrade_required".into()));
    let mut ws = connect(&s.addr, "/keyed-chat", &[("x-api-key", &key)]).expect("keyed connect");
    ws.send(Message::text("hi")).expect("send");
    assert_eq!(next_text(&mut ws), "echo: hi");
    // No route may shadow the platform's /v1, nor reach the connections API unasked.
    let r = s
        .http()
        .get(s.url("/v1/connections/nope"))
        .bearer_auth(s.token())
        .send()
        .expect("get");
    assert_eq!(error_code(r), (410, "gone".into()));
}

#[test]
fn the_control_listener_serves_connections_and_a_drain_closes_sockets() {
    let mut s = Server::start_args(&["--control-listen", "127.0.0.1:0"]);
    s.ok(&["deploy", fixture("ws-py").to_str().expect("path")]);
    let key = create_key(&s, "pusher", "connections");
    let mut ws = connect(&s.addr, "/chat", &[]).expect("connect");
    ws.send(Message::text("whoami")).expect("send");
    let id = next_text(&mut ws);

    // On the control listener a key holder is not turned away by the admin check.
    let r = s
        .http()
        .post(s.control_url(&format!("/v1/connections/{id}")))
        .header("x-api-key", &key)
        .body("via control")
        .send()
        .expect("post");
    assert_eq!(r.status(), 200);
    assert_eq!(next_text(&mut ws), "via control");
    let r = s
        .http()
        .post(s.control_url(&format!("/v1/connections/{id}")))
        .bearer_auth(s.token())
        .body("admin via control")
        .send()
        .expect("post");
    assert_eq!(r.status(), 200);
    assert_eq!(next_text(&mut ws), "admin via control");
    // The public listener serves the API to key holders, not to the admin token.
    let public = s.url(&format!("/v1/connections/{id}"));
    let r = s
        .http()
        .get(&public)
        .bearer_auth(s.token())
        .send()
        .expect("get");
    assert_eq!(r.status(), 401);
    let r = s
        .http()
        .get(&public)
        .header("x-api-key", &key)
        .send()
        .expect("get");
    assert_eq!(r.status(), 200);
    // The control API itself still wants the admin token.
    let r = s
        .http()
        .get(s.control_url("/v1/functions"))
        .header("x-api-key", &key)
        .send()
        .expect("get");
    assert_eq!(r.status(), 401);

    // SIGTERM: the socket is closed with 1001 (going away), and the server exits.
    let pid = s.pid();
    signal(pid, "TERM");
    assert_eq!(close_code(&mut ws), Some(CloseCode::Away));
    let status = s.terminate();
    assert!(status.success(), "{status:?}: {}", s.stderr());
}

#[test]
fn open_websockets_count_against_max_connections() {
    let s = Server::start_args(&["--max-connections", "1"]);
    s.ok(&["deploy", fixture("ws-py").to_str().expect("path")]);
    let mut ws = connect(&s.addr, "/chat", &[]).expect("connect");
    ws.send(Message::text("hi")).expect("send");
    assert_eq!(next_text(&mut ws), "echo: hi");
    // The upgraded socket still holds the only slot: a new client waits in the
    // kernel's queue.
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(1500))
        .build()
        .expect("client");
    assert!(quick.get(s.url("/health")).send().is_err());
    ws.close(None).expect("close");
    while ws.read().is_ok() {}
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match quick.get(s.url("/health")).send() {
            Ok(r) if r.status() == 200 => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("the slot was not given back: {other:?}"),
        }
    }
}
