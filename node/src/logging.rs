//! Logs through `tracing`, to standard error, as text or JSON lines, with each
//! callsite's lines rate-limited (see `log_limit`).

use std::io::IsTerminal;

use tracing_subscriber::{
    filter::FilterExt, fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer,
};

use crate::{config::LogFormat, log_limit::LogLimit};

/// Installs the global subscriber. `filter` was validated with the config; should it
/// still fail (it cannot), `info` is used. Calling this twice is harmless.
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = filter.and(LogLimit::default());
    let ansi = std::io::stderr().is_terminal();
    let layer = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    // An already-installed subscriber (tests, embedding programs) keeps its place.
    let _ = tracing_subscriber::registry().with(layer).try_init();
}
