//! The brute-force guard through a real broker (docs/protocol.md#auth-authenticate, SECURITY.md):
//! a flood of fresh ids does not reset a victim's streak, concurrent guesses get no more
//! checks than sequential ones, and the right PSK never lifts a lock in force.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use authd::client::Client;
use serde_json::json;
use support::*;

const PSK: &str = "correct horse battery staple";

async fn provision(s: &Setup, id: &str) {
    let admin = s.admin().await;
    ok(&admin, "/v1/Entity.Put", json!({"id": id, "psk": PSK})).await;
}

/// The security review's reproduction: with `lockout_max_entries = 20`, 12 wrong guesses
/// for a victim, each followed by failures for 25 fresh ids, used to leave the victim
/// unlocked (its streak evicted again and again) and the right PSK accepted.
#[tokio::test]
async fn spraying_fresh_ids_does_not_reset_a_victims_streak() {
    let s = Setup::start_with(|c| {
        c.lockout_max_entries = 20;
        c.lockout_base_ms = 60_000;
    })
    .await;
    provision(&s, "victim").await;
    let backend = s.service("backend").await;
    let wrong = json!({"psk": "a wrong guess"});
    for guess in 0..12 {
        assert!(!authenticate(&backend, "victim", wrong.clone()).await);
        for n in 0..25 {
            let id = format!("spray-{guess}-{n}");
            assert!(!authenticate(&backend, &id, wrong.clone()).await);
        }
    }
    assert!(
        !authenticate(&backend, "victim", json!({"psk": PSK})).await,
        "the victim is locked: the right PSK is refused"
    );
}

/// 64 wrong guesses sent at once, then the right PSK: at most `lockout_failures` of them
/// are checked, the id is locked, and the right PSK is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_wrong_guesses_then_the_right_psk_is_refused() {
    let s = Setup::start_with(|c| c.lockout_base_ms = 60_000).await;
    provision(&s, "dev").await;
    let backend = Arc::new(s.service("backend").await);
    let call = |c: &Arc<Client>, psk: &str| {
        let (c, psk) = (c.clone(), psk.to_owned());
        tokio::spawn(async move { authenticate(&c, "dev", json!({"psk": psk})).await })
    };
    let guesses: Vec<_> = (0..64)
        .map(|n| call(&backend, &format!("guess {n}")))
        .collect();
    let right = call(&backend, PSK);
    for g in guesses {
        assert!(!g.await.unwrap());
    }
    assert!(!right.await.unwrap(), "sent with the guesses: refused");
    assert!(
        !authenticate(&backend, "dev", json!({"psk": PSK})).await,
        "and after them: still locked"
    );
}

/// The right PSK during a lock is refused, and neither the lock nor the streak is cleared
/// by it: once the lock ends, a single wrong guess locks the id again, for twice as long.
#[tokio::test]
async fn the_right_psk_during_a_lock_clears_neither_the_lock_nor_the_streak() {
    let s = Setup::start_with(|c| {
        c.lockout_failures = 3;
        c.lockout_base_ms = 1000;
    })
    .await;
    provision(&s, "dev").await;
    let backend = s.service("backend").await;
    let wrong = json!({"psk": "a wrong guess"});
    for _ in 0..3 {
        assert!(!authenticate(&backend, "dev", wrong.clone()).await);
    }
    let locked_at = Instant::now();
    for _ in 0..5 {
        assert!(!authenticate(&backend, "dev", json!({"psk": PSK})).await);
    }
    assert!(
        locked_at.elapsed() < Duration::from_millis(1000),
        "the machine is too slow for this test's timing"
    );
    tokio::time::sleep(Duration::from_millis(1050).saturating_sub(locked_at.elapsed())).await;
    // The lock has ended; the streak of three stands: one more failure locks for 2 s.
    assert!(!authenticate(&backend, "dev", wrong).await);
    assert!(
        !authenticate(&backend, "dev", json!({"psk": PSK})).await,
        "locked again by a single failure"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(authenticate(&backend, "dev", json!({"psk": PSK})).await);
}
