//! What `rhizos top` shows, as plain data: updates from the bus and key presses change it, and
//! [`super::ui`] draws it. Nothing here touches the terminal or the network, so tests drive it
//! with made-up updates and keys and compare the drawn screen.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use rhizos_broker::wire::{
    EscrowKind, Event, EventBody, Heartbeat, JobState, JobView, LogBatch, LogStream,
    NetworkStatsView, NodeView, PluginList,
};
use std::collections::{BTreeMap, VecDeque};

/// Jobs kept in the stream (the oldest go first).
pub const MAX_JOBS: usize = 1_000;
/// Log lines kept for the open job (its tail).
pub const MAX_LOG_LINES: usize = 2_000;

/// Whose view this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything: every node, every account's jobs, fees, heartbeats.
    Operator,
    /// One account's jobs and money (what a user may see), and the public node list.
    Account(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Overview,
    Nodes,
    Jobs,
}

impl Tab {
    pub const ALL: [Tab; 3] = [Tab::Overview, Tab::Nodes, Tab::Jobs];

    pub fn title(self) -> &'static str {
        match self {
            Tab::Overview => "1 Overview",
            Tab::Nodes => "2 Nodes",
            Tab::Jobs => "3 Jobs",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }
}

/// The nodes table's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeSort {
    Id,
    /// Busiest first.
    Load,
    /// Cheapest CPU-hour first.
    Price,
    /// Best record first.
    Reputation,
    /// Busiest GPUs first.
    Gpu,
}

impl NodeSort {
    pub fn name(self) -> &'static str {
        match self {
            NodeSort::Id => "id",
            NodeSort::Load => "load",
            NodeSort::Price => "price",
            NodeSort::Reputation => "reputation",
            NodeSort::Gpu => "gpu",
        }
    }

    fn next(self) -> Self {
        match self {
            NodeSort::Id => NodeSort::Load,
            NodeSort::Load => NodeSort::Price,
            NodeSort::Price => NodeSort::Reputation,
            NodeSort::Reputation => NodeSort::Gpu,
            NodeSort::Gpu => NodeSort::Id,
        }
    }
}

/// A node as top knows it: its registration view, refreshed by heartbeats.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub view: NodeView,
    /// When its last heartbeat was sent (ms since the epoch).
    pub seen_ms: u64,
}

/// A job in the stream, from `job.list` and then from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub job_id: String,
    pub account: String,
    pub backend: Option<String>,
    pub state: JobState,
    pub attempt: u32,
    pub node_id: Option<String>,
    pub max_cost_micros: Option<i64>,
    pub cost_micros: Option<i64>,
    pub reason: Option<String>,
    pub updated_ms: u64,
}

impl JobRow {
    /// A job first heard of by an event: what the event says, the rest unknown yet.
    fn heard(job_id: &str, account: String, state: JobState, attempt: u32, ts_ms: u64) -> Self {
        Self {
            job_id: job_id.to_owned(),
            account,
            backend: None,
            state,
            attempt,
            node_id: None,
            max_cost_micros: None,
            cost_micros: None,
            reason: None,
            updated_ms: ts_ms,
        }
    }

    fn from_view(view: &JobView) -> Self {
        Self {
            job_id: view.job_id.clone(),
            account: view.account.clone(),
            backend: Some(view.backend.clone()),
            state: view.state,
            attempt: view.attempt,
            node_id: view.node_id.clone(),
            max_cost_micros: Some(view.max_cost_micros),
            cost_micros: view.cost_micros,
            reason: view.reason.clone(),
            updated_ms: view.updated_ms,
        }
    }
}

/// What the overlay shows after Enter.
#[derive(Debug, Clone)]
pub enum Detail {
    Job {
        job_id: String,
        view: Option<Box<JobView>>,
        /// The log's tail: (stream, line).
        logs: VecDeque<(LogStream, String)>,
        /// The next line number expected; lines skipped (not streamed) are counted.
        next_seq: u64,
        skipped: u64,
    },
    Node {
        node_id: String,
        /// The node's plugins as its agent answers now (`node.plugins`), or why not.
        plugins: Option<Result<PluginList, String>>,
    },
}

/// Something the model learned from the bus.
#[derive(Debug, Clone)]
pub enum Update {
    Stats(Box<NetworkStatsView>),
    Nodes(Vec<NodeView>),
    Heartbeat(Heartbeat),
    /// A job or escrow event, with the account its subject names.
    Event(Option<String>, Event),
    /// Recent jobs (`job.list`), newest first.
    Jobs(Vec<JobView>),
    /// The open job as `job.get` answered.
    Job(Box<JobView>),
    Logs(LogBatch),
    Plugins(String, Result<PluginList, String>),
    /// A request or the connection failed (None: working again).
    Problem(Option<String>),
}

