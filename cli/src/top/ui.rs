//! Draws a [`Model`]: a title line, the tabs, the tab's page (or the open job's or node's
//! detail), and a line of keys. Laid out to be readable in an 80×24 terminal and to use more
//! room when there is some.

use super::model::{Detail, JobRow, Model, NodeRow, Scope, Tab, load};
use crate::money::format_usd;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize as _};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, TableState, Tabs, Wrap};
use rhizos_broker::wire::{JobState, LogStream};

pub fn draw(frame: &mut Frame, model: &Model) {
    let [title, tabs, body, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(title_line(model), title);
    let selected = Tab::ALL.iter().position(|t| *t == model.tab).unwrap_or(0);
    frame.render_widget(
        Tabs::new(Tab::ALL.iter().map(|t| t.title()))
            .select(selected)
            .highlight_style(Style::new().bold().reversed()),
        tabs,
    );
    match &model.detail {
        Some(Detail::Job { .. }) => job_detail(frame, model, body),
        Some(Detail::Node { .. }) => node_detail(frame, model, body),
        None => match model.tab {
            Tab::Overview => overview(frame, model, body),
            Tab::Nodes => nodes(frame, model, body, true),
            Tab::Jobs => jobs(frame, model, body, true),
        },
    }
    frame.render_widget(key_line(model), keys);
}

fn title_line(model: &Model) -> Line<'static> {
    let who = match &model.scope {
        Scope::Operator => "operator".to_owned(),
        Scope::Account(account) => format!("account {account}"),
    };
    let mut spans = vec![
        Span::from(" rhizos top ").bold().reversed(),
        Span::from(format!(" ns {} · {who} ", model.namespace)),
    ];
    match &model.problem {
        Some(problem) => spans.push(Span::from(format!("⚠ {problem}")).fg(Color::Red)),
        None if model.stats.is_some() => spans.push(Span::from("● live").fg(Color::Green)),
        None => spans.push(Span::from("… connecting").fg(Color::Yellow)),
    }
    Line::from(spans)
}

fn key_line(model: &Model) -> Line<'static> {
    let text = if model.filtering {
        format!(" filter: {}▏ (enter keep · esc clear)", model.filter)
    } else if model.detail.is_some() {
        " esc back · q quit".to_owned()
    } else {
        let mut text =
            " q quit · 1-3 tabs · ↑↓ select · enter detail · s sort · / filter".to_owned();
        if !model.filter.is_empty() {
            text.push_str(&format!(" · filter \"{}\" (esc clears)", model.filter));
        }
        text
    };
    Line::from(text).style(Style::new().add_modifier(Modifier::DIM))
}

fn overview(frame: &mut Frame, model: &Model, area: Rect) {
    let [summary, rest] = Layout::vertical([Constraint::Length(6), Constraint::Min(0)]).areas(area);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(summary);
    frame.render_widget(
        Paragraph::new(network_lines(model)).block(Block::bordered().title(" Network ")),
        left,
    );
    frame.render_widget(
        Paragraph::new(money_lines(model)).block(Block::bordered().title(" Money · AI ")),
        right,
    );
    let node_rows = (model.nodes.len() as u16).clamp(1, 8) + 3;
    let [top, bottom] =
        Layout::vertical([Constraint::Max(node_rows), Constraint::Min(0)]).areas(rest);
    nodes(frame, model, top, false);
    jobs(frame, model, bottom, false);
}

