//! Logging to containerd's shim log fifo (`<bundle>/log`) in logrus text
//! format, which containerd copies into its own log:
//! `time="2024-05-01T10:00:00.123456789Z" level=info msg="create" id=c1`.
//! The level can change at run time (the configuration is only known at the
//! first Create).
use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

static LEVEL: AtomicU8 = AtomicU8::new(2);

fn rank(l: &Level) -> u8 {
    match *l {
        Level::ERROR => 0,
        Level::WARN => 1,
        Level::INFO => 2,
        Level::DEBUG => 3,
        Level::TRACE => 4,
    }
}

/// Sets the level: error, warn, info, debug or trace (others: info).
pub fn set_level(level: &str) {
    let r = match level {
        "error" => 0,
        "warn" => 1,
        "debug" => 3,
        "trace" => 4,
        _ => 2,
    };
    LEVEL.store(r, Ordering::Relaxed);
}

/// Logrus-format lines to a writer, one `write` per line.
pub struct LogrusLayer {
    out: Mutex<Box<dyn Write + Send>>,
}

impl LogrusLayer {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out: Mutex::new(out),
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

fn quote(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._/@^+:".contains(c));
    if plain {
        v.to_string()
    } else {
        serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into())
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            let _ = write!(self.rest, " {}={}", field.name(), quote(value));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let v = format!("{value:?}");
        if field.name() == "message" {
            self.message = v;
        } else {
            let _ = write!(self.rest, " {}={}", field.name(), quote(&v));
        }
    }
}

/// RFC 3339 UTC timestamp with nanoseconds.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        d.subsec_nanos()
    )
}

impl<S: Subscriber> Layer<S> for LogrusLayer {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, meta: &Metadata<'_>, _: Context<'_, S>) -> bool {
        rank(meta.level()) <= LEVEL.load(Ordering::Relaxed)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        let line = format!(
            "time=\"{}\" level={level} msg={}{} module={}\n",
            rfc3339(std::time::SystemTime::now()),
            serde_json::to_string(&f.message).unwrap_or_default(),
            f.rest,
            quote(event.metadata().target()),
        );
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // containerd may be restarting: a failed write is dropped.
        let _ = out.write_all(line.as_bytes());
    }
}

/// Installs the logger writing to `out` at `level` (once per process).
pub fn init(out: Box<dyn Write + Send>, level: &str) {
    set_level(level);
    let _ = tracing_subscriber::registry()
        .with(LogrusLayer::new(out))
        .try_init();
}

/// Opens containerd's log fifo `log` in the working directory (the
/// bundle) for writing, without blocking when nobody reads it.
pub fn open_fifo(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    // Writes block from now on (containerd keeps reading), so lines are
    // never dropped half-way.
    let fl = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETFL)?;
    let mut flags = nix::fcntl::OFlag::from_bits_truncate(fl);
    flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 5);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.000000005Z");
    }

    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn logrus_lines_and_levels() {
        let buf = Buf::default();
        let sub = tracing_subscriber::registry().with(LogrusLayer::new(Box::new(buf.clone())));
        tracing::subscriber::with_default(sub, || {
            set_level("info");
            tracing::info!(id = "c1", path = "/a b", "create \"x\"");
            tracing::debug!("hidden");
            set_level("debug");
            tracing::debug!(n = 3, "shown");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("time=\""), "{}", lines[0]);
        assert!(
            lines[0].contains(r#"level=info msg="create \"x\"" id=c1 path="/a b""#),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("level=debug msg=\"shown\" n=3"),
            "{}",
            lines[1]
        );
        set_level("info");
    }
}
