//! End to end, with real processes: the `mailpoll` binary as two operator replicas, kubectl,
//! a throwaway Postgres, and the Graph and Kubernetes API emulators (the sandbox of README's
//! main command). Mail must flow from Graph to the webhook exactly once whatever happens:
//! replicas killed with SIGKILL, Postgres restarted, Graph throttling and failing, a delta
//! token expiring.
//!
//! The chaos test is small by default; `MAILPOLL_BIG=1` runs the big mode (20 mailboxes,
//! 50,000 messages) and prints its figures.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mailpoll::delivery::signing::message_key;
use mailpoll_testkit::graph::{DEFAULT_CLIENT_SECRET, Faults};
use mailpoll_testkit::sandbox::{
    self, EXAMPLES_AUTHORIZATION, EXAMPLES_SIGNING_SECRET, EXAMPLES_URL_CREDENTIAL,
    EXAMPLES_WEBHOOK_BASE, Sandbox, SandboxOptions,
};
use mailpoll_testkit::{Patience, wait_for_ok};
use rand::RngExt;
use serde_json::Value;
use uuid::Uuid;

/// Access tokens of the Graph emulator all start like this (a JWT header).
const TOKEN_PREFIX: &str = "eyJ0eXAiOiJKV1Qi";

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn big_mode() -> bool {
    std::env::var("MAILPOLL_BIG").is_ok_and(|v| v == "1")
}

/// Short leases so a killed replica's work moves on within seconds.
fn options(mailboxes: Vec<String>) -> SandboxOptions {
    let mut options = SandboxOptions::new(env!("CARGO_BIN_EXE_mailpoll"));
    options.mailboxes = mailboxes;
    options.lease_seconds = 4.0;
    options.task_lease_seconds = 6.0;
    options.log_format = "json".into();
    options.log_level = "debug,hyper=info,h2=info,rustls=info,tower=info".into();
    options
}

async fn start(options: SandboxOptions) -> Sandbox {
    mailpoll::install_crypto_provider();
    Sandbox::start(options)
        .await
        .unwrap_or_else(|e| panic!("sandbox did not start: {e:#}"))
}

/// The checks here run kubectl and database queries: look four times a second.
fn patience(limit: Duration) -> Patience {
    Patience::new(limit).every(Duration::from_millis(250))
}

/// A ledger row: message id, delivery state, and the ledger identity its key is made from.
type Row = (String, String, Uuid);

/// Ledger rows per MailboxPoll uid (through the ledger identities), real messages only.
async fn ledger(sandbox: &Sandbox) -> Result<BTreeMap<Uuid, Vec<Row>>, String> {
    let rows: Vec<(Uuid, Uuid, String, String)> = sqlx::query_as(
        "SELECT COALESCE(i.uid, m.mailbox_uid), m.mailbox_uid, m.message_id, m.delivery_state
           FROM messages m LEFT JOIN mailbox_identities i ON i.identity = m.mailbox_uid
          WHERE m.received_at IS NOT NULL",
    )
    .fetch_all(sandbox.pool())
    .await
    .map_err(|e| format!("ledger query: {e}"))?;
    let mut by_uid: BTreeMap<Uuid, Vec<Row>> = BTreeMap::new();
    for (uid, ledger_id, id, state) in rows {
        by_uid.entry(uid).or_default().push((id, state, ledger_id));
    }
    Ok(by_uid)
}

/// MailboxPolls as `kubectl get mbp -A -o json` shows them, by uid.
async fn mailbox_polls(sandbox: &Sandbox) -> Result<BTreeMap<Uuid, Value>, String> {
    let output = sandbox
        .kubectl(&["get", "mbp", "-A", "-o", "json"])
        .await
        .map_err(|e| format!("{e:#}"))?;
    if !output.success {
        return Err(output.stderr);
    }
    let list: Value = serde_json::from_str(&output.stdout).map_err(|e| e.to_string())?;
    let mut by_uid = BTreeMap::new();
    for item in list["items"].as_array().cloned().unwrap_or_default() {
        let uid = item["metadata"]["uid"]
            .as_str()
            .and_then(|u| u.parse().ok())
            .ok_or("a MailboxPoll without uid")?;
        by_uid.insert(uid, item);
    }
    Ok(by_uid)
}

/// Waits until each MailboxPoll's status counts equal the ledger's.
async fn status_matches_ledger(sandbox: &Sandbox, limit: Duration) {
    wait_for_ok("status counts to equal the ledger", patience(limit), || async {
        let ledger = ledger(sandbox).await?;
        for (uid, mbp) in mailbox_polls(sandbox).await? {
            let rows = ledger.get(&uid).map(Vec::as_slice).unwrap_or_default();
            let delivered = rows
                .iter()
                .filter(|(_, s, _)| s == "delivered" || s == "none")
                .count() as i64;
            let pending = rows.iter().filter(|(_, s, _)| s == "pending").count() as i64;
            let status = &mbp["status"];
            let shown_delivered = status["messagesDelivered"].as_i64().unwrap_or(0);
            let shown_pending = status["messagesPending"].as_i64().unwrap_or(0);
            if (shown_delivered, shown_pending) != (delivered, pending) {
                return Err(format!(
                    "{}: status delivered/pending {shown_delivered}/{shown_pending}, ledger {delivered}/{pending}",
                    mbp["metadata"]["name"]
                ));
            }
        }
        Ok(())
    })
    .await;
}