/// What the runtime must do after a key or an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Quit,
    /// Fetch the job and follow its logs (job id, account).
    OpenJob(String, String),
    /// Ask the node's agent for its plugins.
    OpenNode(String),
    /// Stop following the open job's logs.
    Close,
    /// Fetch the open job again (it changed state).
    RefreshJob(String),
}

/// Rates from the last two stats replies, per second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub jobs_ended: f64,
    pub ai_requests: f64,
    pub tokens: f64,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub scope: Scope,
    pub namespace: String,
    pub now_ms: u64,
    pub tab: Tab,
    pub stats: Option<NetworkStatsView>,
    pub rates: Option<Rates>,
    pub nodes: BTreeMap<String, NodeRow>,
    pub node_sort: NodeSort,
    pub jobs: BTreeMap<String, JobRow>,
    /// The filter typed after `/` (matched against ids, states, accounts, backends).
    pub filter: String,
    /// Typing a filter: keys go into it until Enter or Esc.
    pub filtering: bool,
    /// Selected row on the Nodes and Jobs tabs.
    pub selected: [usize; 3],
    pub detail: Option<Detail>,
    /// What went wrong last, shown until things work again.
    pub problem: Option<String>,
}

impl Model {
    pub fn new(scope: Scope, namespace: &str, now_ms: u64) -> Self {
        Self {
            scope,
            namespace: namespace.to_owned(),
            now_ms,
            tab: Tab::Overview,
            stats: None,
            rates: None,
            nodes: BTreeMap::new(),
            node_sort: NodeSort::Id,
            jobs: BTreeMap::new(),
            filter: String::new(),
            filtering: false,
            selected: [0; 3],
            detail: None,
            problem: None,
        }
    }

    /// Learns from the bus.
    pub fn apply(&mut self, update: Update) -> Option<Command> {
        match update {
            Update::Stats(stats) => {
                if let Some(previous) = &self.stats {
                    let seconds = stats.ts_ms.saturating_sub(previous.ts_ms) as f64 / 1_000.0;
                    if seconds > 0.0 {
                        let rate =
                            |now: u64, before: u64| now.saturating_sub(before) as f64 / seconds;
                        self.rates = Some(Rates {
                            jobs_ended: rate(stats.jobs_ended, previous.jobs_ended),
                            ai_requests: rate(stats.ai_requests, previous.ai_requests),
                            tokens: rate(
                                stats.ai_input_units + stats.ai_output_units,
                                previous.ai_input_units + previous.ai_output_units,
                            ),
                        });
                    }
                }
                self.stats = Some(*stats);
            }
            Update::Nodes(views) => {
                let now = self.now_ms;
                let listed: std::collections::BTreeSet<_> =
                    views.iter().map(|v| v.node_id.clone()).collect();
                self.nodes.retain(|id, _| listed.contains(id));
                for view in views {
                    let seen_ms = now.saturating_sub(view.last_heartbeat_ms_ago);
                    match self.nodes.get_mut(&view.node_id) {
                        // A heartbeat newer than the list keeps its live figures.
                        Some(row) if row.seen_ms > seen_ms => {
                            let (active, telemetry) =
                                (row.view.active, std::mem::take(&mut row.view.gpu_telemetry));
                            row.view = view;
                            row.view.active = active;
                            row.view.gpu_telemetry = telemetry;
                        }
                        _ => {
                            self.nodes
                                .insert(view.node_id.clone(), NodeRow { view, seen_ms });
                        }
                    }
                }
            }
            Update::Heartbeat(beat) => {
                if let Some(row) = self.nodes.get_mut(&beat.node_id) {
                    row.view.active = beat.running.len() as u32;
                    row.view.gpu_telemetry = beat.gpus;
                    row.view.status = "live".into();
                    row.seen_ms = row.seen_ms.max(beat.ts_ms.min(self.now_ms.max(beat.ts_ms)));
                }
            }
            Update::Event(account, event) => return self.event(account, event),
            Update::Jobs(views) => {
                for view in &views {
                    let row = JobRow::from_view(view);
                    match self.jobs.get(&row.job_id) {
                        Some(known) if known.updated_ms > row.updated_ms => {}
                        _ => {
                            self.jobs.insert(row.job_id.clone(), row);
                        }
                    }
                }
                self.prune_jobs();
            }
            Update::Job(view) => {
                self.jobs
                    .insert(view.job_id.clone(), JobRow::from_view(&view));
                if let Some(Detail::Job {
                    job_id, view: open, ..
                }) = &mut self.detail
                    && *job_id == view.job_id
                {
                    *open = Some(view);
                }
            }
            Update::Logs(batch) => {
                if let Some(Detail::Job {
                    job_id,
                    logs,
                    next_seq,
                    skipped,
                    ..
                }) = &mut self.detail
                    && *job_id == batch.job_id
                {
                    for entry in batch.lines {
                        if entry.seq > *next_seq {
                            *skipped += entry.seq - *next_seq;
                        }
                        *next_seq = entry.seq + 1;
                        logs.push_back((entry.stream, entry.line));
                        if logs.len() > MAX_LOG_LINES {
                            logs.pop_front();
                        }
                    }
                }
            }
            Update::Plugins(node, answer) => {
                if let Some(Detail::Node { node_id, plugins }) = &mut self.detail
                    && *node_id == node
                {
                    *plugins = Some(answer);
                }
            }
            Update::Problem(problem) => self.problem = problem,
        }
        None
    }

