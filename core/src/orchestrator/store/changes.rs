//! Changesets of the replicated ledger (ADR 0010): what one committed batch changed, captured
//! with SQLite's session extension on the active orchestrator and applied on the standbys.
//!
//! A changeset holds, per table row a batch touched, its primary key and its values before and
//! after, computed from the rows' *net* state when the batch ends: an operation whose savepoint
//! was rolled back leaves nothing in it. Applying checks every old value, so a projection that
//! disagrees with the writer's is found at the first row, never silently overwritten.
//!
//! The bundled SQLite is built with the session extension (`.cargo/config.toml`). rusqlite's
//! own wrapper needs its `session` feature, which runs bindgen (libclang) at build time, and its
//! `Session` borrows the connection for its whole life, which the store's `&mut self`
//! operations cannot live beside; this module is the one place outside plugin loading with
//! `unsafe`: a few calls of the C API, each with its contract stated.
#![allow(unsafe_code)]

use super::StoreError;
use rusqlite::{Connection, ffi};
use std::ffi::{CStr, CString, c_int, c_void};

/// Records every change to `tables` on a connection until dropped.
pub(super) struct Capture {
    session: *mut ffi::sqlite3_session,
}

/// Tables the replicated ledger carries: every table of the schema but `replica` (each
/// database's own position in the stream) and SQLite's own.
pub(super) fn replicated_tables(conn: &Connection) -> rusqlite::Result<Vec<CString>> {
    let mut statement = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name != 'replica' ORDER BY name",
    )?;
    let names = statement
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(names
        .into_iter()
        .filter_map(|name| CString::new(name).ok())
        .collect())
}

fn check(rc: c_int, what: &str) -> Result<(), StoreError> {
    if rc == ffi::SQLITE_OK {
        return Ok(());
    }
    // SAFETY: `sqlite3_errstr` returns a static string for any result code.
    let message = unsafe { CStr::from_ptr(ffi::sqlite3_errstr(rc)) }
        .to_string_lossy()
        .into_owned();
    Err(StoreError::Corrupt(format!("{what}: {message} ({rc})")))
}

/// Whether this SQLite was built with the session extension.
pub(super) fn available() -> bool {
    let option = c"ENABLE_SESSION";
    // SAFETY: a NUL-terminated string; the function only reads it.
    unsafe { ffi::sqlite3_compileoption_used(option.as_ptr()) == 1 }
}

impl Capture {
    /// Starts recording changes to `tables` on `conn`.
    pub(super) fn start(conn: &Connection, tables: &[CString]) -> Result<Self, StoreError> {
        if !available() {
            return Err(StoreError::Corrupt(
                "this rhizosd's SQLite lacks the session extension the replicated ledger needs: build it from the repository (its .cargo/config.toml sets LIBSQLITE3_FLAGS)".into(),
            ));
        }
        let mut session: *mut ffi::sqlite3_session = std::ptr::null_mut();
        // SAFETY: the handle is the live connection's; "main" is NUL-terminated; on success
        // `session` is a new session owned by the returned value, deleted in `Drop` — which
        // the caller runs before the connection closes (a capture lives within one batch).
        let rc =
            unsafe { ffi::sqlite3session_create(conn.handle(), c"main".as_ptr(), &mut session) };
        check(rc, "cannot start capturing the batch's changes")?;
        let capture = Self { session };
        for table in tables {
            // SAFETY: `session` is live; the table name is NUL-terminated and copied by SQLite.
            let rc = unsafe { ffi::sqlite3session_attach(capture.session, table.as_ptr()) };
            check(rc, "cannot capture a table's changes")?;
        }
        Ok(capture)
    }

