//! JWT bearer tokens for `auth = "jwt"` routes (RFC 8725 in practice).
//!
//! The token never chooses how it is checked: each key of the JWKS is pinned to one
//! algorithm (its `alg`, or the only one its type allows), a token whose header names
//! another (`none`, or HS256 over an RSA key's bytes) is refused before any crypto.
//! `exp`, `nbf`, `iss` and `aud` are always required and checked, with a small leeway;
//! an `iat` in the future (beyond the leeway) is refused.
//! Keys come only from the configured JWKS: `jku`, `x5u` and inline `jwk` headers are
//! ignored. Required scopes (`scope` string or `scp` list) are checked after the
//! signature; the verified claims reach the function.

use std::collections::HashSet;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// Verification settings and keys; rebuilt whole when the JWKS is reloaded.
pub struct JwtConfig {
    issuer: String,
    audience: Vec<String>,
    leeway_s: u64,
    keys: Vec<PinnedKey>,
}

struct PinnedKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Why a token was refused: `Unauthorized` is 401 (no detail for the caller),
/// `Forbidden` 403 (valid token, missing scope).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtRefusal {
    Unauthorized(&'static str),
    Forbidden,
}

/// What a verified token tells the function.
pub struct Verified {
    pub claims: Value,
    pub scopes: Vec<String>,
}

impl JwtConfig {
    /// Builds the verifier from a JWKS document. Keys that cannot be pinned to one
    /// algorithm, or are for encryption, are skipped (named in the error only if none
    /// is left).
    pub fn from_jwks(
        issuer: &str,
        audience: &[String],
        jwks_json: &str,
        leeway_s: u64,
    ) -> Result<JwtConfig, String> {
        if issuer.is_empty() || audience.is_empty() {
            return Err("JWT routes need an issuer and at least one audience".into());
        }
        let set: JwkSet =
            serde_json::from_str(jwks_json).map_err(|e| format!("JWKS is not valid: {e}"))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for jwk in &set.keys {
            let name = jwk
                .common
                .key_id
                .clone()
                .unwrap_or_else(|| "(no kid)".into());
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                skipped.push(format!("{name}: an encryption key"));
                continue;
            }
            let declared = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            let implied = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
                AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    EllipticCurve::P256 => Some(Algorithm::ES256),
                    EllipticCurve::P384 => Some(Algorithm::ES384),
                    _ => None,
                },
                AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
                // A shared secret, or anything newer, must say what it is for.
                _ => None,
            };
            let Some(alg) = declared.or(implied) else {
                skipped.push(format!("{name}: no `alg`, and its type allows several"));
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => keys.push(PinnedKey {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                }),
                Err(e) => skipped.push(format!("{name}: {e}")),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "JWKS has no usable signing key ({})",
                skipped.join("; ")
            ));
        }
        Ok(JwtConfig {
            issuer: issuer.to_string(),
            audience: audience.to_vec(),
            leeway_s,
            keys,
        })
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Verifies `token` and checks that it carries every scope in `required`.
    pub fn verify(&self, token: &str, required: &[String]) -> Result<Verified, JwtRefusal> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| JwtRefusal::Unauthorized("malformed"))?;
        let key = match &header.kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or(JwtRefusal::Unauthorized("unknown key"))?;
        if header.alg != key.alg {
            return Err(JwtRefusal::Unauthorized("algorithm not the key's"));
        }
        let mut v = Validation::new(key.alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&self.audience);
        v.validate_nbf = true;
        v.leeway = self.leeway_s;
        v.required_spec_claims = ["exp", "iss", "aud"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let data = jsonwebtoken::decode::<Value>(token, &key.key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            JwtRefusal::Unauthorized(match e.kind() {
                K::ExpiredSignature => "expired",
                K::ImmatureSignature => "not yet valid",
                K::InvalidAudience => "wrong audience",
                K::InvalidIssuer => "wrong issuer",
                K::InvalidSignature => "bad signature",
                K::MissingRequiredClaim(_) => "missing claim",
                _ => "invalid",
            })
        })?;
        // `nbf` is optional in RFC 7519 but, when present, checked above.
        check_iat(
            &data.claims,
            jsonwebtoken::get_current_timestamp(),
            self.leeway_s,
        )?;
        let scopes = scopes_of(&data.claims);
        let have: HashSet<&str> = scopes.iter().map(String::as_str).collect();
        if !required.iter().all(|r| have.contains(r.as_str())) {
            return Err(JwtRefusal::Forbidden);
        }
        Ok(Verified {
            claims: data.claims,
            scopes,
        })
    }
}

