//! Throughput of acs-emulator with limits off, load generator included, over loopback.
//!
//! `cargo run --release -p acs-emulator --example bench -- [--requests N] [--issues N]
//! [--concurrency C] [--https]`
//!
//! Starts the emulator in-process (same machine, same cores as the load generator, as in the
//! operator's benchmarks), drives HMAC-signed requests from C concurrent tasks over a pooled
//! keep-alive client, and prints requests/s per operation and the cost of one RS256 signature.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use acs::AccessKey;
use acs_emulator::{Config, SigningKey, Transport, tokens::Claims};

const KEY: &str = "YWNzLW9wZXJhdG9yLXRlc3Qta2V5LTAxMjM0NTY3ODk=";

struct Options {
    requests: usize,
    issues: usize,
    concurrency: usize,
    https: bool,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        requests: 20_000,
        issues: 5_000,
        concurrency: 32,
        https: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut number = || {
            args.next()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("{flag} needs a positive number"))
        };
        match flag.as_str() {
            "--requests" => options.requests = number()?,
            "--issues" => options.issues = number()?,
            "--concurrency" => options.concurrency = number()?,
            "--https" => options.https = true,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(options)
}

struct Load {
    http: reqwest::Client,
    endpoint: String,
    host: String,
    key: AccessKey,
}

impl Load {
    async fn send(&self, method: reqwest::Method, target: &str, body: &'static str) -> u16 {
        let date = acs::signing::http_date(jiff::Timestamp::now());
        let signed = acs::signing::sign_request(
            &self.key,
            method.as_str(),
            target,
            &self.host,
            &date,
            body.as_bytes(),
        );
        let response = self
            .http
            .request(method, format!("{}{target}", self.endpoint))
            .header("x-ms-date", signed.date)
            .header("x-ms-content-sha256", signed.content_hash)
            .header("authorization", signed.authorization)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the emulator answers");
        let status = response.status().as_u16();
        // Read the body so the connection goes back to the pool.
        let _ = response.bytes().await;
        status
    }
}

/// Runs `total` requests from `concurrency` tasks; request i is `make(i)`. Returns req/s.
async fn drive<F, Fut>(total: usize, concurrency: usize, expected: u16, make: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = u16> + Send,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (make, next) = (make.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let status = make(i).await;
                    assert_eq!(status, expected, "request {i}");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options().map_err(anyhow::Error::msg)?;
    let key = SigningKey::generate()?;

    // The cost of one RS256 signature, alone on one core.
    let claims = Claims::new("8:acs:r_1", "r", &["chat".into(), "voip".into()], 0, 3600);
    let rounds = 500;
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(key.mint(&claims));
    }
    let signature = started.elapsed() / rounds;

    let access_key = AccessKey::from_base64(KEY)?;
    let mut config = Config::new(access_key.clone());
    config.settings.limits.enabled = false;
    config.signing_key = Some(key);
    let mut http = reqwest::Client::builder().pool_max_idle_per_host(options.concurrency);
    if options.https {
        // A fresh private directory, removed at shutdown.
        config.transport = Transport::Https { tls_dir: None };
    }
    let emulator = acs_emulator::start(config).await?;
    if let Some(pem) = emulator.ca_cert_pem() {
        http = http.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes())?);
    }
    let endpoint = emulator.endpoint();
    let load = Arc::new(Load {
        http: http.build()?,
        host: endpoint
            .split_once("://")
            .map(|(_, h)| h.to_owned())
            .unwrap_or_default(),
        endpoint,
        key: access_key,
    });

    // Identities to act on: one per delete, and a pool for revoke/GET/issue.
    let ids = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(
        options.requests,
    )));
    let create = {
        let (load, ids) = (load.clone(), ids.clone());
        drive(options.requests, options.concurrency, 201, move |_| {
            let (load, ids) = (load.clone(), ids.clone());
            async move {
                let date = acs::signing::http_date(jiff::Timestamp::now());
                let target = "/identities?api-version=2025-03-02-preview";
                let signed =
                    acs::signing::sign_request(&load.key, "POST", target, &load.host, &date, b"");
                let response = load
                    .http
                    .post(format!("{}{target}", load.endpoint))
                    .header("x-ms-date", signed.date)
                    .header("x-ms-content-sha256", signed.content_hash)
                    .header("authorization", signed.authorization)
                    .header("content-type", "application/json")
                    .send()
                    .await
                    .expect("the emulator answers");
                let status = response.status().as_u16();
                let body: acs::wire::CreateIdentityResponse =
                    response.json().await.expect("a create answer");
                ids.lock().await.push(body.identity.id.replace(':', "%3A"));
                status
            }
        })
        .await
    };
    let ids: Arc<Vec<String>> = Arc::new(std::mem::take(&mut *ids.lock().await));

    let per_id = |method: reqwest::Method, suffix: &'static str, body: &'static str, expected| {
        let (load, ids) = (load.clone(), ids.clone());
        drive(options.requests, options.concurrency, expected, move |i| {
            let (load, ids, method) = (load.clone(), ids.clone(), method.clone());
            async move {
                let target = format!(
                    "/identities/{}{suffix}?api-version=2025-03-02-preview",
                    ids[i % ids.len()]
                );
                load.send(method, &target, body).await
            }
        })
    };
    let revoke = per_id(reqwest::Method::POST, "/:revokeAccessTokens", "", 204).await;
    let get = per_id(reqwest::Method::GET, "", "", 200).await;
    let issue = {
        let (load, ids) = (load.clone(), ids.clone());
        drive(options.issues, options.concurrency, 200, move |i| {
            let (load, ids) = (load.clone(), ids.clone());
            async move {
                let target = format!(
                    "/identities/{}/:issueAccessToken?api-version=2023-10-01",
                    ids[i % ids.len()]
                );
                load.send(
                    reqwest::Method::POST,
                    &target,
                    r#"{"scopes": ["chat", "voip"], "expiresInMinutes": 60}"#,
                )
                .await
            }
        })
        .await
    };
    let delete = per_id(reqwest::Method::DELETE, "", "", 204).await;
    emulator.shutdown().await;

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "acs-emulator, {} over loopback, limits off, {} concurrent requests, {cores} cores (load generator in the same process)",
        if options.https { "HTTPS" } else { "plain HTTP" },
        options.concurrency
    );
    println!();
    println!("| operation | requests | req/s |");
    println!("|---|---:|---:|");
    for (name, count, rate) in [
        ("create identity", options.requests, create),
        ("revoke tokens", options.requests, revoke),
        ("get identity", options.requests, get),
        ("delete identity", options.requests, delete),
        ("issue token (RS256)", options.issues, issue),
    ] {
        println!("| {name} | {count} | {rate:.0} |");
    }
    println!();
    println!(
        "one RS256 signature (2048-bit, ring, one core): {:.0} µs",
        as_micros(signature)
    );
    Ok(())
}

fn as_micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
