//! Flows: a graph of jobs run on the marketplace with one budget. Each step is a job spec (a
//! `chain://` module or an inline workload, with the spec's fields as its overrides); edges carry
//! a step's output file to another step's input file (`"transcode:/output/out.mp4"` →
//! `"thumbnail:/input/video.mp4"`), or only order two steps (`"a"` → `"b"`), optionally under a
//! condition on the upstream step's exit code or on a JSON field of one of its outputs.
//!
//! [`FlowSpec::plan`] checks a flow before anything runs — every error names the step and the
//! field — refuses cycles (naming the steps on one), and returns the order and the stages of
//! steps that can run in parallel.

use super::{JobSpec, Workload};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Most steps in one flow.
pub const MAX_FLOW_STEPS: usize = 64;
/// Most edges in one flow.
pub const MAX_FLOW_EDGES: usize = 256;
/// Most retries of one step after its own failure.
pub const MAX_STEP_RETRIES: u32 = 10;
/// Longest first backoff before a step's retry (it doubles with each retry).
pub const MAX_BACKOFF_MS: u64 = 3_600_000;

/// A flow as submitted (`flow.run`, `rhizos flow run FLOW`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSpec {
    /// `[a-z0-9_-]{1,64}`.
    pub name: String,
    /// The most the whole flow may cost, held in one escrow when it starts: every step settles
    /// from it and what is left is refunded when the flow ends.
    pub max_cost_micros: i64,
    /// Limit on the whole flow from its start: past it, running steps are stopped and the rest
    /// skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    pub steps: Vec<FlowStep>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edges: Vec<FlowEdge>,
}

/// One step: a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowStep {
    /// `[a-z0-9_-]{1,64}`, unique in the flow.
    pub name: String,
    /// What to run and how; a `module` workload (`chain://…`) is resolved when the flow starts,
    /// and the spec's other fields override the module's.
    pub spec: JobSpec,
    /// The most this step may cost (default: the flow's `max_cost_micros`); never more than the
    /// flow has left when it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_micros: Option<i64>,
    /// Runs again after its own failure this many times (an infrastructure failure is retried
    /// by the job itself, `spec.max_retries`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// Wait before the first retry; doubled for each next one.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Exit codes that count as the step succeeding (default `[0]`): an edge's condition may
    /// then choose a branch by the code.
    #[serde(default = "default_ok_exit_codes")]
    pub ok_exit_codes: Vec<i32>,
}