/// `iat` is optional, but a token that says it was issued in the future (beyond the
/// leeway) was minted by a wrong clock or to outlive a key rotation or revocation that
/// bounds tokens by issue time: refused, as is an `iat` that is not a number.
fn check_iat(claims: &Value, now_s: u64, leeway_s: u64) -> Result<(), JwtRefusal> {
    let Some(iat) = claims.get("iat") else {
        return Ok(());
    };
    let iat = iat
        .as_f64()
        .ok_or(JwtRefusal::Unauthorized("invalid iat"))?;
    // Compared as floats: `iat` may be fractional, and far-future values must not wrap.
    if iat > now_s.saturating_add(leeway_s) as f64 {
        return Err(JwtRefusal::Unauthorized("issued in the future"));
    }
    Ok(())
}

/// OAuth 2 scopes: `scope` (space separated, RFC 8693) or `scp` (a list or a string).
fn scopes_of(claims: &Value) -> Vec<String> {
    let split = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    match (claims.get("scope"), claims.get("scp")) {
        (Some(Value::String(s)), _) => split(s),
        (_, Some(Value::String(s))) => split(s),
        (_, Some(Value::Array(a))) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_without_pinnable_keys_are_refused() {
        let aud = vec!["api".to_string()];
        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#;
        assert!(JwtConfig::from_jwks("iss", &aud, oct, 5).is_err());
        let oct_hs = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"HS256","kid":"h"}]}"#;
        assert_eq!(
            JwtConfig::from_jwks("iss", &aud, oct_hs, 5).map(|c| c.key_count()),
            Ok(1)
        );
        assert!(JwtConfig::from_jwks("", &aud, oct_hs, 5).is_err());
        assert!(JwtConfig::from_jwks("iss", &[], oct_hs, 5).is_err());
        assert!(JwtConfig::from_jwks("iss", &aud, "not json", 5).is_err());
    }

    #[test]
    fn tokens_issued_in_the_future_are_refused() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let aud = vec!["api".to_string()];
        let jwks = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"HS256","kid":"h"}]}"#;
        let cfg = JwtConfig::from_jwks("iss", &aud, jwks, 5).expect("config");
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let token = |iat: Value| {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("h".into());
            let claims = serde_json::json!({
                "iss": "iss", "aud": "api", "exp": now + 3600, "iat": iat,
            });
            let key = EncodingKey::from_secret(b"secret").expect("hmac key");
            encode(&h, &claims, &key).expect("sign")
        };
        for ok in [now - 60, now, now + 3] {
            assert!(cfg.verify(&token(ok.into()), &[]).is_ok(), "iat {ok}");
        }
        let future = JwtRefusal::Unauthorized("issued in the future");
        for (what, iat) in [
            ("a minute", serde_json::json!(now + 60)),
            ("a day", serde_json::json!(now + 86_400)),
            ("ten years", serde_json::json!(now + 10 * 365 * 86_400)),
            ("far", serde_json::json!(1e300)),
        ] {
            assert_eq!(
                cfg.verify(&token(iat), &[]).err(),
                Some(future.clone()),
                "{what}"
            );
        }
        assert_eq!(
            cfg.verify(&token("yesterday".into()), &[]).err(),
            Some(JwtRefusal::Unauthorized("invalid iat"))
        );
        assert_eq!(check_iat(&serde_json::json!({}), 10, 5), Ok(()));
        assert!(check_iat(&serde_json::json!({"iat": 15}), 10, 5).is_ok());
        assert!(check_iat(&serde_json::json!({"iat": 15.5}), 10, 5).is_err());
    }

    #[test]
    fn scopes_come_from_scope_or_scp() {
        assert_eq!(
            scopes_of(&serde_json::json!({"scope": "a b"})),
            vec!["a", "b"]
        );
        assert_eq!(
            scopes_of(&serde_json::json!({"scp": ["x", 1, "y"]})),
            vec!["x", "y"]
        );
        assert!(scopes_of(&serde_json::json!({})).is_empty());
    }
}
