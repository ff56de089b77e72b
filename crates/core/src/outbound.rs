//! `allowed_outbound_hosts`: which URLs a WebAssembly function may call over HTTP.
//!
//! The rules are Spin's: `scheme://host[:port]`, where the scheme may be `*`, the host may
//! start with `*.` (any subdomain, not the domain itself) or be `*`, and the port may be
//! `*`. A rule without a port means the scheme's default port. Parsed at deploy, matched
//! by the wasm host for every outgoing request; no I/O here.

use serde::{Deserialize, Serialize};

/// One parsed rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundRule {
    /// `http`, `https`, or `None` for any.
    pub scheme: Option<String>,
    pub host: HostPattern,
    pub port: PortPattern,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostPattern {
    Any,
    /// Lower-cased host or IP literal (IPv6 without brackets).
    Exact(String),
    /// `*.example.com` stored as `example.com`: any name ending in `.example.com`.
    Subdomains(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortPattern {
    Any,
    /// The scheme's own port (80 or 443).
    Default,
    Exact(u16),
}

impl OutboundRule {
    /// Parses one manifest entry; the error says what is wrong in words a user can act on.
    pub fn parse(text: &str) -> Result<OutboundRule, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("`{text}` needs a scheme, as in `https://api.example.com`"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "*" => None,
            s @ ("http" | "https") => Some(s.to_string()),
            other => {
                return Err(format!(
                    "`{text}`: scheme `{other}` is not allowed; use http, https or *"
                ));
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "`{text}`: only scheme, host and port are allowed (no path, query or user)"
            ));
        }
        let (host, port) = split_host_port(rest).map_err(|m| format!("`{text}`: {m}"))?;
        let port = match port {
            None => {
                if scheme.is_none() {
                    return Err(format!(
                        "`{text}`: a rule with scheme `*` needs a port (a number or `*`)"
                    ));
                }
                PortPattern::Default
            }
            Some("*") => PortPattern::Any,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => PortPattern::Exact(n),
                _ => return Err(format!("`{text}`: port `{p}` is not a number in 1..65535")),
            },
        };
        let host = host.to_ascii_lowercase();
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(domain) = host.strip_prefix("*.") {
            if !valid_host(domain) {
                return Err(format!("`{text}`: `{domain}` is not a host name"));
            }
            HostPattern::Subdomains(domain.to_string())
        } else if host.contains('*') {
            return Err(format!(
                "`{text}`: `*` is allowed only as the whole host or as a leading `*.`"
            ));
        } else if valid_host(&host) {
            HostPattern::Exact(host)
        } else {
            return Err(format!(
                "`{text}`: `{host}` is not a host name or IP address"
            ));
        };
        Ok(OutboundRule { scheme, host, port })
    }

    /// Whether a request to `scheme://host:port` is allowed by this rule. `host` is
    /// compared case-insensitively; IPv6 literals come without brackets.
    pub fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        if let Some(s) = &self.scheme
            && !s.eq_ignore_ascii_case(scheme)
        {
            return false;
        }
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "http" => 80,
            "https" => 443,
            _ => return false,
        };
        let port_ok = match self.port {
            PortPattern::Any => true,
            PortPattern::Default => port == default_port,
            PortPattern::Exact(p) => port == p,
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let host_ok = match &self.host {
            HostPattern::Any => true,
            HostPattern::Exact(h) => *h == host,
            HostPattern::Subdomains(d) => host
                .strip_suffix(d.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        };
        port_ok && host_ok
    }
}

/// Whether any rule in `rules` allows the request.
pub fn allowed(rules: &[OutboundRule], scheme: &str, host: &str, port: u16) -> bool {
    rules.iter().any(|r| r.allows(scheme, host, port))
}

fn split_host_port(rest: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| "an IPv6 address needs its closing `]`".to_string())?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| "expected `:port` after the IPv6 address".to_string())?,
            ),
        };
        return Ok((addr, port));
    }
    Ok(match rest.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    })
}

fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> OutboundRule {
        OutboundRule::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn exact_hosts_use_the_schemes_default_port() {
        let r = rule("https://api.example.com");
        assert!(r.allows("https", "api.example.com", 443));
        assert!(r.allows("https", "API.example.com", 443));
        assert!(!r.allows("https", "api.example.com", 8443));
        assert!(!r.allows("http", "api.example.com", 80));
        assert!(!r.allows("https", "evil.api.example.com", 443));
        assert!(!r.allows("https", "api.example.com.evil.net", 443));
    }

    #[test]
    fn wildcards_cover_subdomains_ports_and_schemes() {
        let r = rule("https://*.example.com");
        assert!(r.allows("https", "a.example.com", 443));
        assert!(r.allows("https", "a.b.example.com", 443));
        assert!(!r.allows("https", "example.com", 443));
        assert!(!r.allows("https", "badexample.com", 443));
        let r = rule("http://127.0.0.1:*");
        assert!(r.allows("http", "127.0.0.1", 8080));
        assert!(!r.allows("http", "127.0.0.2", 8080));
        let r = rule("*://db.internal:5000");
        assert!(r.allows("http", "db.internal", 5000));
        assert!(r.allows("https", "db.internal", 5000));
        assert!(!r.allows("https", "db.internal", 443));
        let r = rule("https://[::1]:8443");
        assert!(r.allows("https", "::1", 8443));
    }

    #[test]
    fn bad_rules_say_why() {
        for (text, needle) in [
            ("api.example.com", "needs a scheme"),
            ("ftp://x.com", "not allowed"),
            ("https://x.com/path", "no path"),
            ("https://x.com:99999", "not a number"),
            ("https://a*b.com", "leading"),
            ("*://x.com", "needs a port"),
            ("https://", "not a host"),
            ("https://user@x.com", "no path"),
        ] {
            let err = OutboundRule::parse(text).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
