//! The log filter: what `RUST_LOG` means for authd.
//!
//! authd promises that no secret reaches its log at any level. Its own events never carry
//! one; other crates' events are not ours to vouch for (an MQTT client or a database logging
//! packets or pages at `trace`). So a bare level in `RUST_LOG` (`trace`, `debug`, …) sets
//! authd's level, and every other crate logs at most at `info` — `RUST_LOG=trace` means
//! authd's trace. A directive that names a crate (`RUST_LOG=trace,tokio_postgres=trace`) is obeyed
//! as written: that is an explicit choice to see that crate's internals, outside the promise.

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

/// The most other crates log when `RUST_LOG` does not name them.
pub const DEPENDENCY_CAP: LevelFilter = LevelFilter::INFO;

/// The filter directives for `spec` (a `RUST_LOG` value): each bare level `L` becomes
/// `authd=L` plus `min(L, info)` for everything else; other directives are kept.
pub fn directives(spec: &str) -> String {
    let mut generic = None;
    let mut out = Vec::new();
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match d.parse::<LevelFilter>() {
            Ok(level) => {
                out.push(format!("authd={level}"));
                generic = Some(level.min(DEPENDENCY_CAP));
            }
            Err(_) => out.push(d.to_owned()),
        }
    }
    if let Some(level) = generic {
        out.insert(0, level.to_string());
    }
    out.join(",")
}

/// The filter for `spec` (`RUST_LOG`), or for `default` (a bare level) when `spec` is absent,
/// empty or invalid.
pub fn filter(spec: Option<&str>, default: &str) -> EnvFilter {
    spec.filter(|s| !s.trim().is_empty())
        .and_then(|s| EnvFilter::try_new(directives(s)).ok())
        .unwrap_or_else(|| EnvFilter::new(directives(default)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_levels_are_authd_levels_and_dependencies_stay_at_info() {
        assert_eq!(directives("trace"), "info,authd=trace");
        assert_eq!(directives("debug"), "info,authd=debug");
        assert_eq!(directives("info"), "info,authd=info");
        assert_eq!(directives("warn"), "warn,authd=warn");
        assert_eq!(directives("off"), "off,authd=off");
        assert_eq!(
            directives("trace, rumqttc=debug"),
            "info,authd=trace,rumqttc=debug"
        );
        assert_eq!(directives("authd::audit=info"), "authd::audit=info");
        assert_eq!(directives(""), "");
    }

    #[test]
    fn filters_build() {
        assert_eq!(
            filter(Some("trace"), "info").max_level_hint(),
            Some(LevelFilter::TRACE)
        );
        assert_eq!(
            filter(None, "warn").max_level_hint(),
            Some(LevelFilter::WARN)
        );
        // Not a filter: the default applies.
        assert_eq!(
            filter(Some("[[["), "warn").max_level_hint(),
            Some(LevelFilter::WARN)
        );
    }
}