impl FlowStep {
    /// Step `name` running `spec`, with the defaults a flow file gets: the flow's budget as its
    /// cap, no retry (1 s backoff should one be set), success on exit code 0.
    pub fn new(name: impl Into<String>, spec: JobSpec) -> Self {
        Self {
            name: name.into(),
            spec,
            max_cost_micros: None,
            retries: 0,
            backoff_ms: default_backoff_ms(),
            ok_exit_codes: default_ok_exit_codes(),
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn default_backoff_ms() -> u64 {
    1_000
}

fn default_ok_exit_codes() -> Vec<i32> {
    vec![0]
}

/// An edge: `to` waits for `from` (and takes its file, when both name one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowEdge {
    /// `step` or `step:/output/<path>`.
    pub from: String,
    /// `step` or `step:/input/<path>` (with a file exactly when `from` has one).
    pub to: String,
    /// Followed only when this holds; otherwise `to` is skipped (and so is what depends on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
}

/// A condition on the upstream step's result: its exit code, or a value in one of its JSON
/// output files (a JSON pointer, RFC 6901, compared with `op` to `value`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// `/output/<path>` of the upstream step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<String>,
    /// Where in that file, e.g. `/summary/duration_s` (`""`: the whole document).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    #[serde(default)]
    pub op: CompareOp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

/// How a condition compares: equality on any JSON value, order on numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareOp {
    #[default]
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl Condition {
    /// Whether the condition holds for an upstream step that exited with `exit_code` and whose
    /// JSON output (the file `json` names, already read) is `document`. A file missing or not
    /// JSON, a pointer to nothing, or an order comparison of non-numbers is false.
    pub fn holds(&self, exit_code: i32, document: Option<&serde_json::Value>) -> bool {
        if let Some(code) = self.exit_code {
            return compare_numbers(self.op, f64::from(exit_code), f64::from(code));
        }
        let (Some(pointer), Some(value)) = (&self.pointer, &self.value) else {
            return false;
        };
        let Some(found) = document.and_then(|d| d.pointer(pointer)) else {
            return false;
        };
        match self.op {
            CompareOp::Eq => found == value,
            CompareOp::Ne => found != value,
            op => match (found.as_f64(), value.as_f64()) {
                (Some(found), Some(value)) => compare_numbers(op, found, value),
                _ => false,
            },
        }
    }
}

fn compare_numbers(op: CompareOp, a: f64, b: f64) -> bool {
    match op {
        CompareOp::Eq => a == b,
        CompareOp::Ne => a != b,
        CompareOp::Gt => a > b,
        CompareOp::Ge => a >= b,
        CompareOp::Lt => a < b,
        CompareOp::Le => a <= b,
    }
}

/// What is wrong with a flow: the step (when one) and the field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{field}: {message}", step.as_ref().map(|s| format!("step {s:?}, ")).unwrap_or_default())]
pub struct FlowError {
    pub step: Option<String>,
    /// The field, as a path in the flow file (`steps[2].retries`, `edges[0].from`).
    pub field: String,
    pub message: String,
}

fn flow_error(
    step: Option<&str>,
    field: impl Into<String>,
    message: impl Into<String>,
) -> FlowError {
    FlowError {
        step: step.map(str::to_owned),
        field: field.into(),
        message: message.into(),
    }
}

/// One end of an edge, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub step: String,
    /// The file, relative to the step's `/output` (a `from`) or `/input` (a `to`).
    pub file: Option<String>,
}

impl Endpoint {
    /// Parses `step` or `step:/<dir>/<path>`.
    pub fn parse(text: &str, dir: &str) -> Result<Self, String> {
        let (step, file) = match text.split_once(':') {
            None => (text, None),
            Some((step, path)) => {
                let prefix = format!("/{dir}/");
                let Some(file) = path.strip_prefix(&prefix) else {
                    return Err(format!(
                        "{text:?}: a file here is under {prefix} (e.g. \"{step}:{prefix}out.json\")"
                    ));
                };
                if !super::valid_file_path(file) {
                    return Err(format!(
                        "{text:?}: {file:?} is not a plain relative path (no '.' or '..' segments, at most 255 bytes)"
                    ));
                }
                (step, Some(file.to_owned()))
            }
        };
        if crate::subjects::validate_token("step", step).is_err() {
            return Err(format!(
                "{text:?}: {step:?} is not a step name ([a-z0-9_-], 1 to 64)"
            ));
        }
        Ok(Self {
            step: step.to_owned(),
            file,
        })
    }
}

/// A checked flow: its edges parsed, the order its steps can run in, and the stages of steps
/// that can run at the same time (each stage's steps depend only on earlier stages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowPlan {
    /// Step indexes in an order where each comes after everything it depends on.
    pub order: Vec<usize>,
    /// Step names by stage.
    pub stages: Vec<Vec<String>>,
    /// Each edge's ends, in the order of `edges`.
    pub edges: Vec<(Endpoint, Endpoint)>,
}

