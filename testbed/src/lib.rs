//! The RhizOS testbed: builds the guest programs, launches whole networks in-process against a
//! real `nats-server` (one namespace and temp dirs each, so tests share nothing), and hosts the
//! end-to-end tests (`tests/it`) and benchmarks (`src/bin`).

pub mod ai;
pub mod cluster;
pub mod doubles;
pub mod guests;
pub mod images;
pub mod mock_openai;
pub mod registry_server;
pub mod sim;

pub use cluster::{Cluster, ClusterOptions};

/// `target/<profile>`: where cargo put the binaries and plugins of this build.
pub fn build_dir() -> std::path::PathBuf {
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace cdylib, e.g. `plugin_file("rhizos_plugin_wasm")`.
pub fn plugin_file(crate_name: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = build_dir().join(format!("lib{crate_name}.so"));
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build the plugins first with `cargo build --workspace`",
        path.display()
    );
    Ok(path)
}

/// Every row of the tables the replicated ledger carries, in the ledger file at `path` (read
/// in one snapshot, read-only), and the stream position it has applied: two projections that
/// agree give equal values.
pub fn ledger_rows(path: &std::path::Path) -> anyhow::Result<(i64, Vec<String>)> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch("BEGIN")?;
    let applied: i64 =
        conn.query_row("SELECT value FROM replica WHERE key = 'applied'", [], |r| {
            r.get(0)
        })?;
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
             AND name != 'replica' ORDER BY name",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for table in tables {
        let mut statement = conn.prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2"))?;
        let columns = statement.column_count();
        let mut query = statement.query([])?;
        while let Some(row) = query.next()? {
            let values = (0..columns)
                .map(|i| row.get_ref(i).map(|v| format!("{v:?}")))
                .collect::<Result<Vec<_>, _>>()?;
            rows.push(format!("{table}: {}", values.join(" | ")));
        }
    }
    Ok((applied, rows))
}
