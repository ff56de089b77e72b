//! Requests whose host or framing two parsers could read differently (RFC 9112), refused
//! before routing, with the connection closed after the answer:
//!
//! - more than one `Host` (the route could follow one, a front proxy the other), or an
//!   HTTP/1.1 request without one (3.2: 400);
//! - a `Transfer-Encoding` other than exactly `chunked`: a repeated `chunked` is 400,
//!   any other coding 501 (6.1), since hyper frames by the last one and would pass the
//!   rest on undecoded;
//! - a request target over the URI limit (414), like the request line limits of
//!   nginx and Apache (8 KiB).

use http::{HeaderMap, StatusCode, Version, header};

/// Why a request was refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    DuplicateHost,
    MissingHost,
    RepeatedChunked,
    UnknownCoding,
    UriTooLong,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::DuplicateHost | Refusal::MissingHost | Refusal::RepeatedChunked => {
                StatusCode::BAD_REQUEST
            }
            Refusal::UnknownCoding => StatusCode::NOT_IMPLEMENTED,
            Refusal::UriTooLong => StatusCode::URI_TOO_LONG,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Refusal::UnknownCoding => "not_implemented",
            Refusal::UriTooLong => "uri_too_long",
            _ => "bad_request",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::DuplicateHost => "more than one Host header",
            Refusal::MissingHost => "an HTTP/1.1 request needs a Host header",
            Refusal::RepeatedChunked => "Transfer-Encoding names chunked more than once",
            Refusal::UnknownCoding => "the only transfer coding accepted is chunked",
            Refusal::UriTooLong => "the request target is too long",
        }
    }
}

/// Checks a request's head; `max_uri` bounds the target's bytes.
pub fn check(req: &http::Request<impl Sized>, max_uri: usize) -> Result<(), Refusal> {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    if target > max_uri {
        return Err(Refusal::UriTooLong);
    }
    let headers = req.headers();
    let hosts = headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(Refusal::DuplicateHost);
    }
    // HTTP/2 names the authority in `:authority`; HTTP/1.0 predates Host.
    if hosts == 0 && req.version() == Version::HTTP_11 {
        return Err(Refusal::MissingHost);
    }
    transfer_coding(headers)
}

fn transfer_coding(headers: &HeaderMap) -> Result<(), Refusal> {
    let mut chunked = 0;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(text) = value.to_str() else {
            return Err(Refusal::UnknownCoding);
        };
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(Refusal::UnknownCoding);
            }
            chunked += 1;
        }
    }
    if chunked > 1 {
        return Err(Refusal::RepeatedChunked);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, target: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder().version(version).uri(target);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn hosts_must_be_one_on_http11() {
        let one = req(Version::HTTP_11, "/", &[("host", "a")]);
        assert_eq!(check(&one, 8192), Ok(()));
        let two = req(Version::HTTP_11, "/", &[("host", "a"), ("host", "b")]);
        assert_eq!(check(&two, 8192), Err(Refusal::DuplicateHost));
        let none = req(Version::HTTP_11, "/", &[]);
        assert_eq!(check(&none, 8192), Err(Refusal::MissingHost));
        assert_eq!(check(&req(Version::HTTP_10, "/", &[]), 8192), Ok(()));
        assert_eq!(check(&req(Version::HTTP_2, "/", &[]), 8192), Ok(()));
    }

    #[test]
    fn only_a_single_chunked_coding_passes() {
        let te = |v: &[&str]| {
            let mut h: Vec<(&str, &str)> = vec![("host", "a")];
            h.extend(v.iter().map(|v| ("transfer-encoding", *v)));
            check(&req(Version::HTTP_11, "/", &h), 8192)
        };
        assert_eq!(te(&["chunked"]), Ok(()));
        assert_eq!(te(&["Chunked "]), Ok(()));
        assert_eq!(te(&["chunked, chunked"]), Err(Refusal::RepeatedChunked));
        assert_eq!(te(&["chunked", "chunked"]), Err(Refusal::RepeatedChunked));
        assert_eq!(te(&["gzip, chunked"]), Err(Refusal::UnknownCoding));
        assert_eq!(te(&["gzip", "chunked"]), Err(Refusal::UnknownCoding));
        assert_eq!(te(&["identity"]), Err(Refusal::UnknownCoding));
        assert_eq!(Refusal::UnknownCoding.status(), 501);
        assert_eq!(Refusal::RepeatedChunked.status(), 400);
    }

    #[test]
    fn long_targets_are_414() {
        let path = format!("/{}", "a".repeat(8191));
        assert_eq!(
            check(&req(Version::HTTP_11, &path, &[("host", "a")]), 8192),
            Ok(())
        );
        let longer = format!("{path}a");
        let r = check(&req(Version::HTTP_11, &longer, &[("host", "a")]), 8192);
        assert_eq!(r.map_err(Refusal::status), Err(StatusCode::URI_TOO_LONG));
        let query = format!("/x?{}", "q".repeat(9000));
        let r = check(&req(Version::HTTP_11, &query, &[("host", "a")]), 8192);
        assert_eq!(r, Err(Refusal::UriTooLong));
    }
}
