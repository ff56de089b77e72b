//! TLS and mTLS on the public listener, with test-only certificates (fixtures/tls):
//! a client with a certificate from the client CA reaches `auth = "mtls"` routes and
//! the function sees who it is; without one it gets 401; a certificate from another
//! CA fails the handshake; plain HTTP on the TLS port gets nothing.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn tls(name: &str) -> String {
    fixture("tls")
        .join(name)
        .to_str()
        .expect("path")
        .to_string()
}

fn server() -> Server {
    let s = Server::start_args(&[
        "--tls-cert",
        &tls("server.pem"),
        "--tls-key",
        &tls("server.key"),
        "--tls-client-ca",
        &tls("ca.pem"),
        "--control-listen",
        "127.0.0.1:0",
    ]);
    s.ok(&["deploy", fixture("mtls-py").to_str().expect("path")]);
    s
}

fn client(identity: Option<(&str, &str)>) -> reqwest::blocking::Client {
    let ca = std::fs::read(fixture("tls").join("ca.pem")).expect("ca");
    let mut b = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .timeout(Duration::from_secs(10))
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("ca cert"));
    if let Some((cert, key)) = identity {
        let mut pem = std::fs::read(fixture("tls").join(cert)).expect("cert");
        pem.extend(std::fs::read(fixture("tls").join(key)).expect("key"));
        b = b.identity(reqwest::Identity::from_pem(&pem).expect("identity"));
    }
    b.build().expect("client")
}

fn https(s: &Server, path: &str) -> String {
    format!("https://{}{}", s.addr, path)
}

#[test]
fn mtls_routes_admit_only_certificates_from_the_client_ca() {
    let s = server();
    // TLS without a client certificate: open routes work, mtls routes refuse.
    let anon = client(None);
    let r = anon
        .get(https(&s, "/plain"))
        .send()
        .expect("plain over TLS");
    assert_eq!(r.status(), 200);
    let r = anon.get(https(&s, "/secure")).send().expect("secure");
    assert_eq!(r.status(), 401);
    let body: Value = r.json().expect("json error");
    assert_eq!(body["error"]["code"], "unauthorized");

    // A certificate from the client CA: admitted, and the function learns who called.
    let good = client(Some(("client.pem", "client.key")));
    let r = good
        .get(https(&s, "/secure"))
        .send()
        .expect("secure with cert");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().expect("json");
    let cert = &body["authentication"]["clientCert"];
    let subject = cert["subjectDN"].as_str().unwrap_or("");
    assert!(
        subject.contains("CN=billing-service") && subject.contains("O=Example Corp"),
        "{body}"
    );
    assert!(
        cert["issuerDN"]
            .as_str()
            .unwrap_or("")
            .contains("CN=nimbus test CA"),
        "{body}"
    );
    assert_eq!(
        cert["fingerprintSha256"],
        "20a0f26c34a50ed1a0aa955b343110b960baa3eff2e474c29ddd8e30aaf115ca",
        "{body}"
    );
    assert!(
        cert["clientCertPem"]
            .as_str()
            .unwrap_or("")
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(cert["validity"]["notAfter"].is_string());

    // A certificate from elsewhere does not get through the handshake.
    let rogue = client(Some(("rogue.pem", "rogue.key")));
    assert!(
        rogue.get(https(&s, "/secure")).send().is_err(),
        "rogue certificate accepted"
    );

    // Plain HTTP on the TLS port is not served.
    let plain = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let r = plain.get(format!("http://{}/plain", s.addr)).send();
    assert!(r.is_err() || !r.expect("r").status().is_success());

    // HTTP/2 is negotiated by ALPN (curl, built with nghttp2, as a second client).
    let o = std::process::Command::new("curl")
        .args([
            "--http2",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            "--cacert",
        ])
        .arg(fixture("tls").join("ca.pem"))
        .arg(https(&s, "/plain"))
        .output()
        .expect("run curl (.ci/run installs it)");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "2",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The control API stays on its own plain listener.
    assert_eq!(
        s.admin(reqwest::Method::GET, "/v1/functions")
            .send()
            .expect("ls")
            .status(),
        200
    );
}

#[test]
fn tls_configuration_errors_stop_the_server() {
    serve_refuses(
        &[
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            "/nonexistent.key",
        ],
        "read TLS certificate",
    );
    let (cert, wrong_key) = (tls("server.pem"), tls("client.key"));
    serve_refuses(
        &["--tls-cert", &cert, "--tls-key", &wrong_key],
        "do not match",
    );
}
