//! `GET /api/v1/roster/users:export?format=csv`: the roster as CSV, streamed. Rows are
//! produced on the blocking pool into a small bounded channel, so memory stays constant
//! whatever the tenant's size and a slow client slows the producer instead of buffering.
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::sync::Arc;

use super::jwt::Scope;
use super::roster::{FILTER_PARAMS, Renderer, UserFilter, admit, blocking};
use super::{ApiError, ApiResult, Params};
use crate::server::AppState;
use crate::store::{Store, StoreError, StoreResult};

/// The columns of roster-api.txt, in order.
pub const COLUMNS: [&str; 11] = [
    "user_id",
    "email",
    "first_name",
    "last_name",
    "job_title",
    "department",
    "manager",
    "archetype_id",
    "archetype_confidence",
    "is_active",
    "groups",
];

const CHUNK: usize = 64 * 1024;

/// Exports running at once, per tenant and in all. Each holds a thread of the blocking
/// pool (512, which every store write and read shares) while its client reads: a
/// tenant's clients that opened exports and stopped reading took every thread, and with
/// them every other tenant's writes, `/status` and deliveries.
pub const EXPORTS_PER_TENANT: usize = 4;
pub const EXPORTS_IN_ALL: usize = 32;

/// Seconds a client is told to wait before asking again when every slot is taken.
pub(super) const EXPORT_RETRY_AFTER_SECS: &str = "10";

/// The export slots of [`EXPORTS_PER_TENANT`] and [`EXPORTS_IN_ALL`].
pub struct ExportSlots {
    all: Arc<tokio::sync::Semaphore>,
    tenants: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl Default for ExportSlots {
    fn default() -> Self {
        ExportSlots {
            all: Arc::new(tokio::sync::Semaphore::new(EXPORTS_IN_ALL)),
            tenants: Default::default(),
        }
    }
}

/// An export's slots, given back when the export ends however it ends.
pub struct ExportSlot {
    _tenant: tokio::sync::OwnedSemaphorePermit,
    _all: tokio::sync::OwnedSemaphorePermit,
}

impl ExportSlots {
    /// A slot for one export of `tenant`, or why there is none now.
    pub fn take(&self, tenant: &str) -> ApiResult<ExportSlot> {
        let mine = self
            .tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(EXPORTS_PER_TENANT)))
            .clone();
        let _tenant = mine.try_acquire_owned().map_err(|_| {
            ApiError::TooManyExports(format!(
                "this tenant has {EXPORTS_PER_TENANT} exports running"
            ))
        })?;
        let _all = self.all.clone().try_acquire_owned().map_err(|_| {
            ApiError::TooManyExports(format!(
                "{EXPORTS_IN_ALL} exports are running on this daemon"
            ))
        })?;
        Ok(ExportSlot { _tenant, _all })
    }
}

/// A cell that a spreadsheet would run as a formula gets a leading `'` (OWASP CSV
/// injection advice): identity data is attacker-influenced, exports are opened in Excel.
/// Leading spaces are looked through, and the fullwidth signs too, because importers
/// that trim cells or fold fullwidth forms (LibreOffice, some BI loaders) would still
/// see a formula there. Invisible format characters (a zero-width space, a BOM) are
/// looked through as well: loaders that strip them, as text cleaners do, would otherwise
/// hand a spreadsheet a bare `=`.
pub fn neutralize(cell: &str) -> std::borrow::Cow<'_, str> {
    // The braille blank (U+2800) is drawn as a space without being one.
    let shown = cell.trim_start_matches(|c: char| {
        c.is_whitespace() || c == '\u{2800}' || crate::text::is_invisible(c)
    });
    if cell.starts_with(['\t', '\r']) || shown.starts_with(FORMULA_STARTS) {
        return format!("'{cell}").into();
    }
    cell.into()
}

/// The characters a spreadsheet reads as the start of a formula: `= + - @` and their
/// fullwidth forms.
pub const FORMULA_STARTS: [char; 8] = [
    '=', '+', '-', '@', '\u{FF1D}', '\u{FF0B}', '\u{FF0D}', '\u{FF20}',
];

/// A confidence cut (not rounded) to three places, as CSV output shows it: rounding would
/// print 0.6996, which is under the review threshold, as 0.700. The nudge keeps values
/// such as 0.29, whose binary form is a hair under, from dropping a thousandth.
pub fn confidence_cell(c: f64) -> String {
    format!("{:.3}", (c * 1000.0 + 1e-9).floor() / 1000.0)
}