/// Every ledger message delivered, the receiver saw exactly the ledger's keys, and no key
/// succeeded more than once beyond `allowed_repeats` (repeats can only come from a crash
/// between a webhook's success and its recording; they carry the same key).
async fn assert_delivered_once(sandbox: &Sandbox, allowed_repeats: u64) -> (usize, u64) {
    let ledger = ledger(sandbox).await.expect("ledger");
    let mut expected = HashMap::new();
    for (uid, rows) in &ledger {
        for (id, state, ledger_id) in rows {
            assert_eq!(state, "delivered", "message {id} of {uid} is {state}");
            assert!(
                expected.insert(message_key(*ledger_id, id), ()).is_none(),
                "two ledger rows with one key"
            );
        }
    }
    let successes = sandbox.receiver.successes();
    for key in expected.keys() {
        assert!(
            successes.contains_key(key),
            "ledger key {key} never reached the webhook"
        );
    }
    for key in successes.keys() {
        assert!(
            expected.contains_key(key),
            "the webhook got key {key} that the ledger does not hold"
        );
    }
    let repeats: u64 = successes.values().map(|n| u64::from(n - 1)).sum();
    assert!(
        repeats <= allowed_repeats,
        "{repeats} repeated webhook successes, at most {allowed_repeats} allowed"
    );
    assert_eq!(sandbox.receiver.bad_signatures(), 0, "every request signed");
    (expected.len(), repeats)
}

