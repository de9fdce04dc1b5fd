//! Arrival → webhook latency with Graph change notifications (interval 5 m) against polling
//! every 30 s, and the Graph requests an idle mailbox costs per hour in both modes. The
//! operator runs in-process against the Graph emulator (which sends the notifications) and
//! the Kubernetes API emulator, on real Postgres.
//!
//! ```text
//! cargo bench --bench notifications                 # 40 messages with notifications, 30 polling
//! MAILPOLL_BIG=1 cargo bench --bench notifications  # 200 and 90
//! ```
//!
//! Latency is the message's `webhook_delivered_at` (when the operator recorded the receiver's
//! 2xx) minus the moment the emulator received the message. Uses the Postgres of
//! `DATABASE_URL` when set, else starts a private throwaway server.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use kube::Api;
use kube::api::PostParams;
use mailpoll::delivery::egress::{EgressGuard, EgressPolicy};
use mailpoll::operator::{self, KubeSource, OperatorConfig};
use mailpoll::resource::MailboxPoll;
use mailpoll_testkit::bench::BenchPostgres;
use mailpoll_testkit::cluster;
use mailpoll_testkit::graph::subscriptions::LifecycleEvent;
use mailpoll_testkit::graph::{DEFAULT_CLIENT_SECRET, EmulatorConfig, GraphEmulator};
use mailpoll_testkit::kube::KubeEmulator;
use mailpoll_testkit::pg::{TestDatabase, free_port};
use mailpoll_testkit::webhook_receiver::WebhookReceiver;
use mailpoll_testkit::{Patience, try_wait_for};
use rand::{RngExt, SeedableRng};
use serde_json::json;
use uuid::Uuid;

const MAILBOX: &str = "support@contoso.com";

/// One way of running a MailboxPoll.
struct Mode {
    name: &'static str,
    interval: &'static str,
    interval_seconds: f64,
    notifications: bool,
    messages: usize,
    /// Arrivals are spread uniformly at random over gaps up to this long.
    max_gap: Duration,
}

struct Figures {
    latencies: Vec<f64>,
    /// Graph requests of one idle poll round.
    idle_round_requests: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn finished_rounds(pool: &sqlx::PgPool, uid: Uuid) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM polls WHERE mailbox_uid = $1 AND finished_at IS NOT NULL",
    )
    .bind(uid)
    .fetch_one(pool)
    .await?)
}