impl FlowSpec {
    /// Checks the flow's form and graph; see the module's documentation.
    pub fn plan(&self) -> Result<FlowPlan, FlowError> {
        if crate::subjects::validate_token("flow", &self.name).is_err() {
            return Err(flow_error(
                None,
                "name",
                format!("{:?} is not a flow name ([a-z0-9_-], 1 to 64)", self.name),
            ));
        }
        if self.max_cost_micros <= 0 {
            return Err(flow_error(None, "max_cost_micros", "must be > 0"));
        }
        if self.timeout_ms == Some(0) {
            return Err(flow_error(None, "timeout_ms", "must be > 0 when given"));
        }
        if self.steps.is_empty() || self.steps.len() > MAX_FLOW_STEPS {
            return Err(flow_error(
                None,
                "steps",
                format!("a flow has 1 to {MAX_FLOW_STEPS} steps"),
            ));
        }
        if self.edges.len() > MAX_FLOW_EDGES {
            return Err(flow_error(
                None,
                "edges",
                format!("at most {MAX_FLOW_EDGES} edges"),
            ));
        }
        let mut index = BTreeMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            let name = step.name.as_str();
            let at = |field: &str| format!("steps[{i}].{field}");
            if crate::subjects::validate_token("step", name).is_err() {
                return Err(flow_error(
                    None,
                    at("name"),
                    format!("{name:?} is not a step name ([a-z0-9_-], 1 to 64)"),
                ));
            }
            if index.insert(name, i).is_some() {
                return Err(flow_error(
                    Some(name),
                    at("name"),
                    "another step has this name",
                ));
            }
            match step.max_cost_micros {
                Some(cost) if cost <= 0 => {
                    return Err(flow_error(Some(name), at("max_cost_micros"), "must be > 0"));
                }
                Some(cost) if cost > self.max_cost_micros => {
                    return Err(flow_error(
                        Some(name),
                        at("max_cost_micros"),
                        format!(
                            "{cost} is more than the whole flow's max_cost_micros ({})",
                            self.max_cost_micros
                        ),
                    ));
                }
                _ => {}
            }
            if step.retries > MAX_STEP_RETRIES {
                return Err(flow_error(
                    Some(name),
                    at("retries"),
                    format!("at most {MAX_STEP_RETRIES}"),
                ));
            }
            if step.backoff_ms > MAX_BACKOFF_MS {
                return Err(flow_error(
                    Some(name),
                    at("backoff_ms"),
                    format!("at most {MAX_BACKOFF_MS} (an hour)"),
                ));
            }
            if step.ok_exit_codes.is_empty() {
                return Err(flow_error(
                    Some(name),
                    at("ok_exit_codes"),
                    "name at least one exit code (default [0])",
                ));
            }
            if matches!(step.spec.workload, Workload::Inference { .. }) {
                return Err(flow_error(
                    Some(name),
                    at("spec.workload"),
                    "inference requests go through the gateway, not flows",
                ));
            }
            if step.spec.timeout_ms == 0 {
                return Err(flow_error(Some(name), at("spec.timeout_ms"), "must be > 0"));
            }
        }

        // Edges: both ends known, files on both ends or neither, one source per input file.
        let mut edges = Vec::with_capacity(self.edges.len());
        let mut fed = BTreeSet::new();
        let mut after: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); self.steps.len()];
        for (e, edge) in self.edges.iter().enumerate() {
            let at = |field: &str| format!("edges[{e}].{field}");
            let from = Endpoint::parse(&edge.from, "output")
                .map_err(|m| flow_error(None, at("from"), m))?;
            let to =
                Endpoint::parse(&edge.to, "input").map_err(|m| flow_error(None, at("to"), m))?;
            let Some(&source) = index.get(from.step.as_str()) else {
                return Err(flow_error(
                    None,
                    at("from"),
                    format!("no step is named {:?}", from.step),
                ));
            };
            let Some(&target) = index.get(to.step.as_str()) else {
                return Err(flow_error(
                    None,
                    at("to"),
                    format!("no step is named {:?}", to.step),
                ));
            };
            if source == target {
                return Err(flow_error(
                    Some(&to.step),
                    at("to"),
                    "a step cannot feed itself",
                ));
            }
            if from.file.is_some() != to.file.is_some() {
                return Err(flow_error(
                    Some(&to.step),
                    at("to"),
                    "name a file on both ends (step:/output/… → step:/input/…) or on neither (order only)",
                ));
            }
            if let Some(file) = &to.file {
                if !fed.insert((target, file.clone())) {
                    return Err(flow_error(
                        Some(&to.step),
                        at("to"),
                        format!("another edge already feeds /input/{file}"),
                    ));
                }
                if self.steps[target].spec.input_files.contains_key(file) {
                    return Err(flow_error(
                        Some(&to.step),
                        at("to"),
                        format!("/input/{file} is also one of the step's own spec.input_files"),
                    ));
                }
            }
            if let Some(condition) = &edge.when {
                check_condition(condition)
                    .map_err(|m| flow_error(Some(&from.step), at("when"), m))?;
            }
            after[target].insert(source);
            edges.push((from, to));
        }

        // Kahn's algorithm, stage by stage; what is left over lies on a cycle.
        let mut waiting: Vec<usize> = after.iter().map(BTreeSet::len).collect();
        let mut stage: Vec<usize> = (0..self.steps.len()).filter(|&i| waiting[i] == 0).collect();
        let (mut order, mut stages) = (Vec::new(), Vec::new());
        while !stage.is_empty() {
            let mut next = Vec::new();
            for &done in &stage {
                for (target, sources) in after.iter().enumerate() {
                    if sources.contains(&done) {
                        waiting[target] -= 1;
                        if waiting[target] == 0 {
                            next.push(target);
                        }
                    }
                }
            }
            order.extend(&stage);
            stages.push(stage.iter().map(|&i| self.steps[i].name.clone()).collect());
            stage = next;
        }
        if order.len() < self.steps.len() {
            let cycle = find_cycle(&after, &waiting)
                .into_iter()
                .map(|i| self.steps[i].name.as_str())
                .collect::<Vec<_>>();
            return Err(flow_error(
                cycle.first().copied(),
                "edges",
                format!(
                    "the steps form a cycle ({}): a flow must be acyclic",
                    cycle.join(" → ")
                ),
            ));
        }
        Ok(FlowPlan {
            order,
            stages,
            edges,
        })
    }
}

