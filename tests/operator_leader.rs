//! Two `mailpoll operator` processes: only the Lease holder schedules; `kill -9` of the leader
//! hands scheduling to the other within the lease duration, and no scheduled poll is lost or
//! doubled across the handover.

use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::PostParams;
use mailpoll::resource::MailboxPoll;
use mailpoll_testkit::cluster;
use mailpoll_testkit::graph::{EmulatorConfig, GraphEmulator};
use mailpoll_testkit::kube::KubeEmulator;
use mailpoll_testkit::pg::{TestDatabase, free_port};
use mailpoll_testkit::wait_for;
use tokio::process::{Child, Command};
use uuid::Uuid;

const LEASE: &str = "mailpoll-leader";
const LEASE_SECONDS: u64 = 3;
const INTERVAL_SECONDS: i64 = 10;
const MAILBOXES: usize = 3;

struct Replica {
    name: &'static str,
    port: u16,
    child: Child,
    /// Its warnings and errors, for the failure message of a replica that never got ready.
    log: std::path::PathBuf,
}

fn start_replica(
    name: &'static str,
    db: &TestDatabase,
    kube: &KubeEmulator,
    graph: &GraphEmulator,
    namespace: &str,
) -> Replica {
    let port = free_port().expect("free port");
    let log = std::env::temp_dir().join(format!(
        "mailpoll-operator-leader-{name}-{}-{port}.log",
        std::process::id()
    ));
    let stderr = std::fs::File::create(&log).expect("replica log file");
    let child = Command::new(env!("CARGO_BIN_EXE_mailpoll"))
        .args(["operator", "--http-addr", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &db.url)
        .env("KUBECONFIG", kube.kubeconfig_path())
        .env("POD_NAME", name)
        .env("MAILPOLL_LEASE_NAMESPACE", namespace)
        .env("MAILPOLL_LEASE_DURATION_SECONDS", LEASE_SECONDS.to_string())
        .env("MAILPOLL_LEASE_RENEW_DEADLINE_SECONDS", "2")
        .env("MAILPOLL_LEASE_RETRY_PERIOD_SECONDS", "0.5")
        .env("MAILPOLL_GRAPH_AUTHORITY_URL", graph.base_url())
        .env("MAILPOLL_GRAPH_URL", graph.base_url())
        .env("MAILPOLL_DB_MAX_CONNECTIONS", "6")
        .env("MAILPOLL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("start mailpoll operator");
    Replica {
        name,
        port,
        child,
        log,
    }
}

async fn metric(port: u16, family: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|line| line.starts_with(family))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get(LEASE).await.ok()?.spec?.holder_identity
}

async fn poll_starts(db: &TestDatabase, uid: Uuid) -> Vec<DateTime<Utc>> {
    sqlx::query_scalar("SELECT started_at FROM polls WHERE mailbox_uid = $1 ORDER BY started_at")
        .bind(uid)
        .fetch_all(&db.pool)
        .await
        .expect("poll starts")
}

#[tokio::test]
async fn only_the_leader_schedules_and_a_killed_leader_is_replaced_without_losing_polls() {
    mailpoll::install_crypto_provider();
    let db = TestDatabase::create().await.expect("test database");
    let kube = KubeEmulator::start()
        .await
        .expect("Kubernetes API emulator");
    let client = kube.client().expect("client");
    cluster::install_crd(&client).await.expect("CRD installed");
    let namespace = format!("lead-{}", &Uuid::new_v4().simple().to_string()[..8]);
    cluster::create_namespace(&client, &namespace)
        .await
        .expect("namespace");
    let graph = GraphEmulator::start(EmulatorConfig {
        mailboxes: (0..MAILBOXES)
            .map(|i| format!("box{i}@contoso.com"))
            .collect(),
        ..EmulatorConfig::default()
    })
    .await
    .expect("Graph emulator");
    cluster::create_credentials(&client, &namespace, "graph", cluster::valid_client_secret())
        .await
        .expect("Secret");

    let mut replicas = vec![
        start_replica("replica-a", &db, &kube, &graph, &namespace),
        start_replica("replica-b", &db, &kube, &graph, &namespace),
    ];
    let http = reqwest::Client::new();
    for replica in &replicas {
        wait_for(
            &format!(
                "{} to be ready (its log: {})",
                replica.name,
                replica.log.display()
            ),
            Duration::from_secs(60),
            || async {
                let response = http
                    .get(format!("http://127.0.0.1:{}/readyz", replica.port))
                    .send()
                    .await
                    .ok()?;
                response.status().is_success().then_some(())
            },
        )
        .await;
    }

    let polls: Api<MailboxPoll> = Api::namespaced(client.clone(), &namespace);
    let mut uids = Vec::new();
    for i in 0..MAILBOXES {
        let created = polls
            .create(
                &PostParams::default(),
                &cluster::mailbox_poll(
                    &format!("box{i}"),
                    &format!("box{i}@contoso.com"),
                    &format!("{INTERVAL_SECONDS}s"),
                    "graph",
                ),
            )
            .await
            .expect("MailboxPoll created");
        uids.push(Uuid::parse_str(&created.metadata.uid.expect("uid")).expect("uuid"));
    }

    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let first = wait_for("a leader", Duration::from_secs(30), || holder(&leases)).await;
    let leader_index = replicas
        .iter()
        .position(|r| first.starts_with(&format!("{}/", r.name)))
        .unwrap_or_else(|| panic!("the Lease holder {first} is one of the replicas"));
    let follower_index = 1 - leader_index;

    // Two scheduled polls each, then the leader dies between polls.
    for &uid in &uids {
        wait_for(
            "two polls per MailboxPoll",
            Duration::from_secs(40),
            || async { (poll_starts(&db, uid).await.len() >= 2).then_some(()) },
        )
        .await;
    }
    let leader_port = replicas[leader_index].port;
    let follower_port = replicas[follower_index].port;
    assert_eq!(metric(leader_port, "mailpoll_leader").await, Some(1.0));
    assert_eq!(metric(follower_port, "mailpoll_leader").await, Some(0.0));
    assert!(
        metric(leader_port, "mailpoll_reconciles_total").await > Some(0.0),
        "the leader reconciles"
    );
    assert_eq!(
        metric(follower_port, "mailpoll_reconciles_total").await,
        Some(0.0),
        "the follower never reconciles while the other leads"
    );

    // Kill while no poll runs, so the handover alone is measured (a poll killed mid-run
    // waits for its task lease, which is the queue's business).
    wait_for(
        "a moment without a running poll",
        Duration::from_secs(30),
        || async {
            let running: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tasks WHERE kind = 'poll' AND state = 'running'",
            )
            .fetch_one(&db.pool)
            .await
            .ok()?;
            (running == 0).then_some(())
        },
    )
    .await;
    let killed_at = Instant::now();
    let pid = replicas[leader_index].child.id().expect("leader pid");
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill -9");
    assert!(status.success());
    let _ = replicas[leader_index].child.wait().await;
    let killed_wall = Utc::now();

    let follower_name = replicas[follower_index].name;
    let takeover_patience = Duration::from_secs(LEASE_SECONDS + 3);
    wait_for(
        "the follower to take the Lease (lease duration plus a retry period)",
        takeover_patience,
        || async {
            let holder = holder(&leases).await?;
            holder
                .starts_with(&format!("{follower_name}/"))
                .then_some(())
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    println!("leader killed; the other replica leads after {takeover:?} (lease {LEASE_SECONDS} s)");
    wait_for(
        "the follower to report leadership",
        Duration::from_secs(5),
        || async { (metric(follower_port, "mailpoll_leader").await == Some(1.0)).then_some(()) },
    )
    .await;

    // Two more scheduled polls each after the handover.
    for &uid in &uids {
        wait_for(
            "two polls after the handover",
            Duration::from_secs(40),
            || async {
                let after = poll_starts(&db, uid)
                    .await
                    .into_iter()
                    .filter(|s| *s > killed_wall)
                    .count();
                (after >= 2).then_some(())
            },
        )
        .await;
    }

    // No poll doubled (two within less than an interval) or lost (a gap beyond one interval
    // plus the handover).
    let interval = chrono::Duration::seconds(INTERVAL_SECONDS);
    let slack = chrono::Duration::milliseconds(500);
    let handover = chrono::Duration::seconds(LEASE_SECONDS as i64 + 3);
    for &uid in &uids {
        let starts = poll_starts(&db, uid).await;
        let gaps: Vec<f64> = starts
            .windows(2)
            .map(|w| (w[1] - w[0]).as_seconds_f64())
            .collect();
        println!("poll gaps of {uid}: {gaps:?}");
        for pair in starts.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= interval - slack,
                "a scheduled poll was doubled: two polls {gap} apart (interval {interval}): {gaps:?}"
            );
            assert!(
                gap <= interval + handover,
                "a scheduled poll was lost: {gap} between two polls (interval {interval}): {gaps:?}"
            );
        }
    }

    let survivor = &mut replicas[follower_index];
    let pid = survivor.child.id().expect("pid");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    let exit = tokio::time::timeout(Duration::from_secs(30), survivor.child.wait())
        .await
        .expect("the survivor exits within 30 s of SIGTERM")
        .expect("exit status");
    assert!(exit.success(), "graceful shutdown exits 0, got {exit}");
    assert_eq!(
        holder(&leases).await.unwrap_or_default(),
        "",
        "the Lease is released at shutdown"
    );
}
