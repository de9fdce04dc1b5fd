//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics: a holder
//! renews every `retry_period`; anyone may take over a record that has not changed for
//! `lease_duration` by its own clock (so clock skew between nodes does not matter); a holder
//! that has not renewed within `renew_deadline` (an error, a timeout, a lost race) stops
//! acting as leader at once, before anyone else can take over.
//!
//! Written against the Lease API directly rather than through a lease crate because the renew
//! deadline needs to see every renewal's outcome, which the available crates do not expose.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Settings of one elector.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per process: pod name plus a per-process id.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaderConfig {
    pub fn new(
        lease_name: impl Into<String>,
        namespace: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            lease_name: lease_name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What the last look at the Lease showed, and when (by our monotonic clock).
#[derive(Debug, Clone, PartialEq)]
struct Observation {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    seen_at: Instant,
}

/// The outcome of one try to acquire or renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// We hold the Lease, renewed just now.
    Held,
    /// Someone else holds a live Lease.
    Other,
}

/// Runs the election until `stop`; the receiver says whether this process leads right now.
/// On stop, a held Lease is released so a successor does not wait for it to expire.
pub fn spawn(
    client: kube::Client,
    config: LeaderConfig,
    stop: CancellationToken,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let handle = tokio::spawn(run(
        Api::namespaced(client, &config.namespace),
        config,
        tx,
        stop,
    ));
    (rx, handle)
}

async fn run(
    api: Api<Lease>,
    config: LeaderConfig,
    leading: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let mut observed: Option<Observation> = None;
    // When the Lease we hold was last renewed (by our monotonic clock).
    let mut renewed_at: Option<Instant> = None;
    loop {
        // A renewal that has not answered by the renew deadline of the last one is a failed
        // one: counting the deadline from the last renewal, not from this try, keeps the
        // step-down within `renew_deadline` of it, well inside the lease duration others wait.
        let deadline = renewed_at.map_or_else(
            || Instant::now() + config.renew_deadline,
            |renewed| renewed + config.renew_deadline,
        );
        let attempt =
            tokio::time::timeout_at(deadline, try_acquire_or_renew(&api, &config, &mut observed))
                .await;
        renewed_at = match attempt {
            Ok(Ok(Attempt::Held)) => Some(Instant::now()),
            Ok(Ok(Attempt::Other)) => None,
            Ok(Err(error)) => {
                // Any error renewing means we cannot prove we still lead.
                tracing::warn!(lease = %config.lease_name, error = %error, "leader election: lease update failed");
                None
            }
            Err(_) => {
                tracing::warn!(lease = %config.lease_name, "leader election: lease update timed out");
                None
            }
        };
        set(&leading, renewed_at.is_some(), &config);
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(config.retry_period) => {}
        }
    }
    if *leading.borrow() {
        set(&leading, false, &config);
        if let Err(error) = release(&api, &config).await {
            tracing::warn!(lease = %config.lease_name, %error, "could not release the lease; a successor waits for it to expire");
        } else {
            tracing::info!(lease = %config.lease_name, "released leadership");
        }
    }
}

fn set(leading: &watch::Sender<bool>, value: bool, config: &LeaderConfig) {
    leading.send_if_modified(|current| {
        if *current == value {
            return false;
        }
        *current = value;
        if value {
            tracing::info!(lease = %config.lease_name, identity = %config.identity, "became leader");
        } else {
            tracing::info!(lease = %config.lease_name, identity = %config.identity, "not leader");
        }
        true
    });
}

/// Creates the Lease held by us; losing the race to another creator is not an error.
async fn create(
    api: &Api<Lease>,
    config: &LeaderConfig,
    now: Timestamp,
) -> Result<Attempt, kube::Error> {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(config.lease_name.clone()),
            namespace: Some(config.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(held_spec(config, now, Hold::Created)),
    };
    match api.create(&PostParams::default(), &lease).await {
        Ok(_) => Ok(Attempt::Held),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Other),
        Err(error) => Err(error),
    }
}

/// Records what the Lease says now; returns since when (on our own clock) its holder and
/// renew time have stayed as they are. Expiry is judged by that, never by the renew time
/// another host's clock wrote.
fn observe(observed: &mut Option<Observation>, spec: &LeaseSpec) -> Instant {
    let current = Observation {
        holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
        renew_time: spec.renew_time.as_ref().map(|t| t.0),
        seen_at: Instant::now(),
    };
    match observed {
        Some(previous)
            if previous.holder == current.holder && previous.renew_time == current.renew_time =>
        {
            previous.seen_at
        }
        _ => {
            let since = current.seen_at;
            *observed = Some(current);
            since
        }
    }
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaderConfig,
    observed: &mut Option<Observation>,
) -> Result<Attempt, kube::Error> {
    let now = Timestamp::now();
    let Some(mut lease) = api.get_opt(&config.lease_name).await? else {
        return create(api, config, now).await;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let unchanged_since = observe(observed, &spec);
    let duration = spec
        .lease_duration_seconds
        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
        .unwrap_or(config.lease_duration);
    let ours = holder.as_deref() == Some(config.identity.as_str());
    let expired = holder.is_none() || unchanged_since.elapsed() >= duration;
    if !ours && !expired {
        return Ok(Attempt::Other);
    }
    let hold = if ours {
        Hold::Renewed(&spec)
    } else {
        Hold::TakenOver(&spec)
    };
    lease.spec = Some(held_spec(config, now, hold));
    match api
        .replace(&config.lease_name, &PostParams::default(), &lease)
        .await
    {
        Ok(updated) => {
            let spec = updated.spec.unwrap_or_default();
            *observed = Some(Observation {
                holder: spec.holder_identity,
                renew_time: spec.renew_time.map(|t| t.0),
                seen_at: Instant::now(),
            });
            Ok(Attempt::Held)
        }
        // Someone else wrote the Lease since we read it: they won this round.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Other),
        Err(error) => Err(error),
    }
}

/// How we came to hold a Lease.
enum Hold<'a> {
    /// A new Lease.
    Created,
    /// Our own, renewed: acquire time and transitions stay.
    Renewed(&'a LeaseSpec),
    /// Someone else's expired or released Lease.
    TakenOver(&'a LeaseSpec),
}

/// The spec of a Lease we hold.
fn held_spec(config: &LeaderConfig, now: Timestamp, hold: Hold<'_>) -> LeaseSpec {
    let (acquire_time, transitions) = match hold {
        Hold::Created => (MicroTime(now), 0),
        Hold::Renewed(previous) => (
            previous.acquire_time.clone().unwrap_or(MicroTime(now)),
            previous.lease_transitions.unwrap_or(0),
        ),
        Hold::TakenOver(previous) => (MicroTime(now), previous.lease_transitions.unwrap_or(0) + 1),
    };
    LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(
            i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX),
        ),
        acquire_time: Some(acquire_time),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// Gives the Lease up (as client-go does: no holder, one-second duration).
async fn release(api: &Api<Lease>, config: &LeaderConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&config.lease_name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(&config.lease_name, &PostParams::default(), &lease)
        .await?;
    Ok(())
}