fn network_lines(model: &Model) -> Vec<Line<'static>> {
    let Some(stats) = &model.stats else {
        return vec![Line::from("waiting for the orchestrator…")];
    };
    let count = |state: JobState| {
        stats
            .jobs_by_state
            .get(state.as_str())
            .copied()
            .unwrap_or(0)
    };
    let rate = model
        .rates
        .map_or_else(|| "–".to_owned(), |r| format!("{:.1}", r.jobs_ended));
    let label = |text: &'static str| Span::from(text).bold();
    vec![
        Line::from(vec![
            label("Nodes  "),
            Span::from(format!("{} live", stats.nodes_live)).fg(Color::Green),
            Span::from(format!("  {} lost", stats.nodes_lost)).fg(if stats.nodes_lost > 0 {
                Color::Red
            } else {
                Color::Reset
            }),
        ]),
        Line::from(vec![
            label("Open   "),
            Span::from(counts(&[
                (count(JobState::Pending), "pending", true),
                (count(JobState::Running), "running", true),
                (count(JobState::Assigned), "assigned", false),
            ])),
        ]),
        Line::from(vec![
            label("Ended  "),
            Span::from(counts(&[
                (count(JobState::Succeeded), "ok", true),
                (count(JobState::Failed), "failed", true),
                (count(JobState::TimedOut), "timed out", false),
                (count(JobState::Cancelled), "cancelled", false),
            ])),
        ]),
        Line::from(vec![
            label("Rate   "),
            Span::from(format!("{rate} jobs ended/s · {} ever", stats.jobs_ended)),
        ]),
    ]
}

