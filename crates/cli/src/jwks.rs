//! Where the gateway's JWT keys come from: a JWKS file read at start, or a JWKS URL
//! fetched at start and refreshed (every 5 minutes, every 30 seconds while it fails).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nimbus_gateway::JwtConfig;
use tokio::sync::watch;

use crate::serve::ServeArgs;

const REFRESH: Duration = Duration::from_secs(300);
const RETRY: Duration = Duration::from_secs(30);

type Feed = watch::Receiver<Option<Arc<JwtConfig>>>;

pub async fn spawn(args: &ServeArgs) -> anyhow::Result<Feed> {
    let (issuer, audience, leeway) = (
        args.jwt_issuer.clone().unwrap_or_default(),
        args.jwt_audience.clone(),
        args.jwt_leeway.as_secs(),
    );
    let configured = args.jwks_file.is_some() || args.jwks_url.is_some();
    if !configured {
        if args.jwt_issuer.is_some() || !args.jwt_audience.is_empty() {
            anyhow::bail!("--jwt-issuer/--jwt-audience need keys: give --jwks-file or --jwks-url");
        }
        return Ok(watch::channel(None).1);
    }
    if issuer.is_empty() || audience.is_empty() {
        anyhow::bail!(
            "JWT keys need --jwt-issuer and --jwt-audience: iss and aud are always checked"
        );
    }
    if let Some(path) = &args.jwks_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read JWKS file {}", path.display()))?;
        let cfg = JwtConfig::from_jwks(&issuer, &audience, &text, leeway)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("JWKS file {}", path.display()))?;
        tracing::info!(keys = cfg.key_count(), file = %path.display(), "JWT keys loaded");
        // A receiver keeps the last value after its sender is gone.
        return Ok(watch::channel(Some(Arc::new(cfg))).1);
    }
    let url = args.jwks_url.clone().unwrap_or_default();
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        anyhow::bail!("--jwks-url must be an http(s) URL");
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("build JWKS client")?;
    let fetch = {
        let (client, url, issuer, audience) = (client, url, issuer, audience);
        move || {
            let (client, url, issuer, audience) = (
                client.clone(),
                url.clone(),
                issuer.clone(),
                audience.clone(),
            );
            async move {
                let resp = client.get(&url).send().await.map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!("{url} answered {}", resp.status()));
                }
                let text = resp.text().await.map_err(|e| e.to_string())?;
                JwtConfig::from_jwks(&issuer, &audience, &text, leeway)
            }
        }
    };
    let first = fetch().await;
    let ok = first.is_ok();
    let (tx, rx) = watch::channel(match first {
        Ok(cfg) => {
            tracing::info!(keys = cfg.key_count(), "JWT keys fetched");
            Some(Arc::new(cfg))
        }
        Err(e) => {
            tracing::warn!(error = %e, "JWKS fetch failed; jwt routes refuse until it works");
            None
        }
    });
    tokio::spawn(async move {
        let mut wait = if ok { REFRESH } else { RETRY };
        loop {
            tokio::time::sleep(wait).await;
            match fetch().await {
                Ok(cfg) => {
                    let _ = tx.send(Some(Arc::new(cfg)));
                    wait = REFRESH;
                }
                // Keep the last good keys: a flaky IdP must not lock everyone out.
                Err(e) => {
                    tracing::warn!(error = %e, "JWKS refresh failed; keeping the last keys");
                    wait = RETRY;
                }
            }
        }
    });
    Ok(rx)
}
