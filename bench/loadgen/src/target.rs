//! Where requests go: `http://IP:PORT/path` on a loopback address, nothing else.

use std::net::SocketAddr;

use anyhow::{Context, bail};

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub addr: SocketAddr,
    /// Value of the Host header.
    pub host: String,
    /// Origin-form request target: path and query.
    pub path: String,
}

impl Target {
    /// Accepts only plain `http://` to an IP literal in 127.0.0.0/8 or `[::1]`, with a
    /// port: a load generator pointed elsewhere by mistake would be a nuisance.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url:?}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let addr: SocketAddr = authority
            .parse()
            .with_context(|| format!("{url:?}: the host must be IP:PORT, e.g. 127.0.0.1:8080"))?;
        if !addr.ip().is_loopback() {
            bail!("{url:?}: refusing a non-loopback address");
        }
        Ok(Target {
            addr,
            host: authority.to_string(),
            path,
        })
    }
}

/// Percent-encodes one path segment (function names are tame, but a name is input).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loopback_urls() {
        let t = Target::parse("http://127.0.0.1:8080/hello/ada?x=1").expect("url");
        assert_eq!(t.addr, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(t.host, "127.0.0.1:8080");
        assert_eq!(t.path, "/hello/ada?x=1");
        assert_eq!(Target::parse("http://127.0.0.1:1").expect("bare").path, "/");
        assert_eq!(
            Target::parse("http://127.0.0.1:1?q").expect("query").path,
            "/?q"
        );
        assert_eq!(Target::parse("http://[::1]:9/a").expect("v6").path, "/a");
    }

    #[test]
    fn refuses_anything_else() {
        for bad in [
            "https://127.0.0.1:1/",
            "http://10.0.0.1:80/",
            "http://example.com:80/",
            "http://localhost:80/",
            "http://127.0.0.1/",
            "127.0.0.1:80",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn encodes_segments() {
        assert_eq!(encode_segment("hello-node"), "hello-node");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }
}