async fn run(server: &BenchPostgres, mode: &Mode) -> anyhow::Result<Figures> {
    let db = TestDatabase::create_on(server.admin_url()).await?;
    let kube = KubeEmulator::start().await?;
    let client = kube.client()?;
    cluster::install_crd(&client).await?;
    let namespace = "bench";
    cluster::create_namespace(&client, namespace).await?;
    cluster::create_credentials(&client, namespace, "graph", DEFAULT_CLIENT_SECRET).await?;
    let graph = GraphEmulator::start(EmulatorConfig {
        mailboxes: vec![MAILBOX.into()],
        ..EmulatorConfig::default()
    })
    .await?;
    let receiver = WebhookReceiver::start(None).await?;
    let port = free_port()?;
    let mut config = OperatorConfig::new(
        db.url.clone(),
        format!("127.0.0.1:{port}").parse()?,
        KubeSource::Config(Box::new(kube.config()?)),
    );
    config.webhook_egress = EgressGuard::new(EgressPolicy::allowing_loopback());
    config.lease_namespace = namespace.into();
    config.graph_authority_url = graph.base_url();
    config.graph_url = graph.base_url();
    config.notifications.public_url =
        Some(format!("http://127.0.0.1:{port}/notifications").parse()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(operator::run(config, async move {
        let _ = stopped.await;
    }));

    let mut poll = cluster::mailbox_poll("support", MAILBOX, mode.interval, "graph");
    poll.spec.notifications = Some(mailpoll::resource::Notifications {
        enabled: mode.notifications,
    });
    poll.spec.delivery = Some(serde_json::from_value(
        json!({"webhook": {"url": receiver.url()}}),
    )?);
    let api: Api<MailboxPoll> = Api::namespaced(client.clone(), namespace);
    let created = api.create(&PostParams::default(), &poll).await?;
    let uid = Uuid::parse_str(&created.metadata.uid.context("uid")?)?;
    try_wait_for("the first poll", Duration::from_secs(60), || async {
        (finished_rounds(&db.pool, uid).await.ok()? >= 1).then_some(())
    })
    .await?;
    if mode.notifications {
        try_wait_for("the subscription", Duration::from_secs(60), || async {
            (!graph.subscriptions().is_empty()).then_some(())
        })
        .await?;
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut arrivals: HashMap<String, DateTime<Utc>> = HashMap::new();
    for _ in 0..mode.messages {
        let gap = rng.random_range(0.0..mode.max_gap.as_secs_f64());
        tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        let at = Utc::now();
        let ids = graph.add_messages(MAILBOX, "inbox", 1)?;
        for id in ids {
            arrivals.insert(id.immutable_id, at);
        }
    }
    let patience = Patience::from(Duration::from_secs_f64(mode.interval_seconds * 2.0 + 60.0));
    try_wait_for("every message delivered", patience, || async {
        (receiver.successes().len() == mode.messages).then_some(())
    })
    .await?;
    let delivered: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT message_id, webhook_delivered_at FROM messages
         WHERE webhook_delivered_at IS NOT NULL",
    )
    .fetch_all(&db.pool)
    .await?;
    let mut latencies: Vec<f64> = delivered
        .iter()
        .filter_map(|(id, at)| Some((*at - *arrivals.get(id)?).as_seconds_f64()))
        .collect();
    latencies.sort_by(f64::total_cmp);

    // One idle round: no mail; its requests are what every scheduled round of an idle
    // mailbox costs.
    graph.reset_counters();
    let before = finished_rounds(&db.pool, uid).await?;
    if mode.notifications {
        // The schedule is 5 minutes away: a `missed` lifecycle event forces one round now.
        let id = graph
            .subscriptions()
            .first()
            .map(|s| s.id.clone())
            .context("a subscription")?;
        graph.lifecycle_event(&id, LifecycleEvent::Missed);
    }
    let wait = Duration::from_secs_f64(mode.interval_seconds.min(60.0) + 30.0);
    try_wait_for("an idle round", wait, || async {
        (finished_rounds(&db.pool, uid).await.ok()? > before).then_some(())
    })
    .await?;
    let idle_round_requests = graph.counters().requests(MAILBOX) as f64;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(20), operator).await;
    Ok(Figures {
        latencies,
        idle_round_requests,
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    mailpoll::install_crypto_provider();
    let big = std::env::var_os("MAILPOLL_BIG").is_some();
    let server = BenchPostgres::start().await?;
    let lifetime_hours = mailpoll::notifications::NotificationSettings::default()
        .lifetime
        .as_secs_f64()
        / 3600.0;
    let modes = [
        Mode {
            name: "notifications, interval 5m",
            interval: "5m",
            interval_seconds: 300.0,
            notifications: true,
            messages: if big { 200 } else { 40 },
            max_gap: Duration::from_millis(1500),
        },
        Mode {
            name: "polling, interval 30s",
            interval: "30s",
            interval_seconds: 30.0,
            notifications: false,
            messages: if big { 90 } else { 30 },
            max_gap: Duration::from_secs(6),
        },
    ];
    println!("mode | messages | p50 s | p99 s | max s | Graph requests/hour, idle mailbox");
    for mode in &modes {
        let figures = run(&server, mode).await?;
        let sorted = &figures.latencies;
        let mut per_hour = figures.idle_round_requests * 3600.0 / mode.interval_seconds;
        if mode.notifications {
            // One renewal per half lifetime.
            per_hour += 1.0 / (lifetime_hours / 2.0);
        }
        println!(
            "{} | {} | {:.2} | {:.2} | {:.2} | {:.1}",
            mode.name,
            sorted.len(),
            percentile(sorted, 0.50),
            percentile(sorted, 0.99),
            sorted.last().copied().unwrap_or(f64::NAN),
            per_hour,
        );
    }
    Ok(())
}
