//! JWT routes end to end: tokens signed with a test key (fixtures/jwt) against the real
//! gateway; every way a token can be wrong, including `alg: none` and HS256 made with
//! the RSA public key as the secret.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const ISS: &str = JWT_ISSUER;
const AUD: &str = JWT_AUDIENCE;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn key(name: &str) -> EncodingKey {
    let pem = std::fs::read(fixture("jwt").join(name)).expect("pem");
    EncodingKey::from_rsa_pem(&pem).expect("rsa key")
}

fn token(claims: Value, signer: &str) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("test-1".into());
    encode(&h, &claims, &key(signer)).expect("sign")
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"iss": ISS, "aud": AUD, "sub": "user-7", "exp": now() + 300, "nbf": now() - 10, "scope": "read write"});
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

fn server() -> Server {
    let s = Server::start_jwt();
    s.ok(&["deploy", fixture("jwt-py").to_str().expect("path")]);
    s
}

fn call(s: &Server, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut r = s.http().get(s.url(path));
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    let r = r.send().expect("request");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

#[test]
fn valid_tokens_pass_with_their_claims_and_scopes_are_enforced() {
    let s = server();
    let t = token(claims(json!({})), "test-key.pem");
    let (status, body) = call(&s, "/me", Some(&t));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["authorizer"]["jwt"]["claims"]["sub"], "user-7");
    assert_eq!(
        body["authorizer"]["jwt"]["scopes"],
        json!(["read", "write"])
    );
    assert_eq!(
        body["sawToken"], true,
        "the bearer token is passed on, as API Gateway does"
    );

    let (status, body) = call(&s, "/admin", Some(&t));
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (403, json!("forbidden"))
    );
    // Scopes may also come as an `scp` list (`scope` wins when both are there).
    let mut c = claims(json!({"scp": ["admin"]}));
    c.as_object_mut().map(|o| o.remove("scope"));
    let admin = token(c, "test-key.pem");
    assert_eq!(call(&s, "/admin", Some(&admin)).0, 200);
}

#[test]
fn every_kind_of_bad_token_is_401() {
    let s = server();
    let t = now();
    let mut cases: Vec<(&str, String)> = vec![
        (
            "expired",
            token(claims(json!({"exp": t - 60})), "test-key.pem"),
        ),
        (
            "not yet valid",
            token(claims(json!({"nbf": t + 120})), "test-key.pem"),
        ),
        (
            "wrong audience",
            token(claims(json!({"aud": "someone-else"})), "test-key.pem"),
        ),
        (
            "wrong issuer",
            token(
                claims(json!({"iss": "https://evil.example.com"})),
                "test-key.pem",
            ),
        ),
        (
            "forged signature",
            token(claims(json!({})), "other-key.pem"),
        ),
        ("junk", "not.a.token".into()),
    ];
    // No exp at all.
    let mut no_exp = claims(json!({}));
    no_exp.as_object_mut().map(|o| o.remove("exp"));
    cases.push(("no exp", token(no_exp, "test-key.pem")));
    // alg: none, unsigned.
    let body = B64.encode(claims(json!({})).to_string());
    cases.push((
        "alg none",
        format!("{}.{body}.", B64.encode(r#"{"alg":"none","kid":"test-1"}"#)),
    ));
    // HS256 keyed with the RSA public key's bytes (algorithm confusion).
    let public = std::fs::read(fixture("jwt").join("test-key.pub.pem")).expect("pub");
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("test-1".into());
    let confused = encode(
        &h,
        &claims(json!({})),
        &EncodingKey::from_secret(&public).expect("hmac key"),
    )
    .expect("hs");
    cases.push(("HS/RS confusion", confused));
    // A kid the JWKS does not have.
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("nobody".into());
    cases.push((
        "unknown kid",
        encode(&h, &claims(json!({})), &key("test-key.pem")).expect("sign"),
    ));

    for (what, tok) in cases {
        let (status, body) = call(&s, "/me", Some(&tok));
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(
            body["error"]["message"], "invalid token",
            "{what}: no detail for the caller"
        );
    }
    let (status, body) = call(&s, "/me", None);
    assert_eq!(
        (status, body["error"]["message"].clone()),
        (401, json!("missing bearer token"))
    );
}

#[test]
fn jwt_configuration_errors_stop_the_server_with_one_line() {
    let jwks = fixture("jwt").join("jwks.json");
    for (args, want) in [
        (
            vec!["--jwks-file", jwks.to_str().expect("p")],
            "--jwt-issuer",
        ),
        (
            vec!["--jwt-issuer", ISS, "--jwt-audience", AUD],
            "--jwks-file",
        ),
        (
            vec![
                "--jwks-file",
                "/nonexistent/jwks.json",
                "--jwt-issuer",
                ISS,
                "--jwt-audience",
                AUD,
            ],
            "read JWKS file",
        ),
    ] {
        serve_refuses(&args, want);
    }
}

/// A one-file HTTP server on loopback: answers every request with `body`.
fn serve_jwks(body: String) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}/.well-known/jwks.json")
}

#[test]
fn keys_can_come_from_a_jwks_url() {
    let jwks = std::fs::read_to_string(fixture("jwt").join("jwks.json")).expect("jwks");
    let url = serve_jwks(jwks);
    let s = Server::start_args(&[
        "--jwks-url",
        &url,
        "--jwt-issuer",
        ISS,
        "--jwt-audience",
        AUD,
    ]);
    s.ok(&["deploy", fixture("jwt-py").to_str().expect("path")]);
    let t = token(claims(json!({})), "test-key.pem");
    assert_eq!(call(&s, "/me", Some(&t)).0, 200);
    assert_eq!(
        call(&s, "/me", Some(&token(claims(json!({})), "other-key.pem"))).0,
        401
    );
}
