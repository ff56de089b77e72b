//! `hello-wasm`: a tiny nimbus function written as a WebAssembly component.
//!
//! It implements the WASI 0.2 `wasi:http/incoming-handler` interface (the
//! `wasi:http/proxy` world) using the `wasi` crate's bindings. Build it with
//! `cargo build --release --target wasm32-wasip2` (or just `./build.sh`);
//! rustc's wasip2 output is already a component, so no extra tooling is needed.

use std::io::{Read, Write};

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

wasi::http::proxy::export!(Hello);

impl Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let method = method_name(&request.method());
        let path_with_query = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = match path_with_query.split_once('?') {
            Some((p, q)) => (p, q),
            None => (path_with_query.as_str(), ""),
        };

        // Drain the request body (e.g. a JSON event on POST) before answering.
        let body = read_body(&request);

        let greeting = std::env::var("GREETING").unwrap_or_else(|_| "hello".into());
        let name = query_param(query, "name")
            .or_else(|| path.rsplit('/').find(|s| !s.is_empty()).map(percent_decode))
            .unwrap_or_else(|| "world".into());

        let mut json = format!(
            r#"{{"message":{},"method":{},"path":{},"runtime":"wasm""#,
            json_str(&format!("{greeting}, {name}!")),
            json_str(&method),
            json_str(path),
        );
        if !body.is_empty() {
            json.push_str(&format!(r#","body_bytes":{}"#, body.len()));
        }
        json.push('}');

        println!("handled {method} {path}");

        let headers = Fields::from_list(&[(
            "content-type".to_string(),
            b"application/json".to_vec(),
        )])
        .expect("valid headers");
        let response = OutgoingResponse::new(headers);
        let out_body = response.body().expect("response body");
        ResponseOutparam::set(response_out, Ok(response));

        {
            // The output stream is a child of the body: drop it before `finish`.
            let mut stream = out_body.write().expect("body stream");
            stream.write_all(json.as_bytes()).expect("write body");
            stream.flush().expect("flush body");
        }
        OutgoingBody::finish(out_body, None).expect("finish body");
    }
}

/// Reads the whole incoming request body.
fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Ok(body) = request.consume() {
        if let Ok(mut stream) = body.stream() {
            stream.read_to_end(&mut buf).expect("read request body");
        } // the stream is dropped before its parent body
    }
    buf
}

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
    .to_string()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(k, _)| percent_decode(k) == key)
        .map(|(_, v)| percent_decode(v))
}

/// Decodes `%XX` escapes and `+` (as a space) in a URL component.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = || std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok();
        match bytes[i] {
            b'%' => match hex().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
