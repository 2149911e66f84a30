//! What a worker refuses at start on a PostgreSQL store (issue 13): a schema newer than it
//! knows (an older worker must not write to it), and a server key file that differs from
//! the one the database's other workers use (its tokens and PSK hashes would disagree).

mod support;

use support::*;

async fn sql(url: &str, statement: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL (AUTHD_TEST_PG) is needed");
    tokio::spawn(connection);
    client.batch_execute(statement).await.expect(statement);
}

fn config(broker: &Broker, data: &std::path::Path, store: &str) -> authd::config::Config {
    let mut c = embedded_worker_config(broker, data);
    c.store = Some(store.into());
    c
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let broker = Broker::start();
    let store = test_database(&format!("authd_schema_{}", uuid::Uuid::new_v4().simple()));
    let data = tempfile::tempdir().unwrap();
    let worker = authd::Worker::start(config(&broker, data.path(), &store))
        .await
        .expect("worker starts and migrates");
    worker.stop().await.unwrap();

    sql(
        &store,
        "INSERT INTO authd_migrations (version, name) VALUES (99, 'from the future')",
    )
    .await;
    let e = authd::Worker::start(config(&broker, data.path(), &store))
        .await
        .err()
        .expect("a schema of version 99 is refused")
        .to_string();
    assert!(e.contains("schema version 99"), "{e}");
}

#[tokio::test]
async fn a_different_server_key_is_refused() {
    let broker = Broker::start();
    let store = test_database(&format!("authd_keys_{}", uuid::Uuid::new_v4().simple()));
    let first = tempfile::tempdir().unwrap();
    let worker = authd::Worker::start(config(&broker, first.path(), &store))
        .await
        .expect("first worker starts");
    // A second worker with a key file of its own (the same id 1, another key).
    let second = tempfile::tempdir().unwrap();
    let e = authd::Worker::start(config(&broker, second.path(), &store))
        .await
        .err()
        .expect("a worker with another server key is refused")
        .to_string();
    assert!(
        e.contains("server key 1") && e.contains("copy server.key"),
        "{e}"
    );
    worker.stop().await.unwrap();
}