    fn event(&mut self, subject_account: Option<String>, event: Event) -> Option<Command> {
        match event.body {
            EventBody::Job {
                job_id,
                state,
                attempt,
                node_id,
                reason,
            } => {
                let account = match &self.scope {
                    Scope::Account(account) => account.clone(),
                    Scope::Operator => subject_account.unwrap_or_default(),
                };
                let row = self.jobs.entry(job_id.clone()).or_insert_with(|| {
                    JobRow::heard(&job_id, account, state, attempt, event.ts_ms)
                });
                // Events can arrive out of order across subjects: a final state stays final.
                if !row.state.is_terminal() || state.is_terminal() {
                    row.state = state;
                    row.attempt = attempt;
                    if node_id.is_some() {
                        row.node_id = node_id;
                    }
                    if reason.is_some() {
                        row.reason = reason;
                    }
                }
                row.updated_ms = row.updated_ms.max(event.ts_ms);
                self.prune_jobs();
                if let Some(Detail::Job { job_id: open, .. }) = &self.detail
                    && *open == job_id
                {
                    return Some(Command::RefreshJob(job_id));
                }
            }
            EventBody::Escrow {
                job_id,
                kind,
                account,
                amount_micros,
                ..
            } => {
                let row = self.jobs.entry(job_id.clone()).or_insert_with(|| {
                    JobRow::heard(&job_id, account.clone(), JobState::Pending, 0, event.ts_ms)
                });
                row.account = account;
                match kind {
                    EscrowKind::Held => row.max_cost_micros = Some(amount_micros),
                    EscrowKind::Settled => row.cost_micros = Some(amount_micros),
                    EscrowKind::Refunded => {
                        row.cost_micros.get_or_insert(0);
                    }
                }
                self.prune_jobs();
            }
            // A flow's steps show as their jobs (whose events come too).
            EventBody::Flow { .. } => {}
        }
        None
    }

    fn prune_jobs(&mut self) {
        if self.jobs.len() <= MAX_JOBS {
            return;
        }
        let mut ages: Vec<(u64, String)> = self
            .jobs
            .values()
            .map(|j| (j.updated_ms, j.job_id.clone()))
            .collect();
        ages.sort_unstable();
        for (_, id) in ages.into_iter().take(self.jobs.len() - MAX_JOBS) {
            self.jobs.remove(&id);
        }
    }

    /// The nodes table as shown: filtered, then in the chosen order.
    pub fn visible_nodes(&self) -> Vec<&NodeRow> {
        let filter = self.filter.to_lowercase();
        let mut rows: Vec<&NodeRow> = self
            .nodes
            .values()
            .filter(|row| {
                filter.is_empty()
                    || row.view.node_id.to_lowercase().contains(&filter)
                    || row.view.provider_account.to_lowercase().contains(&filter)
                    || row.view.status.contains(&filter)
                    || row.view.backends.iter().any(|b| b.contains(&filter))
            })
            .collect();
        let gpu = |row: &NodeRow| {
            row.view
                .gpu_telemetry
                .iter()
                .map(|g| g.utilization_pct)
                .max()
                .unwrap_or(0)
        };
        match self.node_sort {
            NodeSort::Id => {}
            NodeSort::Load => rows.sort_by(|a, b| {
                load(&b.view)
                    .total_cmp(&load(&a.view))
                    .then(a.view.node_id.cmp(&b.view.node_id))
            }),
            NodeSort::Price => rows.sort_by_key(|r| r.view.pricing.cpu_hour_cents),
            NodeSort::Reputation => {
                rows.sort_by(|a, b| b.view.reputation.total_cmp(&a.view.reputation))
            }
            NodeSort::Gpu => rows.sort_by_key(|r| std::cmp::Reverse(gpu(r))),
        }
        rows
    }