/// `flow.estimate` request: what each step of `flow` would cost on the nodes online now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EstimateFlow {
    pub v: u32,
    pub flow: FlowSpec,
}

/// `flow.estimate` reply. A run's estimate is the most it can cost on a node: its whole
/// timeout at that node's prices (the hold a job makes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEstimate {
    pub flow: String,
    /// Steps by stage: a stage's steps can run at the same time.
    pub stages: Vec<Vec<String>>,
    pub steps: Vec<StepEstimate>,
    /// Σ of each step's one run on the cheapest node that can run it.
    pub cheapest_micros: i64,
    /// Σ of each step's every run (`1 + retries`) on the dearest node that can run it: the
    /// most the flow can cost.
    pub worst_case_micros: i64,
    pub max_cost_micros: i64,
    /// `max_cost_micros` covers the worst case, and every step has a node now.
    pub fits: bool,
}

/// One step's estimate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEstimate {
    pub step: String,
    /// The backend it runs on (a module's, once resolved).
    pub backend: String,
    /// The module it was resolved from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Live nodes that can run it within its cost cap.
    pub nodes: usize,
    /// One run on the cheapest / the dearest of those nodes (0 when none).
    pub cheapest_micros: i64,
    pub dearest_micros: i64,
    /// Runs at most: `1 + retries`.
    pub runs: u32,
    /// Why no node can run it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// `flow.run` request: start `flow`, paid from `account` (the caller's own).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunFlow {
    pub v: u32,
    /// Client-chosen id (`[a-z0-9_-]{1,40}`), so a retry starts the flow once; the
    /// orchestrator picks one if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_id: Option<String>,
    pub account: String,
    pub flow: FlowSpec,
}

/// `flow.get` / `flow.cancel` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowRef {
    pub v: u32,
    pub flow_id: String,
}

/// `flow.cancel` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelFlow {
    pub v: u32,
    pub flow_id: String,
}

/// `flow.list` request: the caller's flows (an operator: `account`'s, or everyone's), newest
/// first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListFlows {
    pub v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// At most this many (default 50, at most 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// `flow.list` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowList {
    pub flows: Vec<FlowView>,
}

/// Where a flow is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    /// Steps run as their inputs become ready.
    Running,
    /// Cancelled or past its timeout: its running steps are being stopped; it ends
    /// `cancelled` or `timed_out` once they have.
    Stopping,
    /// Every step succeeded or was skipped by a condition.
    Succeeded,
    /// A step failed (its dependants were skipped; the other branches ran on).
    Failed,
    Cancelled,
    TimedOut,
}