/// `3 pending · 2 running`: each (count, name, shown even when 0).
fn counts(parts: &[(u64, &str, bool)]) -> String {
    parts
        .iter()
        .filter(|(n, _, always)| *always || *n > 0)
        .map(|(n, name, _)| format!("{n} {name}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

fn money_lines(model: &Model) -> Vec<Line<'static>> {
    let Some(stats) = &model.stats else {
        return vec![Line::from("")];
    };
    let label = |text: &'static str| Span::from(text).bold();
    let mut lines = Vec::new();
    if let Some(balance) = stats.balance_micros {
        lines.push(Line::from(vec![
            label("Balance  "),
            Span::from(format_usd(balance)),
        ]));
    }
    lines.push(Line::from(vec![
        label("Escrow   "),
        Span::from(format!("{} held", format_usd(stats.escrow_held_micros))),
    ]));
    if let Some(fees) = stats.fees_micros {
        lines.push(Line::from(vec![
            label("Fees     "),
            Span::from(format!("{} earned", format_usd(fees))),
        ]));
    }
    let (requests, tokens) = model.rates.map_or_else(
        || ("–".to_owned(), "–".to_owned()),
        |r| (format!("{:.1}", r.ai_requests), format!("{:.0}", r.tokens)),
    );
    lines.push(Line::from(vec![
        label("AI       "),
        Span::from(format!("{requests} req/s · {tokens} tok/s")),
    ]));
    lines.push(Line::from(vec![
        label("Total    "),
        Span::from(format!(
            "{} req · {} tok",
            stats.ai_requests,
            stats.ai_input_units + stats.ai_output_units
        )),
    ]));
    lines.truncate(4);
    lines
}

fn age(now_ms: u64, then_ms: u64) -> String {
    let seconds = now_ms.saturating_sub(then_ms) / 1_000;
    match seconds {
        0..=59 => format!("{seconds}s"),
        60..=3_599 => format!("{}m", seconds / 60),
        3_600..=86_399 => format!("{}h", seconds / 3_600),
        _ => format!("{}d", seconds / 86_400),
    }
}

fn dollars_per_hour(cents: u64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

fn node_row(model: &Model, row: &NodeRow) -> Row<'static> {
    let view = &row.view;
    let gpu = view.gpu_telemetry.iter().max_by_key(|g| g.utilization_pct);
    let (gpu_use, vram, temp) = match gpu {
        Some(g) => (
            format!("{}%", g.utilization_pct),
            format!("{}/{}G", g.vram_used_mib / 1024, g.vram_total_mib / 1024),
            format!("{}°C", g.temperature_c),
        ),
        None if !view.gpus.is_empty() => (format!("{}×", view.gpus.len()), "–".into(), "–".into()),
        None => ("–".into(), "–".into(), "–".into()),
    };
    let status_style = if view.status == "live" {
        Style::new().fg(Color::Green)
    } else {
        Style::new().fg(Color::Red)
    };
    Row::new(vec![
        Cell::from(view.node_id.clone()),
        Cell::from(view.tier.to_string()),
        Cell::from(format!("{}/{}", view.active, view.max_concurrent)),
        Cell::from(dollars_per_hour(view.pricing.cpu_hour_cents)),
        Cell::from(format!("{:.2}", view.reputation)),
        Cell::from(gpu_use),
        Cell::from(vram),
        Cell::from(temp),
        Cell::from(view.status.clone()).style(status_style),
        Cell::from(age(model.now_ms, row.seen_ms)),
    ])
}

fn nodes(frame: &mut Frame, model: &Model, area: Rect, selectable: bool) {
    let rows = model.visible_nodes();
    let title = format!(
        " Nodes ({}) · sorted by {} ",
        rows.len(),
        model.node_sort.name()
    );
    let widths = [
        Constraint::Min(10),
        Constraint::Length(4),
        Constraint::Length(5),
        Constraint::Length(7),
        Constraint::Length(4),
        Constraint::Length(4),
        Constraint::Length(7),
        Constraint::Length(5),
        Constraint::Length(4),
        Constraint::Length(4),
    ];
    let header = [
        "NODE", "TIER", "LOAD", "CPU/h", "REP", "GPU", "VRAM", "TEMP", "STAT", "SEEN",
    ];
    let rows = rows.iter().map(|row| node_row(model, row));
    render_table(
        frame,
        area,
        rows,
        widths,
        header,
        title,
        selectable.then(|| model.selected()),
    );
}

/// A bordered table with a bold header; the selected row (if any) shown reversed.
fn render_table<'a, const N: usize>(
    frame: &mut Frame,
    area: Rect,
    rows: impl IntoIterator<Item = Row<'a>>,
    widths: [Constraint; N],
    header: [&'a str; N],
    title: String,
    selected: Option<usize>,
) {
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(Style::new().bold()))
        .block(Block::bordered().title(title))
        .row_highlight_style(Style::new().reversed());
    let mut state = TableState::default().with_selected(selected);
    frame.render_stateful_widget(table, area, &mut state);
}

fn short_id(id: &str) -> String {
    // Job ids are time-ordered (UUIDv7): their tail tells them apart.
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 12 {
        id.to_owned()
    } else {
        format!("…{}", chars[chars.len() - 11..].iter().collect::<String>())
    }
}

fn state_style(state: JobState) -> Style {
    match state {
        JobState::Succeeded => Style::new().fg(Color::Green),
        JobState::Failed | JobState::TimedOut => Style::new().fg(Color::Red),
        JobState::Cancelled => Style::new().fg(Color::Yellow),
        JobState::Running | JobState::Assigned => Style::new().fg(Color::Cyan),
        JobState::Pending => Style::new(),
    }
}

fn job_row(model: &Model, job: &JobRow) -> Row<'static> {
    let cost = match (job.cost_micros, job.max_cost_micros) {
        (Some(cost), _) => format_usd(cost),
        (None, Some(max)) => format!("≤{}", format_usd(max)),
        (None, None) => "–".into(),
    };
    Row::new(vec![
        Cell::from(short_id(&job.job_id)),
        Cell::from(job.state.as_str()).style(state_style(job.state)),
        Cell::from(job.account.clone()),
        Cell::from(job.node_id.clone().unwrap_or_else(|| "–".into())),
        Cell::from(cost),
        Cell::from(age(model.now_ms, job.updated_ms)),
        Cell::from(job.reason.clone().unwrap_or_default()),
    ])
}