    /// The changeset of everything recorded so far (empty when nothing changed).
    pub(super) fn changeset(&self) -> Result<Vec<u8>, StoreError> {
        let mut size: c_int = 0;
        let mut buffer: *mut c_void = std::ptr::null_mut();
        // SAFETY: `session` is live; on success SQLite hands over a buffer of `size` bytes
        // allocated with sqlite3_malloc, which is copied and then freed with sqlite3_free.
        let rc = unsafe { ffi::sqlite3session_changeset(self.session, &mut size, &mut buffer) };
        check(rc, "cannot read the batch's changes")?;
        if buffer.is_null() || size <= 0 {
            return Ok(Vec::new());
        }
        // SAFETY: as above: `buffer` holds `size` initialised bytes until freed below.
        let bytes =
            unsafe { std::slice::from_raw_parts(buffer.cast::<u8>(), size as usize) }.to_vec();
        // SAFETY: the buffer came from SQLite's allocator and is not used after this.
        unsafe { ffi::sqlite3_free(buffer) };
        Ok(bytes)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: created by sqlite3session_create, deleted exactly once.
        unsafe { ffi::sqlite3session_delete(self.session) };
    }
}

/// Why a changeset could not be applied: the first row where this database disagrees.
#[derive(Default)]
struct Conflict {
    found: Option<String>,
}

const CONFLICT_KINDS: [(c_int, &str); 5] = [
    (
        ffi::SQLITE_CHANGESET_DATA,
        "the row's values differ from the writer's",
    ),
    (
        ffi::SQLITE_CHANGESET_NOTFOUND,
        "the row does not exist here",
    ),
    (
        ffi::SQLITE_CHANGESET_CONFLICT,
        "the row already exists here",
    ),
    (
        ffi::SQLITE_CHANGESET_CONSTRAINT,
        "a constraint refused the row",
    ),
    (
        ffi::SQLITE_CHANGESET_FOREIGN_KEY,
        "a foreign key is left dangling",
    ),
];

unsafe extern "C" fn on_conflict(
    context: *mut c_void,
    kind: c_int,
    iterator: *mut ffi::sqlite3_changeset_iter,
) -> c_int {
    // SAFETY: `context` is the `Conflict` that `apply` passed and keeps alive for the call.
    let conflict = unsafe { &mut *context.cast::<Conflict>() };
    let mut table: *const std::ffi::c_char = std::ptr::null();
    let (mut columns, mut op, mut indirect) = (0, 0, 0);
    // SAFETY: `iterator` is the live iterator SQLite passed; the table name it returns stays
    // valid while the callback runs and is copied at once. (A foreign key conflict has no
    // current change: the call then fails and the name stays null.)
    let rc = unsafe {
        ffi::sqlite3changeset_op(iterator, &mut table, &mut columns, &mut op, &mut indirect)
    };
    let table = if rc == ffi::SQLITE_OK && !table.is_null() {
        // SAFETY: see above.
        unsafe { CStr::from_ptr(table) }
            .to_string_lossy()
            .into_owned()
    } else {
        "?".to_owned()
    };
    let why = CONFLICT_KINDS
        .iter()
        .find(|(code, _)| *code == kind)
        .map_or("unknown conflict", |(_, why)| why);
    conflict.found = Some(format!("table {table}: {why}"));
    ffi::SQLITE_CHANGESET_ABORT
}

/// Applies `changeset` on `conn` (inside the caller's transaction or savepoint): every row or
/// nothing, refused at the first row where this database disagrees with the writer's.
pub(super) fn apply(conn: &Connection, changeset: &[u8]) -> Result<(), StoreError> {
    let size = c_int::try_from(changeset.len())
        .map_err(|_| StoreError::Corrupt("a changeset over 2 GiB".into()))?;
    let mut conflict = Conflict::default();
    // SAFETY: the handle is the live connection's; SQLite only reads `size` bytes of the
    // changeset during the call; `on_conflict` gets `conflict`, which outlives the call.
    let rc = unsafe {
        ffi::sqlite3changeset_apply(
            conn.handle(),
            size,
            changeset.as_ptr().cast_mut().cast::<c_void>(),
            None,
            Some(on_conflict),
            std::ptr::from_mut(&mut conflict).cast::<c_void>(),
        )
    };
    match conflict.found {
        Some(why) => Err(StoreError::Corrupt(format!(
            "this projection disagrees with the replicated ledger ({why}): rebuild it from the stream (move the data dir's ledger.db away and start again)"
        ))),
        None => check(rc, "cannot apply a replicated change"),
    }
}
