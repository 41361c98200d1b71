//! Logs of the coordinator and the workers: human-readable lines or one JSON object per line on
//! stderr, filtered by `LADDER_LOG` (`info` by default, `LADDER_LOG=debug` for more).

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?}: expected `text` or `json`")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

pub fn init(format: LogFormat) {
    let filter = match std::env::var("LADDER_LOG") {
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
        Ok(directives) => tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|e| {
            eprintln!(
                "warning: LADDER_LOG={directives:?} is not a log filter ({e}); logging at info"
            );
            tracing_subscriber::EnvFilter::new("info")
        }),
    };
    // Colours only for a person at a terminal: log files stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
