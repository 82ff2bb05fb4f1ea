//! Reading what the emulator and the operator report: the emulator's admin endpoints and the
//! operator's /metrics and /readyz.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::procs::Emulator;

/// The admin endpoints of one emulator.
#[derive(Clone)]
pub struct Admin {
    http: reqwest::Client,
    base: String,
}

impl Admin {
    pub fn new(emulator: &Emulator) -> anyhow::Result<Self> {
        let pem = std::fs::read(&emulator.ca_file).context("the emulator's ca.crt")?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            http,
            base: format!("{}/_emulator", emulator.endpoint),
        })
    }

    pub async fn stats(&self) -> anyhow::Result<Stats> {
        let value: Value = self
            .http
            .get(format!("{}/stats", self.base))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(Stats(value))
    }

    /// The emulator's verdict on a token: "valid", "expired", "revoked", …
    pub async fn validate(&self, token: &str) -> anyhow::Result<String> {
        let value: Value = self
            .http
            .post(format!("{}/validate", self.base))
            .json(&json!({"token": token}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(value["status"].as_str().unwrap_or("?").to_owned())
    }

    pub async fn patch_config(&self, patch: Value) -> anyhow::Result<Value> {
        Ok(self
            .http
            .patch(format!("{}/config", self.base))
            .json(&patch)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub async fn outage(&self, mode: &str, seconds: u64) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/outage", self.base))
            .json(&json!({"mode": mode, "seconds": seconds}))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

/// `GET /_emulator/stats`.
#[derive(Clone, Debug)]
pub struct Stats(pub Value);

impl Stats {
    pub fn alive(&self) -> u64 {
        self.0["identitiesAlive"].as_u64().unwrap_or(0)
    }

    /// API requests by operation and status.
    pub fn requests(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        if let Some(ops) = self.0["requests"].as_object() {
            for (op, statuses) in ops {
                let entry: &mut BTreeMap<String, u64> = out.entry(op.clone()).or_default();
                for (status, count) in statuses.as_object().into_iter().flatten() {
                    entry.insert(status.clone(), count.as_u64().unwrap_or(0));
                }
            }
        }
        out
    }

    pub fn total_requests(&self) -> u64 {
        self.requests().values().flat_map(|s| s.values()).sum()
    }

    /// Requests answered with `status`, over every operation.
    pub fn with_status(&self, status: &str) -> u64 {
        self.requests().values().filter_map(|s| s.get(status)).sum()
    }
}

/// The operator's /metrics text.
pub async fn operator_metrics(addr: &str) -> anyhow::Result<String> {
    Ok(reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .text()
        .await?)
}

/// Sum of the samples of metric `name` (exact name, any labels) whose labels contain every
/// string in `having`.
pub fn metric_sum(text: &str, name: &str, having: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && having.iter().all(|h| labels.contains(h)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

pub async fn operator_ready(addr: &str) -> bool {
    reqwest::Client::new()
        .get(format!("http://{addr}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}
