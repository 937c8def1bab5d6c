//! `container-overhead`: a container job (Docker plugin) from submit to its first output line
//! and to settled, against a bare `docker run --rm` of the same image with the same sandbox
//! flags: the ratio is what RhizOS adds.

use crate::report::{self, Maybe, Summary};
use anyhow::Context as _;
use futures::StreamExt as _;
use rhizos_broker::wire::{Event, EventBody, JobState, SubmitJob, WIRE_VERSION};
use rhizos_testbed::{Cluster, ClusterOptions};
use serde::Serialize;
use std::fmt;
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub struct Report {
    bench: &'static str,
    runs: usize,
    build: &'static str,
    image: String,
    docker_run_first_line_ms: Option<Summary>,
    docker_run_exit_ms: Option<Summary>,
    rhizos_submit_to_first_line_ms: Option<Summary>,
    rhizos_submit_to_settled_ms: Option<Summary>,
    ratio_first_line: f64,
    ratio_end: f64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let median = |s: &Option<Summary>| s.map_or(f64::NAN, |s| s.median);
        writeln!(
            f,
            "container job overhead, medians over {} sequential runs ({} build, image {}):",
            self.runs, self.build, self.image
        )?;
        writeln!(
            f,
            "  bare `docker run --rm`: first line {:>8.1} ms, exited {:>8.1} ms",
            median(&self.docker_run_first_line_ms),
            median(&self.docker_run_exit_ms)
        )?;
        writeln!(
            f,
            "  rhizos job (submit):    first line {:>8.1} ms, settled {:>8.1} ms",
            median(&self.rhizos_submit_to_first_line_ms),
            median(&self.rhizos_submit_to_settled_ms)
        )?;
        writeln!(
            f,
            "  ratio rhizos / docker run: to first line {:.2}×, to the end {:.2}×",
            self.ratio_first_line, self.ratio_end
        )?;
        writeln!(
            f,
            "  rhizos submit → first line: {}",
            Maybe(&self.rhizos_submit_to_first_line_ms)
        )
    }
}

const ARGS: [&str; 2] = ["out:started", "exit:0"];

pub async fn run(runs: usize) -> anyhow::Result<Report> {
    anyhow::ensure!(runs > 0, "--runs must be at least 1");
    anyhow::ensure!(
        rhizos_testbed::images::docker_available(),
        "no Docker engine answers (`docker info`)"
    );
    let image = rhizos_testbed::images::probe_image()?;
    let (mut bare_first, mut bare_total) = bare_docker_runs(&image, runs).await?;
    let (mut job_first, mut job_total) = rhizos_runs(&image, runs).await?;
    let (bare_first_s, bare_total_s) = (Summary::of(&mut bare_first), Summary::of(&mut bare_total));
    let (job_first_s, job_total_s) = (Summary::of(&mut job_first), Summary::of(&mut job_total));
    let median = |s: &Option<Summary>| s.map_or(f64::NAN, |s| s.median);
    Ok(Report {
        bench: "container-overhead",
        runs,
        build: report::build(),
        ratio_first_line: median(&job_first_s) / median(&bare_first_s),
        ratio_end: median(&job_total_s) / median(&bare_total_s),
        image,
        docker_run_first_line_ms: bare_first_s,
        docker_run_exit_ms: bare_total_s,
        rhizos_submit_to_first_line_ms: job_first_s,
        rhizos_submit_to_settled_ms: job_total_s,
    })
}

/// `docker run --rm` with the plugin's sandbox flags: time to the first stdout line and to the
/// exit, for `runs` runs after one warm-up.
async fn bare_docker_runs(
    image: &str,
    runs: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    use tokio::io::AsyncBufReadExt as _;
    let (mut first_line, mut total) = (Vec::new(), Vec::new());
    for index in 0..=runs {
        let started = Instant::now();
        let mut child = tokio::process::Command::new("docker")
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                "--memory",
                "64m",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "--user",
                "65534:65534",
                image,
            ])
            .args(ARGS)
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("docker run has no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = lines.next_line().await?;
        let to_first = started.elapsed();
        anyhow::ensure!(
            first.as_deref() == Some("started"),
            "docker run printed {first:?}"
        );
        anyhow::ensure!(child.wait().await?.success(), "docker run failed");
        if index > 0 {
            first_line.push(to_first);
            total.push(started.elapsed());
        }
    }
    Ok((first_line, total))
}

/// Through RhizOS: submit over NATS, placed, assigned, the plugin creates / copies / attaches /
/// starts; the first line arrives on the job's log subject; the end is the settled event.
async fn rhizos_runs(image: &str, runs: usize) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![rhizos_testbed::plugin_file("rhizos_plugin_docker")?],
        plugin_config: [("docker".to_owned(), serde_json::json!({"pull": "never"}))].into(),
        node_prefix: format!("bench{}", &rhizos_testbed::cluster::uuid_like()[..8]),
        ..ClusterOptions::default()
    })
    .await?;
    cluster.funded_account("bench", 1_000_000_000).await?;
    let client = cluster.client();
    let (mut first_line, mut total) = (Vec::new(), Vec::new());
    for index in 0..=runs {
        let job_id = format!("overhead-{index}");
        let mut logs = cluster
            .bus
            .client
            .subscribe(cluster.bus.subjects.job_logs_of(Some("bench"), &job_id)?)
            .await?;
        let mut events = cluster
            .bus
            .client
            .subscribe(cluster.bus.subjects.job_events_of(Some("bench"), &job_id)?[0].clone())
            .await?;
        cluster.bus.client.flush().await?;
        let request = SubmitJob {
            v: WIRE_VERSION,
            job_id: Some(job_id.clone()),
            account: "bench".into(),
            spec: rhizos_testbed::cluster::docker_spec(image, &ARGS, 30_000),
            max_cost_micros: 1_000_000,
            api_key_sha256: None,
        };
        let started = Instant::now();
        client.submit(&request).await?;
        tokio::time::timeout(Duration::from_secs(30), logs.next())
            .await
            .with_context(|| format!("no output from {job_id} within 30 s"))?
            .context("log subscription closed")?;
        let to_first = started.elapsed();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), events.next())
                .await
                .with_context(|| format!("{job_id} did not end within 30 s"))?
                .context("event subscription closed")?;
            if let Ok(Event {
                body: EventBody::Job { state, .. },
                ..
            }) = serde_json::from_slice(&message.payload)
                && state.is_terminal()
            {
                anyhow::ensure!(state == JobState::Succeeded, "{job_id} ended {state:?}");
                break;
            }
        }
        if index > 0 {
            first_line.push(to_first);
            total.push(started.elapsed());
        }
    }
    cluster.shutdown().await?;
    Ok((first_line, total))
}