impl FlowState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Stopping,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
            Self::TimedOut,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// The flow has ended and its escrow is closed.
    pub const fn is_terminal(self) -> bool {
        !matches!(self, Self::Running | Self::Stopping)
    }
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Its inputs are not ready yet (or the flow's budget is held by other running steps).
    Waiting,
    /// Its job is submitted and not ended.
    Running,
    /// Its run failed and it waits its backoff before the next.
    Retrying,
    /// It exited with one of its `ok_exit_codes`.
    Succeeded,
    /// Its last run failed; its dependants are skipped.
    Failed,
    /// Not run: an upstream step failed or was skipped, or a condition on an edge into it was
    /// false.
    Skipped,
    /// Stopped or never started because the flow was cancelled or timed out.
    Cancelled,
}

impl StepState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Waiting,
            Self::Running,
            Self::Retrying,
            Self::Succeeded,
            Self::Failed,
            Self::Skipped,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Skipped | Self::Cancelled
        )
    }
}

/// A flow as `flow.run`, `flow.get`, `flow.list` and `flow.cancel` answer it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    pub flow_id: String,
    pub name: String,
    pub account: String,
    pub state: FlowState,
    /// Why it failed, was cancelled or timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Held in the flow's escrow when it started.
    pub max_cost_micros: i64,
    /// Left in the flow's escrow now (what the steps have not spent or hold).
    pub escrow_micros: i64,
    /// Once ended: what its steps cost in all, and what went back to the account
    /// (`cost_micros + refund_micros = max_cost_micros`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_micros: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_micros: Option<i64>,
    pub created_ms: u64,
    pub updated_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// In the flow file's order.
    pub steps: Vec<StepView>,
    /// The flow's edges as given (`from` → `to`), for drawing its graph.
    pub edges: Vec<FlowEdge>,
}

/// One step of a [`FlowView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepView {
    pub step: String,
    pub state: StepState,
    /// Runs started so far (a retry is a run).
    pub runs: u32,
    /// The job of its latest run: `<flow_id>-<step index>-<run>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What its ended runs cost.
    pub cost_micros: i64,
    /// A retrying step's next run, not before (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
}

fn check_condition(condition: &Condition) -> Result<(), String> {
    match (condition.exit_code, &condition.json) {
        (Some(_), None) => {
            if condition.pointer.is_some() || condition.value.is_some() {
                return Err("an exit_code condition takes no pointer or value".into());
            }
            Ok(())
        }
        (None, Some(json)) => {
            let file = json.strip_prefix("/output/").ok_or_else(|| {
                format!("json: {json:?} must name one of the upstream step's files, /output/<path>")
            })?;
            if !super::valid_file_path(file) {
                return Err(format!("json: {file:?} is not a plain relative path"));
            }
            match &condition.pointer {
                Some(p) if p.is_empty() || p.starts_with('/') => {}
                Some(p) => {
                    return Err(format!(
                        "pointer: {p:?} is not a JSON pointer (\"\" or starting with '/')"
                    ));
                }
                None => return Err("pointer: where in the JSON file, e.g. \"/status\"".into()),
            }
            let Some(value) = &condition.value else {
                return Err("value: what to compare the JSON value with".into());
            };
            if !matches!(condition.op, CompareOp::Eq | CompareOp::Ne) && value.as_f64().is_none() {
                return Err(format!(
                    "value: {:?} compares numbers: give a number",
                    condition.op
                ));
            }
            Ok(())
        }
        _ => Err("give either exit_code, or json + pointer + value".into()),
    }
}