fn jobs(frame: &mut Frame, model: &Model, area: Rect, selectable: bool) {
    let rows = model.visible_jobs();
    let title = match &model.scope {
        Scope::Operator => format!(" Jobs ({}) · newest first ", rows.len()),
        Scope::Account(account) => format!(" {account}'s jobs ({}) · newest first ", rows.len()),
    };
    let widths = [
        Constraint::Length(12),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(4),
        Constraint::Min(6),
    ];
    let header = ["JOB", "STATE", "ACCOUNT", "NODE", "COST", "AGE", "REASON"];
    let rows = rows.iter().map(|job| job_row(model, job));
    render_table(
        frame,
        area,
        rows,
        widths,
        header,
        title,
        selectable.then(|| model.selected()),
    );
}

fn field(name: &'static str, value: String) -> Line<'static> {
    Line::from(vec![
        Span::from(format!("{name:<10}")).bold(),
        Span::from(value),
    ])
}

fn job_detail(frame: &mut Frame, model: &Model, area: Rect) {
    let Some(Detail::Job {
        job_id,
        view,
        logs,
        skipped,
        ..
    }) = &model.detail
    else {
        return;
    };
    let row = model.jobs.get(job_id);
    let mut lines = vec![field("job", job_id.clone())];
    let opt_usd = |m: Option<i64>| m.map_or_else(|| "–".to_owned(), format_usd);
    match view {
        Some(view) => {
            lines.push(field(
                "state",
                format!(
                    "{} (attempt {}{})",
                    view.state.as_str(),
                    view.attempt,
                    view.node_id
                        .as_ref()
                        .map(|n| format!(", node {n}"))
                        .unwrap_or_default()
                ),
            ));
            lines.push(field(
                "account",
                format!("{} · backend {}", view.account, view.backend),
            ));
            lines.push(field(
                "money",
                format!(
                    "held {} · cost {} · provider {} · fee {} · refund {}",
                    format_usd(view.max_cost_micros),
                    opt_usd(view.cost_micros),
                    opt_usd(view.provider_micros),
                    opt_usd(view.fee_micros),
                    opt_usd(view.refund_micros)
                ),
            ));
            let mut ended = Vec::new();
            if let Some(code) = view.exit_code {
                ended.push(format!("exit {code}"));
            }
            if let Some(ms) = view.elapsed_ms {
                ended.push(format!("{ms} ms"));
            }
            if let Some(usage) = &view.billed_usage {
                ended.push(format!(
                    "{} in / {} out units billed",
                    usage.input_units, usage.output_units
                ));
            }
            if let Some(reason) = &view.reason {
                ended.push(reason.clone());
            }
            if !ended.is_empty() {
                lines.push(field("result", ended.join(" · ")));
            }
        }
        None => lines.push(field(
            "state",
            row.map_or_else(
                || "loading…".to_owned(),
                |r| format!("{} (loading…)", r.state.as_str()),
            ),
        )),
    }
    let height = lines.len() as u16 + 2;
    let [info, log_area] =
        Layout::vertical([Constraint::Length(height), Constraint::Min(0)]).areas(area);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(" Job ")),
        info,
    );
    let room = log_area.height.saturating_sub(2) as usize;
    let shown: Vec<Line> = logs
        .iter()
        .skip(logs.len().saturating_sub(room))
        .map(|(stream, line)| match stream {
            LogStream::Stderr => Line::from(line.clone()).fg(Color::Red),
            LogStream::Stdout => Line::from(line.clone()),
        })
        .collect();
    let mut title = format!(" Logs · {} lines", logs.len());
    if *skipped > 0 {
        title.push_str(&format!(" · {skipped} not streamed"));
    }
    title.push_str(" (live) ");
    let body = if shown.is_empty() {
        vec![Line::from("no log lines yet (they stream while the job runs)").dim()]
    } else {
        shown
    };
    frame.render_widget(
        Paragraph::new(body).block(Block::bordered().title(title)),
        log_area,
    );
}

