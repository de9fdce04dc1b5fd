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
use mailpoll_testkit::kube::{ApiError, FaultEffect, KubeEmulator, RequestRecord};
use mailpoll_testkit::pg::{TestDatabase, free_port};
use mailpoll_testkit::{wait_for, wait_until};
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
    // Its own credentials, so the API server's record and injected faults tell replicas apart.
    let kubeconfig = kube.kubeconfig_for(name).expect("kubeconfig");
    let child = Command::new(env!("CARGO_BIN_EXE_mailpoll"))
        .args(["operator", "--http-addr", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &db.url)
        .env("KUBECONFIG", kubeconfig)
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

/// Postgres, the emulators, two replicas and `MAILBOXES` MailboxPolls; one replica leads.
struct Cluster {
    db: TestDatabase,
    kube: KubeEmulator,
    _graph: GraphEmulator,
    leases: Api<Lease>,
    replicas: Vec<Replica>,
    uids: Vec<Uuid>,
    leader: usize,
}

impl Cluster {
    async fn start() -> Self {
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
        let replicas = vec![
            start_replica("replica-a", &db, &kube, &graph, &namespace),
            start_replica("replica-b", &db, &kube, &graph, &namespace),
        ];
        for replica in &replicas {
            wait_ready(replica).await;
        }
        let uids = create_mailbox_polls(&client, &namespace).await;
        let leases: Api<Lease> = Api::namespaced(client, &namespace);
        let first = wait_for("a leader", Duration::from_secs(30), || holder(&leases)).await;
        let leader = replicas
            .iter()
            .position(|r| first.starts_with(&format!("{}/", r.name)))
            .unwrap_or_else(|| panic!("the Lease holder {first} is one of the replicas"));
        Self {
            db,
            kube,
            _graph: graph,
            leases,
            replicas,
            uids,
            leader,
        }
    }

    fn follower(&self) -> usize {
        1 - self.leader
    }

    /// Waits until every MailboxPoll has been polled `n` times.
    async fn polled(&self, n: usize) {
        for &uid in &self.uids {
            wait_for(
                &format!("{n} polls per MailboxPoll"),
                Duration::from_secs(40),
                || async { (poll_starts(&self.db, uid).await.len() >= n).then_some(()) },
            )
            .await;
        }
    }

    async fn wait_holder(&self, index: usize, patience: Duration) {
        let name = self.replicas[index].name;
        wait_for(&format!("{name} to hold the Lease"), patience, || async {
            let holder = holder(&self.leases).await?;
            holder.starts_with(&format!("{name}/")).then_some(())
        })
        .await;
    }

    /// No poll doubled (two within less than an interval) or lost (a gap beyond one
    /// interval plus the handover).
    async fn assert_polls_on_schedule(&self) {
        let interval = chrono::Duration::seconds(INTERVAL_SECONDS);
        let slack = chrono::Duration::milliseconds(500);
        let handover = chrono::Duration::seconds(LEASE_SECONDS as i64 + 3);
        for &uid in &self.uids {
            let starts = poll_starts(&self.db, uid).await;
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
    }
}

async fn wait_ready(replica: &Replica) {
    let http = reqwest::Client::new();
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

async fn create_mailbox_polls(client: &kube::Client, namespace: &str) -> Vec<Uuid> {
    let polls: Api<MailboxPoll> = Api::namespaced(client.clone(), namespace);
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
    uids
}

#[tokio::test]
async fn only_the_leader_schedules_and_a_killed_leader_is_replaced_without_losing_polls() {
    let mut cluster = Cluster::start().await;
    let (leader, follower) = (cluster.leader, cluster.follower());

    // Two scheduled polls each, then the leader dies between polls.
    cluster.polled(2).await;
    let leader_port = cluster.replicas[leader].port;
    let follower_port = cluster.replicas[follower].port;
    assert_eq!(metric(leader_port, "mailpoll_leader ").await, Some(1.0));
    assert_eq!(metric(follower_port, "mailpoll_leader ").await, Some(0.0));
    assert!(
        metric(leader_port, "mailpoll_reconciles_total").await > Some(0.0),
        "the leader reconciles"
    );
    // What describes shared state is exported once, by the leader: a sum over replicas is right.
    wait_until(
        "the leader exports the queue and MailboxPoll gauges",
        Duration::from_secs(30),
        || async {
            metric(leader_port, "mailpoll_queue_tasks{").await > Some(0.0)
                && metric(leader_port, "mailpoll_mailboxpoll_ready{").await >= Some(1.0)
        },
    )
    .await;
    for family in ["mailpoll_queue_tasks{", "mailpoll_mailboxpoll_ready{"] {
        assert_eq!(
            metric(follower_port, family).await,
            Some(0.0),
            "the follower exports no {family}"
        );
    }
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
            .fetch_one(&cluster.db.pool)
            .await
            .ok()?;
            (running == 0).then_some(())
        },
    )
    .await;
    let killed_at = Instant::now();
    signal(&cluster.replicas[leader], "-9");
    let _ = cluster.replicas[leader].child.wait().await;
    let killed_wall = Utc::now();

    cluster
        .wait_holder(follower, Duration::from_secs(LEASE_SECONDS + 3))
        .await;
    let takeover = killed_at.elapsed();
    println!("leader killed; the other replica leads after {takeover:?} (lease {LEASE_SECONDS} s)");
    wait_for(
        "the follower to report leadership",
        Duration::from_secs(5),
        || async { (metric(follower_port, "mailpoll_leader ").await == Some(1.0)).then_some(()) },
    )
    .await;

    // Two more scheduled polls each after the handover.
    for &uid in &cluster.uids {
        wait_for(
            "two polls after the handover",
            Duration::from_secs(40),
            || async {
                let after = poll_starts(&cluster.db, uid)
                    .await
                    .into_iter()
                    .filter(|s| *s > killed_wall)
                    .count();
                (after >= 2).then_some(())
            },
        )
        .await;
    }
    cluster.assert_polls_on_schedule().await;

    let survivor = &mut cluster.replicas[follower];
    signal(survivor, "-TERM");
    let exit = tokio::time::timeout(Duration::from_secs(30), survivor.child.wait())
        .await
        .expect("the survivor exits within 30 s of SIGTERM")
        .expect("exit status");
    assert!(exit.success(), "graceful shutdown exits 0, got {exit}");
    assert_eq!(
        holder(&cluster.leases).await.unwrap_or_default(),
        "",
        "the Lease is released at shutdown"
    );
}

/// Both replicas stay alive, but every Lease renewal of the leader fails: it stops its
/// controller at once, so none of its Kubernetes writes comes after the other takes the
/// Lease, its reconciles stop, and scheduled polls are neither doubled nor lost.
#[tokio::test]
async fn a_leader_whose_renewals_fail_stops_writing_before_the_other_takes_over() {
    let cluster = Cluster::start().await;
    let (leader, follower) = (cluster.leader, cluster.follower());
    let (old, new) = (
        cluster.replicas[leader].name,
        cluster.replicas[follower].name,
    );
    cluster.polled(2).await;

    cluster.kube.inject_fault_for(
        old,
        "update",
        "leases",
        1_000_000,
        FaultEffect::Fail(ApiError::with_code(500, "injected")),
    );
    cluster
        .wait_holder(follower, Duration::from_secs(LEASE_SECONDS + 5))
        .await;
    let old_port = cluster.replicas[leader].port;
    wait_for(
        "the old leader to report it follows",
        Duration::from_secs(5),
        || async { (metric(old_port, "mailpoll_leader ").await == Some(0.0)).then_some(()) },
    )
    .await;
    let reconciles = metric(old_port, "mailpoll_reconciles_total").await;

    // Barrier: a poll of every MailboxPoll scheduled by the new leader, and its status
    // written. Anything the old leader still had in flight would have landed by then.
    let took_over = Utc::now();
    for &uid in &cluster.uids {
        wait_for(
            "a poll scheduled by the new leader",
            Duration::from_secs(40),
            || async {
                let polled = poll_starts(&cluster.db, uid)
                    .await
                    .into_iter()
                    .any(|s| s > took_over);
                polled.then_some(())
            },
        )
        .await;
    }
    let status_writes_by = |user: &str| {
        cluster
            .kube
            .requests()
            .iter()
            .filter(|r| {
                r.user.as_deref() == Some(user) && r.subresource.as_deref() == Some("status")
            })
            .count()
    };
    wait_for(
        "the new leader to write statuses",
        Duration::from_secs(40),
        || async { (status_writes_by(new) >= MAILBOXES).then_some(()) },
    )
    .await;

    let record = cluster.kube.requests();
    let takeover = record
        .iter()
        .position(|r| {
            r.user.as_deref() == Some(new)
                && r.resource == "leases"
                && r.verb == "update"
                && r.code == 200
        })
        .expect("the new leader's takeover is in the record");
    let late: Vec<String> = record[takeover..]
        .iter()
        .filter(|r| r.user.as_deref() == Some(old))
        .filter(|r| matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .filter(|r| r.resource != "leases")
        .map(RequestRecord::rbac_key)
        .collect();
    assert!(
        late.is_empty(),
        "the old leader wrote after the takeover: {late:?}"
    );
    assert!(
        record[..takeover]
            .iter()
            .any(|r| r.user.as_deref() == Some(old) && r.subresource.as_deref() == Some("status")),
        "the old leader did write statuses while it led"
    );
    assert_eq!(
        metric(old_port, "mailpoll_reconciles_total").await,
        reconciles,
        "the old leader reconciles no more"
    );
    cluster.assert_polls_on_schedule().await;
}

fn signal(replica: &Replica, signal: &str) {
    let pid = replica.child.id().expect("the replica runs");
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {}", replica.name);
}
