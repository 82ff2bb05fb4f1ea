//! Progress lines while a scenario works, the final table, and the JSON result file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// One line on stderr, prefixed with the elapsed time since start.
pub fn say(message: impl AsRef<str>) {
    eprintln!("bench: {}", message.as_ref());
}

/// Prints `what: done/total, rate, elapsed` every 5 s until finished.
pub struct Progress {
    what: String,
    total: usize,
    started: Instant,
    count: Arc<dyn Fn() -> usize + Send + Sync>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(
        what: &str,
        total: usize,
        count: impl Fn() -> usize + Send + Sync + 'static,
    ) -> Self {
        let count: Arc<dyn Fn() -> usize + Send + Sync> = Arc::new(count);
        let started = Instant::now();
        let task = tokio::spawn({
            let (what, count) = (what.to_owned(), count.clone());
            async move {
                let mut last = (0usize, Instant::now());
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let done = count();
                    let recent = (done.saturating_sub(last.0)) as f64
                        / last.1.elapsed().as_secs_f64().max(1e-3);
                    last = (done, Instant::now());
                    say(line(&what, done, total, started, Some(recent)));
                }
            }
        });
        Self {
            what: what.to_owned(),
            total,
            started,
            count,
            task,
        }
    }

    pub fn current(&self) -> usize {
        (self.count)()
    }

    pub fn finish(self) {
        self.task.abort();
        say(line(
            &self.what,
            (self.count)(),
            self.total,
            self.started,
            None,
        ));
    }
}

fn line(what: &str, done: usize, total: usize, started: Instant, recent: Option<f64>) -> String {
    let elapsed = started.elapsed().as_secs_f64();
    let rate = done as f64 / elapsed.max(1e-3);
    let recent = recent
        .map(|r| format!(" (last 5 s: {r:.1}/s)"))
        .unwrap_or_default();
    format!("{what}: {done}/{total}, {rate:.1}/s{recent}, elapsed {elapsed:.1}s")
}

/// The figures of one scenario: printed as a table and written as JSON.
pub struct Results {
    scenario: String,
    rows: Vec<(String, String, String)>,
    json: serde_json::Map<String, Value>,
}

impl Results {
    pub fn new(scenario: &str) -> Self {
        let mut json = serde_json::Map::new();
        json.insert("scenario".into(), scenario.into());
        json.insert(
            "startedAt".into(),
            jiff::Timestamp::now().to_string().into(),
        );
        json.insert(
            "machine".into(),
            serde_json::json!({
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "loadAverageWhenMeasured": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            }),
        );
        Self {
            scenario: scenario.to_owned(),
            rows: Vec::new(),
            json,
        }
    }

    /// A figure: a table row (name, value, goal) and a JSON field.
    pub fn figure(&mut self, key: &str, label: &str, value: Value, shown: String, goal: &str) {
        self.json.insert(key.to_owned(), value);
        self.rows.push((label.to_owned(), shown, goal.to_owned()));
    }

    /// Extra data for the JSON only.
    pub fn data(&mut self, key: &str, value: Value) {
        self.json.insert(key.to_owned(), value);
    }

    /// Prints the table and writes `bench-results/<scenario>-<time>.json`.
    pub fn finish(mut self, repo: &Path) -> anyhow::Result<PathBuf> {
        self.json.insert(
            "finishedAt".into(),
            jiff::Timestamp::now().to_string().into(),
        );
        let width = |f: fn(&(String, String, String)) -> &String, min: usize| {
            self.rows
                .iter()
                .map(|r| f(r).chars().count())
                .max()
                .unwrap_or(0)
                .max(min)
        };
        let (a, b) = (width(|r| &r.0, 6), width(|r| &r.1, 5));
        println!();
        println!("== {} ==", self.scenario);
        println!("{:<a$}  {:>b$}  goal", "figure", "value");
        println!("{}", "-".repeat(a + b + 10));
        for (label, value, goal) in &self.rows {
            println!("{label:<a$}  {value:>b$}  {goal}");
        }
        let dir = repo.join("bench-results");
        std::fs::create_dir_all(&dir)?;
        let stamp = jiff::Timestamp::now()
            .strftime("%Y%m%dT%H%M%SZ")
            .to_string();
        let path = dir.join(format!("{}-{stamp}.json", self.scenario));
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&Value::Object(self.json))? + "\n",
        )?;
        println!("results: {}", path.display());
        Ok(path)
    }
}

/// The `q`-quantile (0..=1) of `values` (sorted here), or 0 when empty.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[index]
}