fn node_detail(frame: &mut Frame, model: &Model, area: Rect) {
    let Some(Detail::Node { node_id, plugins }) = &model.detail else {
        return;
    };
    let mut lines = Vec::new();
    match model.nodes.get(node_id) {
        Some(row) => {
            let v = &row.view;
            lines.push(field(
                "node",
                format!(
                    "{} · provider {} · tier {} · {}",
                    v.node_id, v.provider_account, v.tier, v.status
                ),
            ));
            lines.push(field(
                "capacity",
                format!(
                    "{} cores · {} MiB · {}/{} running · load {:.0}%",
                    v.cpu_cores,
                    v.memory_mib,
                    v.active,
                    v.max_concurrent,
                    load(v) * 100.0
                ),
            ));
            if let Some(hw) = &v.hardware {
                lines.push(field(
                    "hardware",
                    format!("{} · {} {}", hw.cpu_model, hw.os, hw.kernel),
                ));
            }
            lines.push(field(
                "prices",
                format!(
                    "CPU {}/h · GPU {}/h · memory {}/GB·h · tokens {} in / {} out per 1M",
                    dollars_per_hour(v.pricing.cpu_hour_cents),
                    dollars_per_hour(v.pricing.gpu_hour_cents),
                    dollars_per_hour(v.pricing.memory_gb_hour_cents),
                    format_usd(v.pricing.input_million_micros as i64),
                    format_usd(v.pricing.output_million_micros as i64)
                ),
            ));
            lines.push(field(
                "record",
                format!(
                    "{} jobs run, {} succeeded · reputation {:.2} · heartbeat {} ago",
                    v.jobs_run,
                    v.jobs_succeeded,
                    v.reputation,
                    age(model.now_ms, row.seen_ms)
                ),
            ));
            lines.push(field("backends", v.backends.join(", ")));
            for (i, gpu) in v.gpus.iter().enumerate() {
                let live = gpu
                    .uuid
                    .as_ref()
                    .and_then(|u| v.gpu_telemetry.iter().find(|t| &t.uuid == u))
                    .or_else(|| v.gpu_telemetry.get(i));
                let now = live.map_or_else(String::new, |t| {
                    format!(
                        " · {}% · {}/{} MiB · {}°C · {:.0} W",
                        t.utilization_pct,
                        t.vram_used_mib,
                        t.vram_total_mib,
                        t.temperature_c,
                        f64::from(t.power_mw) / 1_000.0
                    )
                });
                lines.push(field(
                    "gpu",
                    format!("{} ({} MiB){now}", gpu.name, gpu.vram_mib),
                ));
            }
            if v.gpus.is_empty()
                && let Some(note) = v.hardware.as_ref().and_then(|h| h.gpu_note.clone())
            {
                lines.push(field("gpu", note));
            }
        }
        None => lines.push(field("node", format!("{node_id} (no longer listed)"))),
    }
    let height = lines.len() as u16 + 2;
    let [info, plugin_area] =
        Layout::vertical([Constraint::Length(height), Constraint::Min(0)]).areas(area);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(" Node ")),
        info,
    );
    let plugin_lines: Vec<Line> = match plugins {
        None => vec![Line::from("asking the node's agent…").dim()],
        Some(Err(e)) => vec![Line::from(format!("the agent did not answer: {e}")).fg(Color::Red)],
        Some(Ok(list)) if list.plugins.is_empty() => {
            vec![Line::from(format!("no plugins in {}", list.plugin_dir))]
        }
        Some(Ok(list)) => list
            .plugins
            .iter()
            .map(|p| match &p.refused {
                Some(why) => Line::from(format!("✗ {} refused: {why}", p.file)).fg(Color::Red),
                None => Line::from(format!(
                    "✓ {} {} ({}) {}{}",
                    p.name.as_deref().unwrap_or(&p.file),
                    p.version.as_deref().unwrap_or(""),
                    p.kind.as_deref().unwrap_or("plugin"),
                    p.backends.join(", "),
                    p.note
                        .as_ref()
                        .map(|n| format!(" · {n}"))
                        .unwrap_or_default()
                )),
            })
            .collect(),
    };
    frame.render_widget(
        Paragraph::new(plugin_lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(" Plugins (live from the agent) ")),
        plugin_area,
    );
}