/// The csv writer's sink: shared so full chunks can be taken out while it keeps writing.
#[derive(Clone, Default)]
struct SharedBuf(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl SharedBuf {
    fn len(&self) -> usize {
        self.0.borrow().len()
    }
}

impl std::io::Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn csv_error(e: csv::Error) -> StoreError {
    StoreError::Backend(format!("csv: {e}"))
}

/// The roster CSV's writer settings: RFC 4180 quoting, CRLF line ends.
fn csv_writer<W: std::io::Write>(out: W) -> csv::Writer<W> {
    csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(out)
}

/// Write the header and one row per user `filter` matches, in no particular order, calling
/// `after_row` after each row (false stops the walk). Returns the rows written. The one
/// place roster CSV rows are made: the HTTP export and the CSV connector both come here.
fn write_rows<W: std::io::Write>(
    store: &Store,
    tenant: &str,
    filter: &UserFilter,
    w: &mut csv::Writer<W>,
    mut after_row: impl FnMut(&mut csv::Writer<W>) -> StoreResult<bool>,
) -> StoreResult<u64> {
    let mut renderer = Renderer::new(store, tenant);
    let mut rows = 0u64;
    let mut record = csv::ByteRecord::new();
    let mut confidence = String::new();
    let mut user_id = b"user:".to_vec();
    w.write_record(COLUMNS).map_err(csv_error)?;
    filter.for_each_unordered(store, tenant, |id, rec, groups| {
        let manager = match rec.user.manager {
            Some(mid) => renderer.manager_name(mid)?,
            None => None,
        };
        // Group ids, as roster-api.txt's example has them: a display name may repeat or
        // hold a comma, an id does neither, so the cell splits back into the groups.
        let groups = renderer.group_ids(id, groups)?.join(",");
        confidence.clear();
        if let Some(c) = rec.confidence() {
            use std::fmt::Write;
            let _ = write!(confidence, "{}", confidence_cell(c));
        }
        let cells = [
            rec.user.email,
            rec.user.given_name.as_deref(),
            rec.user.family_name.as_deref(),
            rec.user.title,
            rec.user.department,
            manager.as_deref(),
            rec.archetype_id(),
            Some(confidence.as_str()),
            Some(if rec.user.active { "true" } else { "false" }),
            Some(groups.as_str()),
        ];
        // user_id is `user:` + userName: never a formula, whatever the userName.
        user_id.truncate(b"user:".len());
        user_id.extend_from_slice(rec.user.user_name.as_bytes());
        record.clear();
        record.push_field(&user_id);
        for cell in cells {
            record.push_field(neutralize(cell.unwrap_or("")).as_bytes());
        }
        w.write_byte_record(&record).map_err(csv_error)?;
        rows += 1;
        after_row(w)
    })?;
    Ok(rows)
}

/// The roster CSV of every user of the tenant, active and inactive (the export with
/// `active=any`), to `out`: the columns of [`COLUMNS`], cells [`neutralize`]d, RFC 4180
/// quoting, CRLF line ends. Streams the store; returns the number of users written.
/// Blocking: call it from the blocking pool.
pub fn write_roster_csv<W: std::io::Write>(
    store: &Store,
    tenant: &str,
    out: W,
) -> StoreResult<u64> {
    let all = UserFilter {
        active: None,
        ..UserFilter::default()
    };
    let mut w = csv_writer(out);
    let rows = write_rows(store, tenant, &all, &mut w, |_| Ok(true))?;
    w.flush()
        .map_err(|e| StoreError::Backend(format!("csv: {e}")))?;
    Ok(rows)
}

pub(super) async fn export_users(
    State(st): State<Arc<AppState>>,
    socket: Option<axum::Extension<crate::server::ConnSocket>>,
    headers: HeaderMap,
    p: Params,
) -> ApiResult<Response> {
    let mut allowed = FILTER_PARAMS.to_vec();
    allowed.push("format");
    let (caller, p) = admit(&st, &headers, Scope::Read, p, &allowed)?;
    match p.get("format").map(String::as_str) {
        None | Some("csv") => {}
        Some(f) => {
            return Err(ApiError::BadRequest(format!(
                "format {f:?} is not supported; use format=csv"
            )));
        }
    }
    let policy = super::roster::tenant_of(&st, &caller.tenant)?.policy();
    let slot = st.roster.exports.take(&caller.tenant)?;
    let tenant = caller.tenant;
    // Validate the filters before the 200 goes out: errors after that cannot be reported.
    let filter = {
        let (st, tenant, p) = (st.clone(), tenant.clone(), p.clone());
        blocking(move || UserFilter::from_params(&st.store, &tenant, policy.as_deref(), &p)).await?
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let span = tracing::Span::current();
    // A client that takes nothing for this long is let go, and its slot with it; the body
    // then ends in an error, not as if the file were whole.
    let stall = std::time::Duration::from_secs(st.config.server.client_timeout_secs);
    let socket = socket.map(|axum::Extension(s)| s);
    let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runtime = tokio::runtime::Handle::current();
    let given_up = abandoned.clone();
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let _in = span.enter();
        let store = &st.store;
        let buf = SharedBuf::default();
        let mut w = csv_writer(buf.clone());
        // Once false, nothing more is sent: the client went away or was let go (the
        // last chunk's send would wait out another stall, and log it again).
        let mut open = true;
        let mut send = |buf: &mut Vec<u8>| -> bool {
            use tokio::sync::mpsc::error::SendTimeoutError;
            let mut chunk = Ok(Bytes::from(std::mem::take(buf)));
            // A client reading slowly but steadily takes nothing the writer sees for a
            // long time: the kernel wakes it only once a third of the socket's buffer
            // (megabytes) has drained. It is reading while what it has not acknowledged
            // shrinks.
            if !open {
                return false;
            }
            let mut unacked = socket.and_then(crate::server::ConnSocket::unacknowledged);
            loop {
                match runtime.block_on(tx.send_timeout(chunk, stall)) {
                    Ok(()) => return true,
                    Err(SendTimeoutError::Closed(_)) => break,
                    Err(SendTimeoutError::Timeout(back)) => {
                        let now = socket.and_then(crate::server::ConnSocket::unacknowledged);
                        if let (Some(before), Some(now)) = (unacked, now)
                            && now < before
                        {
                            (chunk, unacked) = (back, Some(now));
                            continue;
                        }
                        tracing::warn!(
                            stalled_secs = stall.as_secs(),
                            "The client read nothing of the export for server.client_timeout_secs; the export is ended."
                        );
                        given_up.store(true, std::sync::atomic::Ordering::Release);
                        break;
                    }
                }
            }
            open = false;
            false
        };
        // A panic part-way must end the body with an error, as a store error does: a
        // stream that simply stops reads as a complete file.
        let result = crate::ops::panics::catch_sync(|| -> ApiResult<()> {
            write_rows(store, &tenant, &filter, &mut w, |w| {
                if buf.len() >= CHUNK {
                    w.flush().map_err(|e| StoreError::Backend(e.to_string()))?;
                    // The client went away: stop reading the store.
                    return Ok(send(&mut buf.0.borrow_mut()));
                }
                Ok(true)
            })?;
            w.flush().map_err(|e| StoreError::Backend(e.to_string()))?;
            send(&mut buf.0.borrow_mut());
            Ok(())
        })
        .unwrap_or_else(|panic| Err(ApiError::Internal(StoreError::Panicked(panic))));
        if let Err(e) = result {
            tracing::error!(error = %e, "CSV export failed part-way; the client sees a truncated body.");
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let stream = futures_util::stream::unfold(Some(rx), move |rx| {
        let abandoned = abandoned.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(item) => Some((item, Some(rx))),
                None => abandoned
                    .load(std::sync::atomic::Ordering::Acquire)
                    .then(|| {
                        let e = std::io::Error::other("the client stalled; the export was ended");
                        (Err(e), None)
                    }),
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"roster.csv\"",
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_take_a_slot_of_their_tenant_and_of_the_daemon() {
        let slots = ExportSlots::default();
        let mine: Vec<ExportSlot> = (0..EXPORTS_PER_TENANT)
            .map(|_| slots.take("a").unwrap())
            .collect();
        assert!(matches!(slots.take("a"), Err(ApiError::TooManyExports(_))));
        // Another tenant's exports are not this one's to wait for.
        let other = slots.take("b").unwrap();
        drop(mine);
        let again = slots.take("a").unwrap();
        drop((other, again));
        // In all, across tenants.
        let all: Vec<ExportSlot> = (0..EXPORTS_IN_ALL)
            .map(|i| slots.take(&format!("t{}", i / EXPORTS_PER_TENANT)).unwrap())
            .collect();
        let refused = slots.take("z").err().unwrap();
        assert!(refused.to_string().contains("on this daemon"), "{refused}");
        assert_eq!(refused.status_and_code().0.as_u16(), 429);
        drop(all);
        assert!(slots.take("z").is_ok());
    }

    #[test]
    fn confidence_is_cut_not_rounded() {
        let shown = confidence_cell;
        assert_eq!(shown(0.6996), "0.699");
        assert_eq!(shown(0.7), "0.700");
        assert_eq!(shown(0.29), "0.290");
        assert_eq!(shown(0.992), "0.992");
        assert_eq!(shown(1.0), "1.000");
        assert_eq!(shown(0.0), "0.000");
    }

    #[test]
    fn formula_cells_are_neutralized() {
        assert_eq!(neutralize("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(neutralize("+1"), "'+1");
        assert_eq!(neutralize("-2"), "'-2");
        assert_eq!(neutralize("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(neutralize("  =1+1"), "'  =1+1");
        assert_eq!(neutralize("\u{a0}@x"), "'\u{a0}@x");
        assert_eq!(neutralize("\u{FF1D}1+1"), "'\u{FF1D}1+1");
        assert_eq!(neutralize("\u{FF0D}2"), "'\u{FF0D}2");
        assert_eq!(neutralize("\tx"), "'\tx");
        assert_eq!(neutralize("\u{FEFF}=1+1"), "'\u{FEFF}=1+1");
        assert_eq!(
            neutralize("\u{200B} \u{2060}\u{202E}-2"),
            "'\u{200B} \u{2060}\u{202E}-2"
        );
        assert_eq!(neutralize("\u{200B}Engineer"), "\u{200B}Engineer");
        assert_eq!(neutralize("\u{2800}=1+1"), "'\u{2800}=1+1");
        assert_eq!(neutralize("Engineer"), "Engineer");
        assert_eq!(neutralize("  Engineer"), "  Engineer");
        assert_eq!(neutralize("R&D - Labs"), "R&D - Labs");
        assert_eq!(neutralize(""), "");
    }
}
