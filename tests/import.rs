//! `authd import`: bulk provisioning of a stopped worker's data directory.

mod support;

use serde_json::json;
use support::*;

#[tokio::test]
async fn imported_entities_sign_in_and_bad_lines_are_reported() {
    let broker = Broker::start();
    let data = tempfile::tempdir().unwrap();
    let input = data.path().join("provision.jsonl");
    std::fs::write(
        &input,
        [
            json!({"method": "Entity.Put", "args": {"id": "dev-1", "psk": "psk-one", "owner": "alice"}}).to_string(),
            String::new(),
            json!({"method": "/v1/Entity.Put", "args": {"id": "dev-2", "psk": "psk-two"}}).to_string(),
            json!({"method": "Entity.Put", "args": {"id": ""}}).to_string(),
            "not json".into(),
        ]
        .join("\n"),
    )
    .unwrap();
    let db = data.path().join("worker");
    let out = authd_command(&db)
        .args(["import", "--data"])
        .arg(&db)
        .arg(&input)
        .output()
        .expect("run authd import");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "some lines were refused: {stdout} {stderr}"
    );
    assert!(stdout.contains("2 applied, 2 refused"), "{stdout}");
    assert!(stderr.contains("line 4: 400 args.id"), "{stderr}");
    assert!(stderr.contains("line 5: "), "{stderr}");
    assert!(
        !stderr.contains("psk-one"),
        "a secret in the output: {stderr}"
    );

    let worker = authd::Worker::start(worker_config(&broker, &db))
        .await
        .expect("worker starts on the imported data");
    tokio::time::timeout(TIMEOUT, worker.ready()).await.unwrap();
    let backend = client(&broker, Some(SERVICE_KEY), None).await;
    let auth = |id: &str, psk: &str| json!({"id": id, "credentials": {"psk": psk}});
    assert_eq!(
        ok(&backend, "Auth.Authenticate", auth("dev-1", "psk-one")).await,
        Some(json!(true))
    );
    assert_eq!(
        ok(&backend, "Auth.Authenticate", auth("dev-2", "psk-two")).await,
        Some(json!(true))
    );
    assert_eq!(
        ok(&backend, "Auth.Authenticate", auth("dev-2", "psk-one")).await,
        Some(json!(false))
    );
    let admin = client(&broker, Some(ADMIN_KEY), None).await;
    let got = ok(&admin, "Entity.Get", json!({"id": "dev-1"}))
        .await
        .unwrap();
    assert_eq!(got["owner"], json!("alice"));
    worker.stop().await.unwrap();
}
