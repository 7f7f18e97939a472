//! Logging setup for the binaries: human-readable by default, JSON lines with `LOG_FORMAT=json`,
//! level from `RUST_LOG` (default `info`).

use tracing_subscriber::{fmt, EnvFilter};

pub fn init(process: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT")
        .map(|v| v == "json")
        .unwrap_or(false);
    // Colours only on a terminal: logs redirected to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi);
    let result = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    if result.is_ok() {
        tracing::debug!(process, "logging initialised");
    }
}
