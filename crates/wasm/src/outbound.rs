//! Outgoing `wasi:http` requests: allowed only to the hosts the manifest lists, and never
//! to loopback or private addresses unless the operator allows them.
//!
//! The check runs in the host, on the request the guest built, before any connection:
//! the guest gets `HttpRequestDenied` and nothing leaves the machine.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::Scheme;
use nimbus_core::outbound::{OutboundRule, allowed};
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// A function's outbound rules, shared by its requests.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    pub rules: Arc<Vec<OutboundRule>>,
    pub allow_private: bool,
}

/// The per-request hooks wasmtime-wasi-http calls.
pub(crate) struct Hooks {
    pub(crate) policy: OutboundPolicy,
    pub(crate) deadline: Instant,
}

type SendResult = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>;

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        drop(fut);
        let verdict = self.check(request.uri());
        // No outgoing call outlives the invocation: every timeout is capped by what is
        // left of its deadline.
        let left = self.deadline.saturating_duration_since(Instant::now());
        let cap = |d: Option<Duration>| Some(d.map_or(left, |d| d.min(left)));
        let options = RequestOptions {
            connect_timeout: cap(options.and_then(|o| o.connect_timeout)),
            first_byte_timeout: cap(options.and_then(|o| o.first_byte_timeout)),
            between_bytes_timeout: cap(options.and_then(|o| o.between_bytes_timeout)),
        };
        let allow_private = self.policy.allow_private;
        Box::new(async move {
            let (host, port) = verdict?;
            if !allow_private {
                // Names are resolved here to refuse ones that point inside; the connector
                // resolves again, which leaves a rebinding window of one lookup.
                let addrs = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|_| HttpError::DnsError {
                        rcode: Some("lookup failed".into()),
                        info_code: None,
                    })?;
                for a in addrs {
                    if is_private(a.ip()) {
                        tracing::info!(%host, ip = %a.ip(), "wasm outbound request to a private address denied");
                        return Err(HttpError::DestinationIpProhibited);
                    }
                }
            }
            use http_body_util::BodyExt;
            let (res, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

impl Hooks {
    /// Whether the manifest allows this URL; the host and port to connect to if so.
    fn check(&self, uri: &http::Uri) -> Result<(String, u16), HttpError> {
        let scheme = uri.scheme().unwrap_or(&Scheme::HTTPS);
        let https = *scheme == Scheme::HTTPS;
        if !https && *scheme != Scheme::HTTP {
            return Err(HttpError::HttpProtocolError);
        }
        let host = uri
            .host()
            .ok_or(HttpError::HttpRequestUriInvalid)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if !allowed(&self.policy.rules, scheme.as_str(), &host, port) {
            tracing::info!(scheme = scheme.as_str(), %host, port, "wasm outbound request denied: not in allowed_outbound_hosts");
            return Err(HttpError::HttpRequestDenied);
        }
        Ok((host, port))
    }
}

/// Loopback, private, link-local and other addresses that are not the public internet.
pub(crate) fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64 // 100.64/10 CGNAT
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00 // unique local
                || (v6.segments()[0] & 0xffc0) == 0xfe80 // link local
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(rules: &[&str]) -> Hooks {
        Hooks {
            policy: OutboundPolicy {
                rules: Arc::new(
                    rules
                        .iter()
                        .map(|r| OutboundRule::parse(r).expect("rule"))
                        .collect(),
                ),
                allow_private: false,
            },
            deadline: Instant::now(),
        }
    }

    #[test]
    fn only_listed_urls_pass() {
        let h = hooks(&["https://api.example.com"]);
        let ok = h.check(&"https://api.example.com/v1".parse().expect("uri"));
        assert_eq!(ok.ok(), Some(("api.example.com".to_string(), 443)));
        for denied in [
            "http://api.example.com/",
            "https://api.example.com:8443/",
            "https://other.example.com/",
        ] {
            let r = h.check(&denied.parse().expect("uri"));
            assert!(matches!(r, Err(HttpError::HttpRequestDenied)), "{denied}");
        }
        let none = hooks(&[]);
        assert!(
            none.check(&"https://api.example.com/".parse().expect("uri"))
                .is_err()
        );
    }

    #[test]
    fn private_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.0.1",
            "169.254.1.1",
            "::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "100.64.0.1",
            "0.0.0.0",
        ] {
            assert!(is_private(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["8.8.8.8", "2001:4860::8888", "100.128.0.1"] {
            assert!(!is_private(ip.parse().expect("ip")), "{ip}");
        }
    }
}