    /// The job stream as shown: filtered, newest first.
    pub fn visible_jobs(&self) -> Vec<&JobRow> {
        let filter = self.filter.to_lowercase();
        let mut rows: Vec<&JobRow> = self
            .jobs
            .values()
            .filter(|job| {
                filter.is_empty()
                    || job.job_id.to_lowercase().contains(&filter)
                    || job.state.as_str().contains(&filter)
                    || job.account.to_lowercase().contains(&filter)
                    || job.backend.as_deref().is_some_and(|b| b.contains(&filter))
                    || job.node_id.as_deref().is_some_and(|n| n.contains(&filter))
            })
            .collect();
        rows.sort_by(|a, b| {
            b.updated_ms
                .cmp(&a.updated_ms)
                .then(b.job_id.cmp(&a.job_id))
        });
        rows
    }

    /// The selected row of the current tab, within the rows there are.
    pub fn selected(&self) -> usize {
        let len = match self.tab {
            Tab::Overview => 0,
            Tab::Nodes => self.visible_nodes().len(),
            Tab::Jobs => self.visible_jobs().len(),
        };
        self.selected[self.tab.index()].min(len.saturating_sub(1))
    }

    /// Handles a key press.
    pub fn key(&mut self, key: KeyEvent) -> Option<Command> {
        if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL) {
            return Some(Command::Quit);
        }
        if self.filtering {
            match key.code {
                KeyCode::Enter => self.filtering = false,
                KeyCode::Esc => {
                    self.filtering = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) if self.filter.len() < 64 => self.filter.push(c),
                _ => {}
            }
            self.selected[self.tab.index()] = 0;
            return None;
        }
        if self.detail.is_some() {
            return match key.code {
                KeyCode::Char('q') => Some(Command::Quit),
                KeyCode::Esc | KeyCode::Backspace | KeyCode::Enter | KeyCode::Left => {
                    self.detail = None;
                    Some(Command::Close)
                }
                _ => None,
            };
        }
        let index = self.tab.index();
        match key.code {
            KeyCode::Char('q') => return Some(Command::Quit),
            KeyCode::Char('1') => self.tab = Tab::Overview,
            KeyCode::Char('2') => self.tab = Tab::Nodes,
            KeyCode::Char('3') => self.tab = Tab::Jobs,
            KeyCode::Tab | KeyCode::Right => self.tab = Tab::ALL[(index + 1) % Tab::ALL.len()],
            KeyCode::BackTab | KeyCode::Left => {
                self.tab = Tab::ALL[(index + Tab::ALL.len() - 1) % Tab::ALL.len()]
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected[index] = self.selected().saturating_add(1);
                self.selected[index] = self.selected();
            }
            KeyCode::Up | KeyCode::Char('k') => {
                self.selected[index] = self.selected().saturating_sub(1)
            }
            KeyCode::PageDown => self.selected[index] = self.selected().saturating_add(10),
            KeyCode::PageUp => self.selected[index] = self.selected().saturating_sub(10),
            KeyCode::Home | KeyCode::Char('g') => self.selected[index] = 0,
            KeyCode::Char('s') => self.node_sort = self.node_sort.next(),
            KeyCode::Char('/') => {
                self.filtering = true;
                self.filter.clear();
            }
            KeyCode::Esc => self.filter.clear(),
            KeyCode::Enter => return self.open(),
            _ => {}
        }
        None
    }

    fn open(&mut self) -> Option<Command> {
        let selected = self.selected();
        match self.tab {
            Tab::Overview => None,
            Tab::Nodes => {
                let node_id = self.visible_nodes().get(selected)?.view.node_id.clone();
                self.detail = Some(Detail::Node {
                    node_id: node_id.clone(),
                    plugins: None,
                });
                Some(Command::OpenNode(node_id))
            }
            Tab::Jobs => {
                let job = self.visible_jobs().get(selected).map(|j| (*j).clone())?;
                self.detail = Some(Detail::Job {
                    job_id: job.job_id.clone(),
                    view: None,
                    logs: VecDeque::new(),
                    next_seq: 0,
                    skipped: 0,
                });
                let account = match &self.scope {
                    Scope::Account(account) => account.clone(),
                    Scope::Operator => job.account,
                };
                Some(Command::OpenJob(job.job_id, account))
            }
        }
    }
}

/// A node's load: executions over its slots.
pub fn load(view: &NodeView) -> f64 {
    if view.max_concurrent == 0 {
        0.0
    } else {
        f64::from(view.active) / f64::from(view.max_concurrent)
    }
}