/// The `jti` claim of a JWT.
fn jti_of(token: &str) -> String {
    use base64::Engine as _;
    token
        .split('.')
        .nth(1)
        .and_then(|claims| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(claims)
                .ok()
        })
        .and_then(|claims| serde_json::from_slice::<Value>(&claims).ok())
        .and_then(|claims| claims["jti"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The secrets of the certificate and workload identity kinds: the private key's PEM body
/// (every line of it), the start every signed client assertion shares (its header), and each
/// service account token the replicas' token file held.
fn credential_secrets(sandbox: &Sandbox) -> Vec<String> {
    use base64::Engine as _;
    let key_lines = mailpoll_testkit::credentials::APP_KEY_PEM
        .lines()
        .filter(|line| !line.starts_with("-----") && line.len() > 20)
        .map(str::to_owned);
    // `{"alg":"PS256",` is 15 bytes: its base64url is the first 20 characters of every
    // assertion mailpoll signs, whatever follows.
    let assertion_start =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"PS256","#);
    key_lines
        .chain([assertion_start])
        .chain(sandbox.federated_tokens())
        .collect()
}

/// support-inbox's deliveries carry the Authorization header of its headers Secret, and
/// billing-inbox's went to the URL of its URL Secret, credential included.
fn assert_webhook_secrets_were_sent(sandbox: &Sandbox) {
    let mut seen = BTreeMap::<String, usize>::new();
    for (key, payload) in sandbox.receiver.payloads() {
        let name = payload["mailboxPoll"]["name"].as_str().unwrap_or_default();
        match name {
            "support-inbox" => {
                let headers = sandbox.receiver.headers_of(&key).expect("delivered");
                assert_eq!(headers["authorization"], EXAMPLES_AUTHORIZATION, "{key}");
            }
            "billing-inbox" => assert_eq!(
                sandbox.receiver.query_of(&key).as_deref(),
                Some(EXAMPLES_URL_CREDENTIAL),
                "{key}"
            ),
            _ => continue,
        }
        *seen.entry(name.to_owned()).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both kinds delivered: {seen:?}");
}

/// The secret parts of the webhook Secrets in `examples/`.
const EXAMPLES_WEBHOOK_SECRETS: [&str; 2] = ["sandbox-token-change-me", "sandbox-sig-change-me"];

/// No log line holds a secret value or an access token; the logs are not empty.
fn assert_no_secrets_in_logs(sandbox: &Sandbox, extra: &[&str]) {
    let logs = sandbox.logs().expect("replica logs");
    let lines = logs.lines().count();
    assert!(lines > 50, "the replicas logged only {lines} lines");
    for secret in [DEFAULT_CLIENT_SECRET, EXAMPLES_SIGNING_SECRET, TOKEN_PREFIX]
        .iter()
        .chain(&EXAMPLES_WEBHOOK_SECRETS)
        .chain(extra)
    {
        if let Some(line) = logs.lines().find(|line| line.contains(secret)) {
            panic!("a log line holds a secret ({secret}): {line}");
        }
    }
}

async fn arrived_equals_recorded(sandbox: &Sandbox, mailboxes: &[String]) -> Result<(), String> {
    let progress = sandbox.progress().await.map_err(|e| format!("{e:#}"))?;
    let ledger = ledger(sandbox).await?;
    let arrived = sandbox.arrived();
    let total_recorded: usize = ledger.values().map(Vec::len).sum();
    let total_arrived: u64 = mailboxes.iter().map(|m| arrived[m]).sum();
    let undelivered = ledger
        .values()
        .flatten()
        .filter(|(_, s, _)| s != "delivered")
        .count();
    if total_recorded as u64 != total_arrived || undelivered > 0 {
        return Err(format!(
            "arrived {total_arrived}, recorded {total_recorded}, undelivered {undelivered}; {progress:?}"
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_deliver_every_message_once_and_status_matches_the_ledger() {
    let mailboxes = sandbox::mailboxes_in(&examples_dir()).expect("examples");
    let mut options = options(mailboxes.clone());
    // Tokens refreshed every few seconds and the service account token file replaced every
    // two: each kind fetches tokens again during the test, the federated one from a new file.
    options.graph_faults.token_lifetime_secs = 6;
    options.federated_token_rotation = Duration::from_secs(2);
    let sandbox = start(options).await;
    for mailbox in &mailboxes {
        sandbox.add_mail(mailbox, 20).expect("mail");
    }
    sandbox
        .apply_dir(&examples_dir())
        .await
        .expect("kubectl apply -f examples/");

    let active: Vec<String> = mailboxes
        .iter()
        .filter(|m| !m.starts_with("newsletter"))
        .cloned()
        .collect();
    wait_for_ok(
        "the first 20 messages of each active mailbox delivered",
        patience(Duration::from_secs(60)),
        || async { arrived_equals_recorded(&sandbox, &active).await },
    )
    .await;
    // support-inbox is woken by Graph change notifications: the leader subscribed for it.
    wait_for_ok(
        "support-inbox's change-notification subscription",
        patience(Duration::from_secs(60)),
        || async {
            let output = sandbox
                .kubectl(&[
                    "get",
                    "mbp",
                    "-n",
                    "mail",
                    "support-inbox",
                    "-o",
                    "jsonpath={.status.notifications.subscriptionId}",
                ])
                .await
                .map_err(|e| format!("{e:#}"))?;
            let id = output.stdout.trim().to_owned();
            if id.is_empty() {
                Err(output.stderr)
            } else {
                Ok(id)
            }
        },
    )
    .await;
    // More mail, then a forced poll of each active MailboxPoll instead of waiting a minute.
    for mailbox in &active {
        sandbox.add_mail(mailbox, 10).expect("mail");
    }
    // One MailboxPoll per credential kind: client secret (support, billing), certificate
    // (orders), workload identity (invoices).
    for name in [
        "support-inbox",
        "billing-inbox",
        "orders-inbox",
        "invoices-inbox",
    ] {
        annotate(&sandbox, name, "more-mail").await;
    }
    wait_for_ok(
        "all 30 messages of each active mailbox delivered",
        patience(Duration::from_secs(60)),
        || async { arrived_equals_recorded(&sandbox, &active).await },
    )
    .await;
    let (delivered, repeats) = assert_delivered_once(&sandbox, 0).await;
    assert_eq!(delivered, 30 * active.len());
    assert_eq!(active.len(), 4, "{active:?}");
    assert_eq!(repeats, 0);
    // Each kind proved itself to the token endpoint; the token file was read again after
    // the kubelet-like rotation (a fresh assertion per token request).
    let counters = sandbox.graph.counters();
    for kind in [
        "secret",
        "certificate:",
        "federated:system:serviceaccount:mailpoll-system:mailpoll",
    ] {
        assert!(
            counters
                .requests_by_credential
                .iter()
                .any(|(label, count)| label.starts_with(kind) && *count > 0),
            "Graph requests with a {kind} token: {:?}",
            counters.requests_by_credential
        );
    }
    // Forced polls of the workload identity MailboxPoll until a token fetched after its
    // first one came from a replaced token file (tokens live 6 s, the file changes every 2 s).
    let mut rotated_tokens_used = 0;
    for round in 0..40 {
        let accepted: HashSet<String> =
            sandbox.graph.counters().assertion_ids.into_iter().collect();
        rotated_tokens_used = sandbox
            .federated_tokens()
            .iter()
            .filter(|token| accepted.contains(&jti_of(token)))
            .count();
        if rotated_tokens_used >= 2 {
            break;
        }
        annotate(
            &sandbox,
            "invoices-inbox",
            &format!("token-rotation-{round}"),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        rotated_tokens_used >= 2,
        "the replicas read the rotated token file: {rotated_tokens_used} tokens used"
    );
    // The suspended MailboxPoll never polled.
    assert!(
        sandbox
            .progress()
            .await
            .expect("progress")
            .iter()
            .all(|p| p.name != "newsletter-inbox"),
        "the suspended MailboxPoll polled"
    );
    // Mark as read and move: billing's inbox is empty, its archive holds every message.
    let archived = sandbox.arrived()["billing@contoso.com"] as usize;
    wait_for_ok(
        "billing's messages moved to the archive",
        patience(Duration::from_secs(30)),
        || async {
            let inbox = sandbox
                .graph
                .folder_len("billing@contoso.com", "inbox")
                .map_err(|e| e.to_string())?;
            let archive = sandbox
                .graph
                .folder_len("billing@contoso.com", "archive")
                .map_err(|e| e.to_string())?;
            (inbox == 0 && archive == archived)
                .then_some(())
                .ok_or(format!("inbox {inbox}, archive {archive}"))
        },
    )
    .await;
    status_matches_ledger(&sandbox, Duration::from_secs(60)).await;
    assert_webhook_secrets_were_sent(&sandbox);

    let table = sandbox
        .kubectl(&["get", "mbp", "-n", "mail"])
        .await
        .expect("kubectl get");
    assert!(table.success, "{}", table.stderr);
    for name in [
        "support-inbox",
        "billing-inbox",
        "newsletter-inbox",
        "orders-inbox",
        "invoices-inbox",
    ] {
        assert!(
            table.stdout.contains(name),
            "kubectl get mbp lists {name}: {}",
            table.stdout
        );
    }
    let describe = sandbox
        .kubectl(&["describe", "mbp", "-n", "mail", "support-inbox"])
        .await
        .expect("kubectl describe");
    assert!(describe.success, "{}", describe.stderr);
    let credential_secrets = credential_secrets(&sandbox);
    let credential_secrets: Vec<&str> = credential_secrets.iter().map(String::as_str).collect();
    assert_no_secrets_in_logs(&sandbox, &credential_secrets);
    let statuses = sandbox
        .kubectl(&["get", "mbp", "-n", "mail", "-o", "yaml"])
        .await
        .expect("kubectl get -o yaml");
    let events = sandbox
        .kubectl(&["get", "events", "-n", "mail", "-o", "yaml"])
        .await
        .expect("kubectl get events");
    for text in [
        &table.stdout,
        &describe.stdout,
        &statuses.stdout,
        &events.stdout,
    ] {
        for secret in [DEFAULT_CLIENT_SECRET, EXAMPLES_SIGNING_SECRET]
            .iter()
            .chain(&EXAMPLES_WEBHOOK_SECRETS)
            .chain(&credential_secrets)
        {
            assert!(!text.contains(secret), "{secret} in kubectl output: {text}");
        }
    }
    sandbox.shutdown().await.expect("graceful stop");
}

/// Served forced-poll requests of `uid` with annotation value `value`.
async fn polls_for(sandbox: &Sandbox, uid: Uuid, value: &str) -> Result<i64, String> {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM poll_requests
          WHERE mailbox_uid = $1 AND value = $2 AND served_at IS NOT NULL",
    )
    .bind(uid)
    .bind(value)
    .fetch_one(sandbox.pool())
    .await
    .map_err(|e| e.to_string())
}

/// Waits until the request with annotation value `value` was served, exactly once.
async fn served_once(sandbox: &Sandbox, uid: Uuid, value: &str, limit: Duration) {
    wait_for_ok(
        format!("one poll for value {value:?}"),
        patience(limit),
        || async {
            let n = polls_for(sandbox, uid, value).await?;
            (n == 1).then_some(()).ok_or(format!("{n} polls"))
        },
    )
    .await;
}

/// `kubectl annotate --overwrite` of the force-poll annotation of MailboxPoll `mail/name`.
async fn annotate(sandbox: &Sandbox, name: &str, value: &str) {
    let annotation = format!("mailpoll.dev/poll-requested-at={value}");
    let output = sandbox
        .kubectl(&[
            "annotate",
            "mbp",
            "-n",
            "mail",
            name,
            &annotation,
            "--overwrite",
        ])
        .await
        .expect("kubectl annotate");
    assert!(output.success, "kubectl annotate: {}", output.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotate_forces_exactly_one_poll_per_value_across_a_leader_kill() {
    let mailboxes = sandbox::mailboxes_in(&examples_dir()).expect("examples");
    let mut sandbox = start(options(mailboxes.clone())).await;
    sandbox
        .apply_dir(&examples_dir())
        .await
        .expect("apply examples");
    let uid: Uuid = wait_for_ok(
        "the suspended MailboxPoll",
        patience(Duration::from_secs(30)),
        || async {
            let polls = mailbox_polls(&sandbox).await?;
            polls
                .into_iter()
                .find(|(_, mbp)| mbp["metadata"]["name"] == "newsletter-inbox")
                .map(|(uid, _)| uid)
                .ok_or_else(|| "not listed".to_string())
        },
    )
    .await;
    sandbox.add_mail("newsletter@contoso.com", 3).expect("mail");
    annotate(&sandbox, "newsletter-inbox", "first").await;
    served_once(&sandbox, uid, "first", Duration::from_secs(30)).await;
    // The same value again (another annotate, and an unrelated label change) polls no more.
    annotate(&sandbox, "newsletter-inbox", "first").await;
    let labelled = sandbox
        .kubectl(&[
            "label",
            "mbp",
            "-n",
            "mail",
            "newsletter-inbox",
            "team=marketing",
        ])
        .await
        .expect("kubectl label");
    assert!(labelled.success, "{}", labelled.stderr);

    // A new value, and the leader killed at once: the request survives the handover.
    let leader = sandbox
        .kubectl(&[
            "get",
            "lease",
            "-n",
            sandbox::OPERATOR_NAMESPACE,
            "mailpoll-leader",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .await
        .expect("kubectl get lease");
    annotate(&sandbox, "newsletter-inbox", "second").await;
    let leader_index = (0..sandbox.replica_count())
        .find(|&i| leader.stdout.starts_with(sandbox.replica_name(i)))
        .unwrap_or_else(|| panic!("leader {:?} is not a replica", leader.stdout));
    sandbox
        .kill_replica(leader_index)
        .await
        .expect("kill -9 the leader");
    served_once(&sandbox, uid, "second", Duration::from_secs(60)).await;
    sandbox
        .start_replica(leader_index)
        .expect("restart the replica");
    sandbox
        .wait_ready(leader_index, Duration::from_secs(60))
        .await
        .expect("ready");
    annotate(&sandbox, "newsletter-inbox", "third").await;
    served_once(&sandbox, uid, "third", Duration::from_secs(30)).await;
    // The barrier for a late poll (a task of the killed leader run again, a scheduled poll of
    // this suspended MailboxPoll): one more value. One poll task is live per MailboxPoll at a
    // time, so a poll still to come either ran before this value's poll, and is counted
    // below, or is the poll that serves it.
    annotate(&sandbox, "newsletter-inbox", "fourth").await;
    served_once(&sandbox, uid, "fourth", Duration::from_secs(30)).await;
    // Its task ends with its round, and nothing follows it: suspended, nothing is scheduled.
    wait_for_ok(
        "the forced poll's task to end, with nothing scheduled after it",
        patience(Duration::from_secs(30)),
        || async {
            let live: Vec<String> = sqlx::query_scalar(
                "SELECT state || ' due ' || run_at::text FROM tasks
                  WHERE kind = 'poll' AND owner_uid = $1 AND state IN ('pending', 'running')",
            )
            .bind(uid)
            .fetch_all(sandbox.pool())
            .await
            .map_err(|e| e.to_string())?;
            live.is_empty()
                .then_some(())
                .ok_or(format!("live poll tasks: {live:?}"))
        },
    )
    .await;
    // Everything this suspended MailboxPoll ever polled.
    let served: Vec<String> = sqlx::query_scalar(
        "SELECT value FROM poll_requests WHERE mailbox_uid = $1 ORDER BY served_at",
    )
    .bind(uid)
    .fetch_all(sandbox.pool())
    .await
    .expect("poll requests");
    assert_eq!(
        served,
        ["first", "second", "third", "fourth"],
        "one request per value"
    );
    // A round cut short by the kill (the killed replica may have been running the forced
    // poll) leaves its row unfinished; its task ran again elsewhere and served the request.
    let polls: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT poll_request FROM polls
          WHERE mailbox_uid = $1 AND finished_at IS NOT NULL ORDER BY started_at",
    )
    .bind(uid)
    .fetch_all(sandbox.pool())
    .await
    .expect("polls");
    assert_eq!(
        polls,
        [Some("first"), Some("second"), Some("third"), Some("fourth")].map(|v| v.map(String::from)),
        "a suspended MailboxPoll polls once per annotation value and never on schedule"
    );
    let cut_short: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM polls WHERE mailbox_uid = $1 AND finished_at IS NULL",
    )
    .bind(uid)
    .fetch_one(sandbox.pool())
    .await
    .expect("unfinished polls");
    assert!(
        cut_short <= 1,
        "only the killed replica's round is unfinished: {cut_short}"
    );
    wait_for_ok(
        "status names the last handled request",
        patience(Duration::from_secs(30)),
        || async {
            let polls = mailbox_polls(&sandbox).await?;
            let status = &polls[&uid]["status"];
            (status["lastHandledPollRequest"] == "fourth")
                .then_some(())
                .ok_or(status.to_string())
        },
    )
    .await;
    assert_eq!(
        ledger(&sandbox)
            .await
            .expect("ledger")
            .get(&uid)
            .map(Vec::len),
        Some(3),
        "the forced polls recorded the newsletter's mail"
    );
    sandbox.shutdown().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_mailbox_polls_are_rejected_and_a_wrong_secret_is_explained() {
    let sandbox = start(options(vec!["support@contoso.com".into()])).await;
    let examples = examples_dir();
    for file in ["00-namespace.yaml", "10-secrets.yaml"] {
        let text = std::fs::read_to_string(examples.join(file)).expect("example");
        sandbox.apply(&text).await.expect("apply");
    }
    let invalid = |spec: &str| {
        format!(
            "apiVersion: mailpoll.dev/v1alpha1\nkind: MailboxPoll\nmetadata:\n  name: invalid\n  namespace: mail\nspec:\n{spec}"
        )
    };
    let cases = [
        (
            "  mailbox: ''\n  credentialsSecretRef: {name: graph-credentials}\n",
            "spec.mailbox must not be empty",
        ),
        (
            "  mailbox: a@contoso.com\n  interval: 5s\n  credentialsSecretRef: {name: graph-credentials}\n",
            "spec.interval must be between 10s and 24h",
        ),
        (
            "  mailbox: a@contoso.com\n  interval: soon\n  credentialsSecretRef: {name: graph-credentials}\n",
            "spec.interval must be a duration",
        ),
        (
            "  mailbox: a@contoso.com\n  credentialsSecretRef: {name: graph-credentials}\n  delivery:\n    webhook:\n      url: http://tickets.example.com/hook\n",
            "spec.delivery.webhook.url must be an https:// URL",
        ),
        (
            "  mailbox: a@contoso.com\n  maxAttempts: 0\n  credentialsSecretRef: {name: graph-credentials}\n",
            "spec.maxAttempts must be between 1 and 100",
        ),
        ("  mailbox: a@contoso.com\n", "credentialsSecretRef"),
        // Past the schema, refused by the first replica's admission webhook.
        (
            "  mailbox: a@contoso.com\n  credentialsSecretRef: {name: graph-credentials}\n  filter: mesage.isRead\n",
            "The MailboxPoll \"invalid\" is invalid: spec.filter: ",
        ),
    ];
    for (spec, message) in cases {
        let error = sandbox
            .apply(&invalid(spec))
            .await
            .expect_err("kubectl apply must refuse an invalid MailboxPoll");
        let text = format!("{error:#}");
        assert!(
            text.contains(message),
            "kubectl's error names the problem ({message}): {text}"
        );
    }
    let listed = sandbox
        .kubectl(&["get", "mbp", "-n", "mail", "-o", "name"])
        .await
        .expect("get");
    assert_eq!(listed.stdout.trim(), "", "nothing invalid was stored");

    // Valid, but its Secret holds a wrong client secret: a condition and an Event say so.
    let wrong_secret = "wrong-secret-value-9f3k";
    sandbox
        .apply(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: wrong-credentials\n  namespace: mail\nstringData:\n  tenantId: 11111111-2222-3333-4444-555555555555\n  clientId: aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee\n  clientSecret: {wrong_secret}\n---\napiVersion: mailpoll.dev/v1alpha1\nkind: MailboxPoll\nmetadata:\n  name: wrong-secret\n  namespace: mail\nspec:\n  mailbox: support@contoso.com\n  credentialsSecretRef:\n    name: wrong-credentials\n  delivery:\n    webhook:\n      url: {EXAMPLES_WEBHOOK_BASE}/hook\n"
        ))
        .await
        .expect("apply a MailboxPoll with wrong credentials");
    let describe = wait_for_ok(
        "describe to show the failure",
        patience(Duration::from_secs(60)),
        || async {
            let output = sandbox
                .kubectl(&["describe", "mbp", "-n", "mail", "wrong-secret"])
                .await
                .map_err(|e| format!("{e:#}"))?;
            let text = output.stdout;
            // The condition, the Stalled condition and the Event all say AuthenticationFailed.
            (text.matches("AuthenticationFailed").count() >= 3 && text.contains("Stalled"))
                .then_some(text.clone())
                .ok_or(text)
        },
    )
    .await;
    assert!(
        !describe.contains(wrong_secret),
        "no secret in describe: {describe}"
    );
    let condition = sandbox
        .kubectl(&[
            "get",
            "mbp",
            "-n",
            "mail",
            "wrong-secret",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}",
        ])
        .await
        .expect("kubectl get");
    assert_eq!(condition.stdout.trim(), "AuthenticationFailed");
    let events = sandbox
        .kubectl(&["get", "events", "-n", "mail"])
        .await
        .expect("events");
    assert!(
        events.stdout.contains("AuthenticationFailed"),
        "the Event has Graph's reason: {}",
        events.stdout
    );
    assert!(!events.stdout.contains(wrong_secret));
    assert_no_secrets_in_logs(&sandbox, &[wrong_secret]);
    sandbox.shutdown().await.expect("graceful stop");
}

/// A MailboxPoll manifest for the chaos test; every fourth also marks read and moves.
/// Requests that may still arrive inside a Retry-After: already on their way when the 429 left,
/// or sent before the announcement reached the other replica (loopback, two busy cores).
const RETRY_AFTER_GRACE: Duration = Duration::from_millis(300);

/// Deliver tasks running now on the replica named `replica` (on any, with `None`), with the
/// worker holding each.
async fn running_deliveries(sandbox: &Sandbox, replica: Option<&str>) -> Vec<(i64, String)> {
    let pattern = replica.map_or_else(|| "%".to_owned(), |name| format!("{name}/%"));
    // Retried: right after the Postgres restart the pool's first connection may be a dead one.
    wait_for_ok(
        "running deliveries",
        patience(Duration::from_secs(30)),
        || async {
            sqlx::query_as(
                "SELECT id, locked_by FROM tasks
             WHERE kind = 'deliver' AND state = 'running' AND locked_by LIKE $1",
            )
            .bind(&pattern)
            .fetch_all(sandbox.pool())
            .await
            .map_err(|e| e.to_string())
        },
    )
    .await
}

/// What holds up the messages still undelivered: per MailboxPoll, where its pending messages
/// stand, its live and latest tasks, its Graph slots and throttle. Printed while a wait
/// drags on, so a stall explains itself in the test's output.
async fn undelivered_diagnosis(sandbox: &Sandbox) -> String {
    let pool = sandbox.pool();
    let text = |rows: Result<Vec<(String,)>, sqlx::Error>| match rows {
        Ok(rows) => rows
            .into_iter()
            .map(|(row,)| row)
            .collect::<Vec<_>>()
            .join("\n  "),
        Err(error) => format!("query failed: {error}"),
    };
    let messages = sqlx::query_as(
        "SELECT format('%s: webhook %s, actions_due %s, failures %s, parked %s, seq %s..%s: %s',
                       COALESCE(c.name, m.mailbox_uid::text), m.webhook_delivered_at IS NOT NULL,
                       m.actions_due, m.actions_failures, m.actions_parked_at IS NOT NULL,
                       min(m.seq), max(m.seq), count(*))
           FROM messages m
           LEFT JOIN mailbox_identities i ON i.identity = m.mailbox_uid
           LEFT JOIN mailbox_cursors c ON c.mailbox_uid = COALESCE(i.uid, m.mailbox_uid)
          WHERE m.delivery_state = 'pending'
          GROUP BY c.name, m.mailbox_uid, m.webhook_delivered_at IS NOT NULL,
                   m.actions_due, m.actions_failures, m.actions_parked_at IS NOT NULL",
    )
    .fetch_all(pool)
    .await;
    let tasks = sqlx::query_as(
        "SELECT format('%s %s #%s %s: run_at %s s, attempts %s/%s, rerun %s, by %s, lease %s s, \
                        finished %s s ago, error %s',
                       COALESCE(c.name, t.owner_uid::text), t.kind, t.id, t.state,
                       round(extract(epoch FROM t.run_at - now())::numeric, 1),
                       t.attempts, t.max_attempts, t.rerun_requested, t.locked_by,
                       round(extract(epoch FROM t.lease_expires_at - now())::numeric, 1),
                       round(extract(epoch FROM now() - t.finished_at)::numeric, 1),
                       left(t.last_error, 300))
           FROM (SELECT *, row_number() OVER (PARTITION BY owner_uid, kind ORDER BY id DESC) AS n
                   FROM tasks
                  WHERE owner_uid IN (
                      SELECT COALESCE(i.uid, m.mailbox_uid) FROM messages m
                        LEFT JOIN mailbox_identities i ON i.identity = m.mailbox_uid
                       WHERE m.delivery_state = 'pending')) t
           LEFT JOIN mailbox_cursors c ON c.mailbox_uid = t.owner_uid
          WHERE t.state IN ('pending', 'running') OR t.n <= 3
          ORDER BY 1",
    )
    .fetch_all(pool)
    .await;
    let slots = sqlx::query_as(
        "SELECT format('%s slot %s: holder %s, held %s s more', mailbox, slot, holder,
                       round(extract(epoch FROM held_until - now())::numeric, 1))
           FROM mailbox_slots WHERE held_until > now() ORDER BY 1",
    )
    .fetch_all(pool)
    .await;
    let throttles = sqlx::query_as(
        "SELECT format('%s throttled %s s more', name,
                       round(extract(epoch FROM throttled_until - now())::numeric, 1))
           FROM mailbox_cursors WHERE throttled_until > now() ORDER BY 1",
    )
    .fetch_all(pool)
    .await;
    format!(
        "undelivered messages:\n  {}\ntheir MailboxPolls' tasks:\n  {}\nslots held:\n  {}\nthrottled:\n  {}",
        text(messages),
        text(tasks),
        text(slots),
        text(throttles)
    )
}

/// Polls of the MailboxPoll `name` that resynced.
async fn resynced_polls(sandbox: &Sandbox, name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM polls p JOIN mailbox_cursors c USING (mailbox_uid)
         WHERE c.name = $1 AND p.resynced",
    )
    .bind(name)
    .fetch_one(sandbox.pool())
    .await
    .expect("resynced polls")
}

fn chaos_manifest(index: usize, mailbox: &str) -> String {
    let actions = if index.is_multiple_of(4) {
        "  afterDelivery:\n    markAsRead: true\n    moveToFolder: archive\n"
    } else {
        ""
    };
    format!(
        "apiVersion: mailpoll.dev/v1alpha1\nkind: MailboxPoll\nmetadata:\n  name: box-{index:02}\n  namespace: mail\nspec:\n  mailbox: {mailbox}\n  interval: 10s\n  credentialsSecretRef:\n    name: graph-credentials\n  delivery:\n    webhook:\n      url: {EXAMPLES_WEBHOOK_BASE}/hook\n      signingSecretRef:\n        name: webhook-signing\n{actions}---\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_and_doubles_nothing() {
    let big = big_mode();
    let mailbox_count = 20;
    let initial_per_mailbox = if big { 2_450 } else { 60 };
    let arrivals_during_chaos = if big { 2_000 } else { 400 };
    let chaos_for = Duration::from_secs(if big { 120 } else { 40 });
    let mailboxes: Vec<String> = (0..mailbox_count)
        .map(|i| format!("box{i:02}@contoso.com"))
        .collect();
    let mut opts = options(mailboxes.clone());
    opts.log_level = "info".into();
    opts.graph_faults = Faults {
        throttle_ratio: 0.05,
        retry_after_secs: 1,
        server_error_ratio: 0.02,
        ..Faults::default()
    };
    let mut sandbox = start(opts).await;
    let began = Instant::now();
    for mailbox in &mailboxes {
        sandbox
            .add_mail(mailbox, initial_per_mailbox)
            .expect("mail");
    }
    let examples = examples_dir();
    for file in ["00-namespace.yaml", "10-secrets.yaml"] {
        let text = std::fs::read_to_string(examples.join(file)).expect("example");
        sandbox.apply(&text).await.expect("apply");
    }
    let manifests: String = mailboxes
        .iter()
        .enumerate()
        .map(|(i, m)| chaos_manifest(i, m))
        .collect();
    sandbox
        .apply(&manifests)
        .await
        .expect("apply the MailboxPolls");

    // Chaos: mail keeps arriving; a random replica is killed with SIGKILL every few seconds
    // and restarted; Postgres restarts once; one mailbox's delta tokens expire.
    let mut kills = 0u64;
    // Deliveries running when their replica was killed or Postgres restarted: the only ones
    // whose webhook success may go unrecorded, hence the only possible repeats.
    let mut stranded: HashSet<(i64, String)> = HashSet::new();
    let mut postgres_restarted = false;
    let mut tokens_expired = false;
    let mut added = 0;
    let per_tick = arrivals_during_chaos / (chaos_for.as_secs() as usize * 2);
    let mut next_kill = Instant::now() + Duration::from_secs(3);
    while began.elapsed() < chaos_for {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..per_tick.max(1) {
            let mailbox = &mailboxes[rand::rng().random_range(0..mailboxes.len())];
            sandbox.add_mail(mailbox, 1).expect("mail");
            added += 1;
        }
        if Instant::now() >= next_kill {
            let victim = rand::rng().random_range(0..sandbox.replica_count());
            sandbox.kill_replica(victim).await.expect("kill -9");
            kills += 1;
            let name = sandbox.replica_name(victim).to_owned();
            stranded.extend(running_deliveries(&sandbox, Some(&name)).await);
            tokio::time::sleep(Duration::from_millis(500)).await;
            sandbox.start_replica(victim).expect("restart the replica");
            next_kill = Instant::now() + Duration::from_secs(rand::rng().random_range(3..7));
        }
        if !postgres_restarted && began.elapsed() > chaos_for / 3 {
            // A delivery whose success cannot be recorded while Postgres is down may repeat.
            stranded.extend(running_deliveries(&sandbox, None).await);
            sandbox.restart_postgres().await.expect("pg_ctl restart");
            // And those claimed in between: their result could not be recorded either.
            stranded.extend(running_deliveries(&sandbox, None).await);
            postgres_restarted = true;
        }
        if !tokens_expired && began.elapsed() > chaos_for / 2 {
            sandbox
                .graph
                .evict_delta_tokens(&mailboxes[3])
                .expect("expire delta tokens");
            tokens_expired = true;
        }
    }
    for index in 0..sandbox.replica_count() {
        sandbox
            .wait_ready(index, Duration::from_secs(60))
            .await
            .expect("replica ready");
    }
    let chaos_done = Instant::now();
    let limit = Duration::from_secs(if big { 1800 } else { 240 });
    let mut next_report = Instant::now();
    wait_for_ok(
        "every message recorded and delivered after the chaos",
        Patience::new(limit).every(Duration::from_millis(500)),
        || {
            // A progress line every 30 s while it converges.
            let report = Instant::now() >= next_report;
            if report {
                next_report += Duration::from_secs(30);
            }
            let (sandbox, mailboxes) = (&sandbox, &mailboxes);
            async move {
                let state = arrived_equals_recorded(sandbox, mailboxes).await;
                if report && let Err(state) = &state {
                    println!(
                        "[{:>4.0}s] {}",
                        began.elapsed().as_secs_f64(),
                        state.split(';').next().unwrap_or_default()
                    );
                    if chaos_done.elapsed() > Duration::from_secs(60) {
                        println!("{}", undelivered_diagnosis(sandbox).await);
                    }
                }
                state
            }
        },
    )
    .await;
    let converged = chaos_done.elapsed();
    let (delivered, repeats) = assert_delivered_once(&sandbox, stranded.len() as u64).await;
    let total: u64 = sandbox.arrived().values().sum();
    assert_eq!(delivered as u64, total);
    status_matches_ledger(&sandbox, Duration::from_secs(120)).await;

    // Suspend everything: the pending scheduled polls are cancelled, and then no task may be
    // left running or pending, and none dead.
    for i in 0..mailbox_count {
        let output = sandbox
            .kubectl(&[
                "patch",
                "mbp",
                "-n",
                "mail",
                &format!("box-{i:02}"),
                "--type=merge",
                "-p",
                r#"{"spec":{"suspend":true}}"#,
            ])
            .await
            .expect("kubectl patch");
        assert!(output.success, "{}", output.stderr);
    }
    wait_for_ok("no task pending or running", patience(Duration::from_secs(120)), || async {
        let states: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT kind, state, count(*) FROM tasks WHERE state IN ('pending', 'running', 'dead') GROUP BY 1, 2",
        )
        .fetch_all(sandbox.pool())
        .await
        .map_err(|e| e.to_string())?;
        states.is_empty().then_some(()).ok_or(format!("{states:?}"))
    })
    .await;
    assert_no_secrets_in_logs(&sandbox, &[]);
    let failed_attempts = sandbox.receiver.failed_attempts();
    let counters = sandbox.graph.counters();
    let throttled: u64 = counters
        .mailboxes
        .values()
        .map(|m| m.by_status.get(&429).copied().unwrap_or(0))
        .sum();
    let unavailable: u64 = counters
        .mailboxes
        .values()
        .map(|m| m.by_status.get(&503).copied().unwrap_or(0))
        .sum();
    // The faults fired: without them the test proves nothing about them.
    assert!(throttled > 0, "Graph never answered 429");
    assert!(unavailable > 0, "Graph never answered 503");
    let expired = counters
        .mailbox(&mailboxes[3])
        .and_then(|m| m.by_status.get(&410).copied())
        .unwrap_or(0);
    assert!(expired > 0, "the expired delta token was never refused");
    let resyncs = resynced_polls(&sandbox, "box-03").await;
    assert!(
        resyncs > 0,
        "box-03 never resynced after its delta tokens expired"
    );
    // Every Retry-After was honoured by every replica: no request reached a throttled mailbox
    // before its wait was over, except those already on their way when the 429 left or sent
    // before the announcement reached the other replica.
    let early = counters.early_requests(RETRY_AFTER_GRACE);
    assert!(
        early.is_empty(),
        "{} requests inside a Retry-After: {early:?}",
        early.len()
    );
    let mut by_endpoint: BTreeMap<&str, u64> = BTreeMap::new();
    for mailbox in counters.mailboxes.values() {
        for (endpoint, n) in &mailbox.by_endpoint {
            *by_endpoint.entry(endpoint.as_str()).or_default() += n;
        }
    }
    println!("Graph requests by endpoint: {by_endpoint:?}");
    println!(
        "chaos ({}): {mailbox_count} mailboxes, {total} messages ({added} during chaos), {kills} kills, \
         1 Postgres restart, 1 delta-token expiry answered 410 {expired} times and resynced {resyncs} times, \
         Graph 429s {throttled}, 503s {unavailable}; converged {:.1} s after the chaos; delivered {delivered}, \
         repeated webhook successes {repeats} of {} stranded by kills and the restart, \
         failed webhook attempts {failed_attempts}; {:.0} s in all",
        if big { "big mode" } else { "CI mode" },
        converged.as_secs_f64(),
        stranded.len(),
        began.elapsed().as_secs_f64()
    );
    sandbox.shutdown().await.expect("graceful stop");
}