/// Steps on one cycle among those Kahn's algorithm left waiting: walks back along unfinished
/// dependencies until a step repeats.
fn find_cycle(after: &[BTreeSet<usize>], waiting: &[usize]) -> Vec<usize> {
    let Some(start) = (0..waiting.len()).find(|&i| waiting[i] > 0) else {
        return Vec::new();
    };
    let mut path = vec![start];
    let mut seen = BTreeMap::from([(start, 0)]);
    let mut at = start;
    loop {
        let Some(&previous) = after[at].iter().find(|&&s| waiting[s] > 0) else {
            return path;
        };
        if let Some(&position) = seen.get(&previous) {
            // `path` runs against the edges; the cycle reads forward reversed, told from the
            // step that comes first in the flow.
            let mut cycle: Vec<usize> = path[position..].iter().rev().copied().collect();
            let first = (0..cycle.len()).min_by_key(|&i| cycle[i]).unwrap_or(0);
            cycle.rotate_left(first);
            cycle.push(cycle[0]);
            return cycle;
        }
        seen.insert(previous, path.len());
        path.push(previous);
        at = previous;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str) -> FlowStep {
        FlowStep {
            name: name.into(),
            spec: JobSpec::new(
                Workload::Module {
                    uri: "chain://demo".into(),
                },
                10_000,
                64,
            ),
            max_cost_micros: None,
            retries: 0,
            backoff_ms: default_backoff_ms(),
            ok_exit_codes: default_ok_exit_codes(),
        }
    }

    fn edge(from: &str, to: &str) -> FlowEdge {
        FlowEdge {
            from: from.into(),
            to: to.into(),
            when: None,
        }
    }

    fn flow(steps: &[&str], edges: Vec<FlowEdge>) -> FlowSpec {
        FlowSpec {
            name: "video".into(),
            max_cost_micros: 1_000_000,
            timeout_ms: None,
            steps: steps.iter().map(|s| step(s)).collect(),
            edges,
        }
    }

    #[test]
    fn a_fan_out_plans_its_branches_in_one_stage() {
        let plan = flow(
            &["transcode", "thumbnail", "captions", "publish"],
            vec![
                edge("transcode:/output/out.mp4", "thumbnail:/input/video.mp4"),
                edge("transcode:/output/out.mp4", "captions:/input/video.mp4"),
                edge("thumbnail", "publish"),
                edge("captions:/output/en.vtt", "publish:/input/en.vtt"),
            ],
        )
        .plan()
        .unwrap();
        assert_eq!(
            plan.stages,
            vec![
                vec!["transcode".to_owned()],
                vec!["thumbnail".to_owned(), "captions".to_owned()],
                vec!["publish".to_owned()]
            ]
        );
        assert_eq!(plan.order, vec![0, 1, 2, 3]);
        assert_eq!(
            plan.edges[0].1,
            Endpoint {
                step: "thumbnail".into(),
                file: Some("video.mp4".into())
            }
        );
    }

    #[test]
    fn a_cycle_is_refused_naming_its_steps() {
        let error = flow(
            &["a", "b", "c", "d"],
            vec![
                edge("a", "b"),
                edge("b", "c"),
                edge("c", "d"),
                edge("d", "b"),
            ],
        )
        .plan()
        .unwrap_err();
        assert_eq!(error.field, "edges");
        assert!(error.message.contains("b → c → d → b"), "{error}");
    }

    #[test]
    fn errors_name_the_step_and_the_field() {
        let mut bad = flow(&["a", "b"], vec![edge("a:/output/x", "b:/input/../x")]);
        let error = bad.plan().unwrap_err();
        assert_eq!(
            (error.step.as_deref(), error.field.as_str()),
            (None, "edges[0].to")
        );

        bad.edges = vec![edge("a:/output/x", "c:/input/x")];
        assert!(
            bad.plan()
                .unwrap_err()
                .message
                .contains("no step is named \"c\"")
        );

        bad.edges = vec![edge("a:/output/x", "b")];
        assert!(bad.plan().unwrap_err().message.contains("both ends"));

        bad.edges = vec![edge("a:/input/x", "b:/input/x")];
        assert!(bad.plan().unwrap_err().message.contains("/output/"));

        bad.edges = vec![
            edge("a:/output/x", "b:/input/y"),
            edge("a:/output/z", "b:/input/y"),
        ];
        let error = bad.plan().unwrap_err();
        assert_eq!(
            (error.step.as_deref(), error.field.as_str()),
            (Some("b"), "edges[1].to")
        );

        bad.edges = Vec::new();
        bad.steps[1].retries = MAX_STEP_RETRIES + 1;
        let error = bad.plan().unwrap_err();
        assert_eq!(
            error.to_string(),
            "step \"b\", steps[1].retries: at most 10"
        );

        bad.steps[1].retries = 0;
        bad.steps[1].max_cost_micros = Some(2_000_000);
        assert_eq!(bad.plan().unwrap_err().field, "steps[1].max_cost_micros");

        bad.steps[1] = step("a");
        assert!(bad.plan().unwrap_err().message.contains("another step"));

        let mut bad = flow(&["a"], Vec::new());
        bad.max_cost_micros = 0;
        assert_eq!(bad.plan().unwrap_err().field, "max_cost_micros");
    }

    #[test]
    fn conditions_are_checked_and_evaluated() {
        let mut guarded = flow(&["probe", "encode"], vec![edge("probe", "encode")]);
        guarded.edges[0].when = Some(Condition {
            exit_code: None,
            json: Some("/output/probe.json".into()),
            pointer: Some("/streams/0/width".into()),
            op: CompareOp::Ge,
            value: Some(serde_json::json!(1280)),
        });
        guarded.plan().unwrap();
        let when = guarded.edges[0].when.clone().unwrap();
        let wide = serde_json::json!({"streams": [{"width": 1920}]});
        let narrow = serde_json::json!({"streams": [{"width": 640}]});
        assert!(when.holds(0, Some(&wide)));
        assert!(!when.holds(0, Some(&narrow)));
        assert!(!when.holds(0, None), "no file: false");
        assert!(!when.holds(0, Some(&serde_json::json!({"streams": []}))));

        let code = Condition {
            exit_code: Some(2),
            json: None,
            pointer: None,
            op: CompareOp::Eq,
            value: None,
        };
        assert!(code.holds(2, None) && !code.holds(0, None));

        guarded.edges[0].when = Some(Condition {
            value: Some(serde_json::json!("wide")),
            ..when.clone()
        });
        assert_eq!(guarded.plan().unwrap_err().field, "edges[0].when");
        guarded.edges[0].when = Some(Condition {
            exit_code: Some(0),
            ..when
        });
        assert!(
            guarded
                .plan()
                .unwrap_err()
                .message
                .contains("either exit_code")
        );
    }

    /// The README's worked example is a valid flow with the stages it says.
    #[test]
    fn the_readme_flow_example_checks() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("## Flows").expect("README has a Flows section")..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let end = start + section[start..].find("```").unwrap();
        let flow: FlowSpec = toml::from_str(&section[start..end]).unwrap();
        let plan = flow.plan().unwrap();
        assert_eq!(
            plan.stages,
            vec![
                vec!["transcode".to_owned()],
                vec!["thumbnail".to_owned(), "captions".to_owned()]
            ]
        );
        assert!(section.contains("stage 2: thumbnail,\ncaptions"));
    }

    /// The quick start's flow file is a valid flow: one step, then two at once.
    #[test]
    fn the_quickstart_flow_checks() {
        let flow: FlowSpec =
            toml::from_str(include_str!("../../../testbed/flows/quickstart.toml")).unwrap();
        assert_eq!(
            flow.plan().unwrap().stages,
            vec![
                vec!["shout".to_owned()],
                vec!["left".to_owned(), "right".to_owned()]
            ]
        );
    }

    #[test]
    fn a_flow_file_reads_from_json_and_toml_alike() {
        let toml_text = r#"
name = "video"
max_cost_micros = 2000000
timeout_ms = 600000

[[steps]]
name = "transcode"
retries = 2
spec = { workload = { backend = "module", uri = "chain://ffmpeg" }, args = ["-i", "/input/in.mp4"], timeout_ms = 60000, memory_mib = 256 }

[[steps]]
name = "thumbnail"
spec = { workload = { backend = "docker", image = "rhizos/thumbs:1" }, timeout_ms = 30000, memory_mib = 128 }

[[edges]]
from = "transcode:/output/out.mp4"
to = "thumbnail:/input/video.mp4"
when = { exit_code = 0 }
"#;
        let from_toml: FlowSpec = toml::from_str(toml_text).unwrap();
        let json = serde_json::to_string(&from_toml).unwrap();
        let from_json: FlowSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(from_toml, from_json);
        assert_eq!(from_toml.steps[0].retries, 2);
        assert_eq!(from_toml.steps[1].backoff_ms, 1_000);
        from_toml.plan().unwrap();
        let typo = toml_text.replace("retries = 2", "retry = 2");
        assert!(
            toml::from_str::<FlowSpec>(&typo)
                .unwrap_err()
                .to_string()
                .contains("retry")
        );
    }
}
