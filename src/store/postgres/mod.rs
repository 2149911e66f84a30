//! The PostgreSQL store (placeholder while it is built).

/// Checks a store URL without echoing it (it may hold a password).
pub fn check_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("store: expected postgres://USER[:PASSWORD]@HOST[:PORT]/DB".into());
    }
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|_| "store: not a valid postgres:// URL".into())
}
