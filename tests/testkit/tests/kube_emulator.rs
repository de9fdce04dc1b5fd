//! Conformance of the Kubernetes API emulator, through kube's typed API, its watcher and a small
//! Controller, over raw HTTP, and through kubectl.
//!
//! Run against a real cluster instead with `MAILPOLL_TEST_REAL_CLUSTER=1` and `KUBECONFIG`
//! pointing at it: every test works in its own namespace (deleted at the end); the checks that
//! depend on emulator internals (request record, a tiny watch history) run on the emulator only.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, CustomResourceExt, ResourceExt};
use mailpoll::resource::MailboxPoll;
use mailpoll_testkit::kube::{ApiError, FaultEffect, KubeEmulator, Options};
use mailpoll_testkit::wait_for;
use serde_json::{Value, json};

const CRD_NAME: &str = "mailboxpolls.mailpoll.dev";
/// Upper bound of every wait in this file; reached only when something is broken.
const PATIENCE: Duration = Duration::from_secs(30);

/// One test's view of a cluster: the emulator (unless a real cluster was asked for), a client,
/// and a namespace of its own with the MailboxPoll CRD installed.
struct World {
    emulator: Option<KubeEmulator>,
    client: Client,
    namespace: String,
}

fn real_cluster() -> bool {
    std::env::var("MAILPOLL_TEST_REAL_CLUSTER").is_ok_and(|v| v == "1")
}

impl World {
    async fn new() -> Self {
        Self::with_options(Options::default()).await
    }

    async fn with_options(options: Options) -> Self {
        mailpoll::install_crypto_provider();
        let (emulator, client) = if real_cluster() {
            let client = Client::try_default()
                .await
                .expect("KUBECONFIG names a reachable cluster");
            (None, client)
        } else {
            let emulator = KubeEmulator::start_with(options)
                .await
                .expect("emulator starts");
            let client = emulator.client().expect("client for the emulator");
            (Some(emulator), client)
        };
        let namespace = format!(
            "mbp-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": namespace}}))
                    .expect("namespace object"),
            )
            .await
            .expect("test namespace is created");
        let world = Self {
            emulator,
            client,
            namespace,
        };
        world.install_crd().await;
        world
    }

    async fn install_crd(&self) {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        crds.patch(
            CRD_NAME,
            &PatchParams::apply("mailpoll-tests").force(),
            &Patch::Apply(MailboxPoll::crd()),
        )
        .await
        .expect("CRD is applied");
        wait_for("the CRD to be Established", PATIENCE, || async {
            let crd = crds.get(CRD_NAME).await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        })
        .await;
    }

    fn mbp(&self) -> Api<MailboxPoll> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// A second, independent client to the same cluster.
    async fn another_client(&self) -> Client {
        match &self.emulator {
            Some(emulator) => emulator.client().expect("second client"),
            None => Client::try_default().await.expect("second client"),
        }
    }

    fn emulator(&self) -> Option<&KubeEmulator> {
        self.emulator.as_ref()
    }

    async fn finish(self) {
        if self.emulator.is_none() {
            let namespaces: Api<Namespace> = Api::all(self.client.clone());
            let _ = namespaces
                .delete(&self.namespace, &DeleteParams::default())
                .await;
        }
    }
}

fn mailboxpoll(name: &str, interval: &str) -> MailboxPoll {
    serde_json::from_value(json!({
        "apiVersion": "mailpoll.dev/v1alpha1",
        "kind": "MailboxPoll",
        "metadata": {"name": name},
        "spec": {
            "mailbox": format!("{name}@contoso.com"),
            "interval": interval,
            "credentialsSecretRef": {"name": "graph-credentials"},
        }
    }))
    .expect("MailboxPoll object")
}

fn api_status(error: kube::Error) -> kube::core::Status {
    match error {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error Status, got {other:?}"),
    }
}

fn condition(kind: &str, status: &str) -> Value {
    json!({"type": kind, "status": status, "reason": "Test", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

#[tokio::test]
async fn server_sets_metadata_and_generation_tracks_spec_only() {
    let world = World::new().await;
    let api = world.mbp();
    let created = api
        .create(&PostParams::default(), &mailboxpoll("meta", "5m"))
        .await
        .expect("create");
    let uid = created.uid().expect("uid is set");
    assert!(created.creation_timestamp().is_some());
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.spec.folder, "inbox", "schema defaults are applied");
    let rv1: u64 = created
        .resource_version()
        .expect("rv")
        .parse()
        .expect("numeric rv");

    let annotated = api
        .patch(
            "meta",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
        )
        .await
        .expect("annotate");
    assert_eq!(
        annotated.metadata.generation,
        Some(1),
        "metadata changes keep the generation"
    );
    let rv2: u64 = annotated
        .resource_version()
        .expect("rv")
        .parse()
        .expect("numeric rv");
    assert!(rv2 > rv1);

    let status = api
        .patch_status(
            "meta",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"messagesDelivered": 3}})),
        )
        .await
        .expect("status patch");
    assert_eq!(
        status.metadata.generation,
        Some(1),
        "status changes keep the generation"
    );

    let respec = api
        .patch(
            "meta",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"interval": "10m"}})),
        )
        .await
        .expect("spec patch");
    assert_eq!(respec.metadata.generation, Some(2));
    assert_eq!(respec.uid().as_deref(), Some(uid.as_str()));

    let again = api
        .patch(
            "meta",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"interval": "10m"}})),
        )
        .await
        .expect("no-op patch");
    assert_eq!(
        again.resource_version(),
        respec.resource_version(),
        "a no-op write bumps nothing"
    );

    let mut stale = created.clone();
    stale.spec.interval = "1h".into();
    let error = api
        .replace("meta", &PostParams::default(), &stale)
        .await
        .expect_err("stale PUT");
    let status = api_status(error);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    world.finish().await;
}

#[tokio::test]
async fn status_subresource_and_main_resource_ignore_each_other() {
    let world = World::new().await;
    let api = world.mbp();
    api.create(&PostParams::default(), &mailboxpoll("split", "5m"))
        .await
        .expect("create");
    let through_status = api
        .patch_status(
            "split",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"interval": "1h"}, "status": {"messagesDelivered": 7}})),
        )
        .await
        .expect("status patch");
    assert_eq!(
        through_status.spec.interval, "5m",
        "status writes ignore spec"
    );
    assert_eq!(
        through_status
            .status
            .as_ref()
            .and_then(|s| s.messages_delivered),
        Some(7)
    );
    let through_main = api
        .patch(
            "split",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"interval": "1h"}, "status": {"messagesDelivered": 99}})),
        )
        .await
        .expect("main patch");
    assert_eq!(through_main.spec.interval, "1h");
    assert_eq!(
        through_main
            .status
            .as_ref()
            .and_then(|s| s.messages_delivered),
        Some(7),
        "main-resource writes ignore status"
    );
    world.finish().await;
}

#[tokio::test]
async fn invalid_resources_are_rejected_with_the_crd_message() {
    let world = World::new().await;
    let api = world.mbp();
    let error = api
        .create(&PostParams::default(), &mailboxpoll("bad", "1s"))
        .await
        .expect_err("interval below 10s");
    let status = api_status(error);
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        status.message,
        "MailboxPoll.mailpoll.dev \"bad\" is invalid: spec.interval: Invalid value: \"1s\": spec.interval must be between 10s and 24h"
    );
    let causes = status.details.expect("details").causes;
    assert_eq!(causes[0].field, "spec.interval");

    let mut missing = serde_json::to_value(mailboxpoll("bad", "5m")).expect("json");
    missing["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("mailbox");
    let dynamic: Api<kube::api::DynamicObject> = Api::namespaced_with(
        world.client.clone(),
        &world.namespace,
        &kube::api::ApiResource::erase::<MailboxPoll>(&()),
    );
    let error = dynamic
        .create(
            &PostParams::default(),
            &serde_json::from_value(missing).expect("dynamic"),
        )
        .await
        .expect_err("mailbox is required");
    let status = api_status(error);
    assert_eq!(status.code, 422);
    assert!(
        status.message.contains("spec.mailbox: Required value"),
        "{}",
        status.message
    );
    world.finish().await;
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let world = World::new().await;
    let api = world.mbp();
    let mut object = mailboxpoll("held", "5m");
    object.metadata.finalizers = Some(vec!["mailpoll.dev/cleanup".into()]);
    api.create(&PostParams::default(), &object)
        .await
        .expect("create");
    let pending = api
        .delete("held", &DeleteParams::default())
        .await
        .expect("delete");
    let left = pending
        .left()
        .expect("the object stays while a finalizer remains");
    assert!(left.metadata.deletion_timestamp.is_some());
    let still = api.get("held").await.expect("still readable");
    assert!(still.metadata.deletion_timestamp.is_some());
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("finalizer removed");
    wait_for(
        "the object to be deleted once its finalizers are gone",
        PATIENCE,
        || async {
            api.get_opt("held")
                .await
                .ok()
                .and_then(|o| o.is_none().then_some(()))
        },
    )
    .await;
    world.finish().await;
}

#[tokio::test]
async fn server_side_apply_tracks_managers_and_merges_conditions_by_type() {
    let world = World::new().await;
    let api = world.mbp();
    let applied = json!({
        "apiVersion": "mailpoll.dev/v1alpha1", "kind": "MailboxPoll",
        "metadata": {"name": "ssa"},
        "spec": {"mailbox": "ssa@contoso.com", "interval": "5m", "credentialsSecretRef": {"name": "g"}},
    });
    let created = api
        .patch("ssa", &PatchParams::apply("owner"), &Patch::Apply(&applied))
        .await
        .expect("apply creates");
    assert!(
        created
            .metadata
            .managed_fields
            .as_ref()
            .is_some_and(|m| m.iter().any(|e| e.manager.as_deref() == Some("owner")
                && e.operation.as_deref() == Some("Apply"))),
        "managedFields record the applier"
    );
    let rival = json!({"apiVersion": "mailpoll.dev/v1alpha1", "kind": "MailboxPoll", "metadata": {"name": "ssa"}, "spec": {"interval": "1m"}});
    let error = api
        .patch("ssa", &PatchParams::apply("rival"), &Patch::Apply(&rival))
        .await
        .expect_err("conflict");
    let status = api_status(error);
    assert_eq!(status.code, 409);
    assert!(
        status.message.contains("owner") && status.message.contains(".spec.interval"),
        "{}",
        status.message
    );
    let forced = api
        .patch(
            "ssa",
            &PatchParams::apply("rival").force(),
            &Patch::Apply(&rival),
        )
        .await
        .expect("force");
    assert_eq!(forced.spec.interval, "1m");
    let again = api
        .patch("ssa", &PatchParams::apply("rival"), &Patch::Apply(&rival))
        .await
        .expect("the same apply again");
    assert_eq!(
        again.resource_version(),
        forced.resource_version(),
        "re-applying the same configuration changes nothing"
    );

    let status_of = |kind: &str| json!({"apiVersion": "mailpoll.dev/v1alpha1", "kind": "MailboxPoll", "metadata": {"name": "ssa"}, "status": {"conditions": [condition(kind, "True")]}});
    api.patch_status(
        "ssa",
        &PatchParams::apply("scheduler"),
        &Patch::Apply(status_of("Ready")),
    )
    .await
    .expect("scheduler applies Ready");
    let both = api
        .patch_status(
            "ssa",
            &PatchParams::apply("worker"),
            &Patch::Apply(status_of("Degraded")),
        )
        .await
        .expect("worker applies Degraded");
    let types: Vec<String> = both
        .status
        .expect("status")
        .conditions
        .iter()
        .map(|c| c.type_.clone())
        .collect();
    assert_eq!(
        types,
        ["Ready", "Degraded"],
        "conditions merge as a map keyed by type"
    );
    world.finish().await;
}

#[tokio::test]
async fn lists_select_and_page() {
    let world = World::new().await;
    let api = world.mbp();
    for i in 0..5 {
        let mut object = mailboxpoll(&format!("item-{i}"), "5m");
        object.metadata.labels = Some(
            [(
                "parity".to_owned(),
                if i % 2 == 0 { "even" } else { "odd" }.to_owned(),
            )]
            .into(),
        );
        api.create(&PostParams::default(), &object)
            .await
            .expect("create");
    }
    let even = api
        .list(&ListParams::default().labels("parity=even"))
        .await
        .expect("label list");
    assert_eq!(even.items.len(), 3);
    let named = api
        .list(&ListParams::default().fields("metadata.name=item-1"))
        .await
        .expect("field list");
    assert_eq!(
        named.items.iter().map(|o| o.name_any()).collect::<Vec<_>>(),
        ["item-1"]
    );
    let not_in = api
        .list(&ListParams::default().labels("parity notin (even)"))
        .await
        .expect("set selector");
    assert_eq!(not_in.items.len(), 2);
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(2);
    loop {
        let page = api.list(&params).await.expect("page");
        assert!(page.items.len() <= 2);
        names.extend(page.items.iter().map(|o| o.name_any()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = ListParams::default().limit(2).continue_token(&token),
            None => break,
        }
    }
    assert_eq!(names, ["item-0", "item-1", "item-2", "item-3", "item-4"]);
    let error = api
        .list(&ListParams::default().fields("spec.mailbox=x"))
        .await
        .expect_err("unsupported field");
    assert_eq!(api_status(error).code, 400);
    world.finish().await;
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version_with_bookmarks_and_timeout() {
    let world = World::with_options(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    let api = world.mbp();
    let first = api
        .create(&PostParams::default(), &mailboxpoll("w1", "5m"))
        .await
        .expect("create");
    let resume_from = first.resource_version().expect("rv");
    api.create(&PostParams::default(), &mailboxpoll("w2", "5m"))
        .await
        .expect("create");
    api.patch(
        "w1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"interval": "6m"}})),
    )
    .await
    .expect("patch");
    let unchanged = api
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"interval": "6m"}})),
        )
        .await
        .expect("no-op patch");
    api.delete("w2", &DeleteParams::default())
        .await
        .expect("delete");

    let stream = api
        .watch(&WatchParams::default().timeout(2), &resume_from)
        .await
        .expect("watch starts");
    let events: Vec<WatchEvent<MailboxPoll>> = tokio::time::timeout(PATIENCE, stream.try_collect())
        .await
        .expect("the watch ends at timeoutSeconds")
        .expect("no stream error");
    let changes: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Added(o) => Some(format!("ADDED {}", o.name_any())),
            WatchEvent::Modified(o) => Some(format!("MODIFIED {}", o.name_any())),
            WatchEvent::Deleted(o) => Some(format!("DELETED {}", o.name_any())),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        ["ADDED w2", "MODIFIED w1", "DELETED w2"],
        "a no-op write emits no event"
    );
    assert_eq!(unchanged.metadata.generation, Some(2));
    if world.emulator().is_some() {
        assert!(
            events.iter().any(|e| matches!(e, WatchEvent::Bookmark(_))),
            "bookmarks arrive on a watch that allows them"
        );
    }
    world.finish().await;
}

#[tokio::test]
async fn watch_from_a_compacted_version_is_expired() {
    if real_cluster() {
        return; // a real cluster's compaction cannot be forced from a test
    }
    let world = World::with_options(Options {
        history_limit: 3,
        ..Options::default()
    })
    .await;
    let api = world.mbp();
    let first = api
        .create(&PostParams::default(), &mailboxpoll("old", "5m"))
        .await
        .expect("create");
    for i in 0..5 {
        api.patch(
            "old",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"n": i.to_string()}}})),
        )
        .await
        .expect("patch");
    }
    let mut stream = api
        .watch(
            &WatchParams::default(),
            first.resource_version().as_deref().expect("rv"),
        )
        .await
        .expect("watch starts")
        .boxed();
    let event = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("an event arrives");
    match event {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected a 410 Expired event, got {other:?}"),
    }
}

async fn watcher_sees_changes(world: &World, config: watcher::Config) {
    let api = world.mbp();
    api.create(&PostParams::default(), &mailboxpoll("before", "5m"))
        .await
        .expect("create");
    let mut stream = watcher(api.clone(), config).boxed();
    let mut seen_init_done = false;
    let mut names = Vec::new();
    let writer = api.clone();
    let mut wrote = false;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while names.len() < 2 {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("watcher events arrive in time")
            .expect("watcher stream continues")
            .expect("watcher event is not an error");
        match event {
            watcher::Event::InitApply(o) => names.push(format!("init {}", o.name_any())),
            watcher::Event::InitDone => {
                seen_init_done = true;
                if !wrote {
                    writer
                        .create(&PostParams::default(), &mailboxpoll("after", "5m"))
                        .await
                        .expect("create");
                    wrote = true;
                }
            }
            watcher::Event::Apply(o) => names.push(format!("apply {}", o.name_any())),
            watcher::Event::Init | watcher::Event::Delete(_) => {}
        }
    }
    assert!(seen_init_done);
    assert_eq!(names, ["init before", "apply after"]);
}

#[tokio::test]
async fn watcher_list_then_watch() {
    let world = World::new().await;
    watcher_sees_changes(&world, watcher::Config::default()).await;
    world.finish().await;
}

#[tokio::test]
async fn watcher_streaming_list() {
    let world = World::new().await;
    watcher_sees_changes(&world, watcher::Config::default().streaming_lists()).await;
    if let Some(emulator) = world.emulator() {
        let streaming = emulator
            .requests()
            .iter()
            .any(|r| r.verb == "watch" && r.resource == "mailboxpolls");
        assert!(streaming, "the watcher listed through a watch");
        assert!(
            !emulator
                .requests()
                .iter()
                .any(|r| r.verb == "list" && r.resource == "mailboxpolls"),
            "a streaming list needs no list call"
        );
    }
    world.finish().await;
}

#[tokio::test]
async fn a_controller_reconciles_every_generation() {
    let world = World::new().await;
    let api = world.mbp();
    for name in ["c1", "c2"] {
        api.create(&PostParams::default(), &mailboxpoll(name, "5m"))
            .await
            .expect("create");
    }
    async fn reconcile(
        object: Arc<MailboxPoll>,
        api: Arc<Api<MailboxPoll>>,
    ) -> Result<Action, kube::Error> {
        let generation = object.metadata.generation;
        if object.status.as_ref().and_then(|s| s.observed_generation) != generation {
            api.patch_status(
                &object.name_any(),
                &PatchParams::apply("test-controller"),
                &Patch::Apply(json!({
                    "apiVersion": "mailpoll.dev/v1alpha1", "kind": "MailboxPoll",
                    "status": {"observedGeneration": generation},
                })),
            )
            .await?;
        }
        Ok(Action::await_change())
    }
    fn error_policy(_: Arc<MailboxPoll>, _: &kube::Error, _: Arc<Api<MailboxPoll>>) -> Action {
        Action::requeue(Duration::from_millis(100))
    }
    let controller = tokio::spawn(
        Controller::new(api.clone(), watcher::Config::default())
            .run(reconcile, error_policy, Arc::new(api.clone()))
            .for_each(|_| async {}),
    );
    let observed = |name: &'static str, generation: i64| {
        let api = api.clone();
        async move {
            let what = format!("{name} to be reconciled at generation {generation}");
            wait_for(what, PATIENCE, || async {
                let object = api.get(name).await.ok()?;
                (object.status?.observed_generation == Some(generation)).then_some(())
            })
            .await
        }
    };
    observed("c1", 1).await;
    observed("c2", 1).await;
    api.patch(
        "c2",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"interval": "7m"}})),
    )
    .await
    .expect("spec change");
    observed("c2", 2).await;
    controller.abort();
    world.finish().await;
}

#[tokio::test]
async fn two_clients_compete_for_a_lease_by_compare_and_swap() {
    let world = World::new().await;
    let leases: Api<Lease> = Api::namespaced(world.client.clone(), &world.namespace);
    let rival: Api<Lease> = Api::namespaced(world.another_client().await, &world.namespace);
    leases
        .create(
            &PostParams::default(),
            &Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some("leader".into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some("nobody".into()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            },
        )
        .await
        .expect("lease created");
    for round in 0..10 {
        let a = leases.get("leader").await.expect("a reads");
        let b = rival.get("leader").await.expect("b reads");
        let take = |mut lease: Lease, who: &str| {
            let spec = lease.spec.get_or_insert_with(Default::default);
            spec.holder_identity = Some(who.into());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            lease
        };
        let (a, b) = (take(a, "a"), take(b, "b"));
        let params = PostParams::default();
        let (ra, rb) = tokio::join!(
            leases.replace("leader", &params, &a),
            rival.replace("leader", &params, &b),
        );
        let winners = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(
            winners, 1,
            "round {round}: exactly one candidate wins ({ra:?} / {rb:?})"
        );
        let loser = if ra.is_ok() { rb } else { ra };
        let status = api_status(loser.expect_err("the loser fails"));
        assert_eq!(status.code, 409, "round {round}: the loser gets a conflict");
        let current = leases.get("leader").await.expect("read back");
        assert_eq!(
            current.spec.and_then(|s| s.lease_transitions),
            Some(round + 1)
        );
    }
    world.finish().await;
}

#[tokio::test]
async fn secrets_and_events() {
    let world = World::new().await;
    let secrets: Api<Secret> = Api::namespaced(world.client.clone(), &world.namespace);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "graph-credentials"},
        "stringData": {"tenantId": "t", "clientSecret": "s3cret"},
    }))
    .expect("secret object");
    let stored = secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret created");
    assert!(
        stored.string_data.is_none(),
        "stringData is folded into data"
    );
    let data = stored.data.expect("data");
    assert_eq!(data["clientSecret"].0, b"s3cret");
    assert_eq!(stored.type_.as_deref(), Some("Opaque"));

    let events: Api<Event> = Api::namespaced(world.client.clone(), &world.namespace);
    let event: Event = serde_json::from_value(json!({
        "metadata": {"generateName": "support-inbox."},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "mailpoll.dev/operator",
        "reportingInstance": "mailpoll-0",
        "action": "Poll",
        "reason": "PollFailed",
        "type": "Warning",
        "note": "mailbox not found",
        "regarding": {"apiVersion": "mailpoll.dev/v1alpha1", "kind": "MailboxPoll", "name": "support-inbox", "namespace": world.namespace},
    }))
    .expect("event object");
    let created = events
        .create(&PostParams::default(), &event)
        .await
        .expect("event created");
    let name = created.name_any();
    assert!(
        name.starts_with("support-inbox.") && name.len() > "support-inbox.".len(),
        "generateName: {name}"
    );
    let core: Api<CoreEvent> = Api::namespaced(world.client.clone(), &world.namespace);
    let listed = core
        .list(&ListParams::default().fields("involvedObject.name=support-inbox"))
        .await
        .expect("core events list");
    assert_eq!(
        listed.items.len(),
        1,
        "events.k8s.io/v1 Events show up as core/v1 Events"
    );
    assert_eq!(
        listed.items[0].message.as_deref(),
        Some("mailbox not found")
    );
    world.finish().await;
}

#[tokio::test]
async fn the_request_record_names_verbs_resources_and_managers() {
    let world = World::new().await;
    let Some(emulator) = world.emulator() else {
        return; // only the emulator keeps a record
    };
    emulator.clear_requests();
    let api = world.mbp();
    api.create(&PostParams::default(), &mailboxpoll("rec", "5m"))
        .await
        .expect("create");
    api.get("rec").await.expect("get");
    api.list(&ListParams::default()).await.expect("list");
    api.patch_status("rec", &PatchParams::apply("recorder"), &Patch::Apply(json!({
        "apiVersion": "mailpoll.dev/v1alpha1", "kind": "MailboxPoll", "status": {"messagesDelivered": 1}
    })))
    .await
    .expect("status apply");
    api.delete("rec", &DeleteParams::default())
        .await
        .expect("delete");
    let keys: Vec<String> = emulator.requests().iter().map(|r| r.rbac_key()).collect();
    assert_eq!(
        keys,
        [
            "create mailpoll.dev/mailboxpolls",
            "get mailpoll.dev/mailboxpolls",
            "list mailpoll.dev/mailboxpolls",
            "patch mailpoll.dev/mailboxpolls/status",
            "delete mailpoll.dev/mailboxpolls",
        ]
    );
    let records = emulator.requests();
    assert_eq!(records[3].field_manager.as_deref(), Some("recorder"));
    assert!(
        records
            .iter()
            .all(|r| r.namespace.as_deref() == Some(world.namespace.as_str()))
    );
}

/// Raw HTTP: discovery, OpenAPI, Status bodies for bad input, Table output.
#[tokio::test]
async fn raw_http_answers_like_an_api_server() {
    if real_cluster() {
        return; // raw requests would need the cluster's credentials
    }
    let world = World::new().await;
    let base = world.emulator().expect("emulator").url();
    let ns = &world.namespace;
    let http = reqwest::Client::new();
    let get = |path: String, accept: &'static str| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let response = http
                .get(url)
                .header("Accept", accept)
                .send()
                .await
                .expect("request");
            let code = response.status().as_u16();
            (code, response.json::<Value>().await.expect("JSON body"))
        }
    };
    let (code, version) = get("/version".into(), "application/json").await;
    assert_eq!((code, version["major"].as_str()), (200, Some("1")));
    let (_, groups) = get(
        "/apis".into(),
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
    )
    .await;
    assert_eq!(
        groups["kind"], "APIGroupList",
        "aggregated discovery falls back to the plain list"
    );
    assert!(
        groups["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .any(|g| g["name"] == "mailpoll.dev")
    );
    let (_, resources) = get("/apis/mailpoll.dev/v1alpha1".into(), "application/json").await;
    let entry = resources["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["name"] == "mailboxpolls")
        .cloned()
        .expect("mailboxpolls served");
    assert_eq!(entry["shortNames"], json!(["mbp"]));
    assert_eq!(entry["categories"], json!(["mailpoll"]));
    assert!(
        resources["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .any(|r| r["name"] == "mailboxpolls/status")
    );
    let (_, openapi) = get("/openapi/v3".into(), "application/json").await;
    let url = openapi["paths"]["apis/mailpoll.dev/v1alpha1"]["serverRelativeURL"]
        .as_str()
        .expect("group version listed")
        .to_owned();
    let (code, doc) = get(url, "application/json").await;
    assert_eq!(code, 200);
    let patch = &doc["paths"]["/apis/mailpoll.dev/v1alpha1/namespaces/{namespace}/mailboxpolls/{name}"]
        ["patch"];
    assert!(
        patch["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .any(|p| p["name"] == "fieldValidation")
    );

    let collection = format!("{base}/apis/mailpoll.dev/v1alpha1/namespaces/{ns}/mailboxpolls");
    let send = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.expect("request");
        let code = response.status().as_u16();
        (code, response.json::<Value>().await.expect("JSON body"))
    };
    let (code, status) = send(
        http.post(&collection)
            .header("Content-Type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_eq!(
        (code, status["kind"].as_str(), status["reason"].as_str()),
        (400, Some("Status"), Some("BadRequest"))
    );
    let (code, status) = send(
        http.post(&collection)
            .header("Content-Type", "application/yaml")
            .body("a: [unclosed"),
    )
    .await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    let (code, status) = send(
        http.post(&collection)
            .header("Content-Type", "application/vnd.kubernetes.protobuf")
            .body("k8s\0"),
    )
    .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let yaml = "apiVersion: mailpoll.dev/v1alpha1\nkind: MailboxPoll\nmetadata:\n  name: raw\nspec:\n  mailbox: raw@contoso.com\n  credentialsSecretRef:\n    name: g\n";
    let (code, created) = send(
        http.post(&collection)
            .header("Content-Type", "application/yaml")
            .body(yaml),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let (code, status) = send(
        http.post(&collection)
            .header("Content-Type", "application/yaml")
            .body(yaml),
    )
    .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );
    let item = format!("{collection}/raw");
    let (code, status) = send(
        http.patch(&item)
            .header("Content-Type", "application/strategic-merge-patch+json")
            .body("{}"),
    )
    .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let (code, status) = send(
        http.patch(&item)
            .header("Content-Type", "application/json-patch+json")
            .body(r#"[{"op":"test","path":"/spec/mailbox","value":"other"}]"#),
    )
    .await;
    assert_eq!((code, status["reason"].as_str()), (422, Some("Invalid")));
    for (patch, what) in [
        (
            r#"[{"op":"replace","path":"","value":5}]"#,
            "the whole object replaced by a number",
        ),
        (
            r#"[{"op":"replace","path":"/metadata","value":[]}]"#,
            "metadata replaced by a list",
        ),
        (
            r#"[{"op":"add","path":"/metadata/labels","value":{"a":1}}]"#,
            "a label that is not a string",
        ),
    ] {
        let (code, status) = send(
            http.patch(&item)
                .header("Content-Type", "application/json-patch+json")
                .body(patch),
        )
        .await;
        assert_eq!(
            (code, status["reason"].as_str()),
            (400, Some("BadRequest")),
            "{what}: {status}"
        );
    }
    let (code, status) = send(
        http.patch(&item)
            .header("Content-Type", "text/plain")
            .body("{}"),
    )
    .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let (code, status) = send(
        http.put(&item)
            .header("Content-Type", "application/json")
            .body("[1,2]"),
    )
    .await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    let (code, status) = send(
        http.post(format!("{base}/apis/mailpoll.dev/v1alpha1/mailboxpolls"))
            .header("Content-Type", "application/yaml")
            .body(yaml),
    )
    .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (405, Some("MethodNotAllowed"))
    );
    let (code, status) = send(http.get(format!("{collection}/missing"))).await;
    assert_eq!((code, status["reason"].as_str()), (404, Some("NotFound")));
    assert_eq!(
        status["message"],
        "mailboxpolls.mailpoll.dev \"missing\" not found"
    );
    let (code, status) = send(http.get(format!(
        "{base}/apis/mailpoll.dev/v1alpha1/namespaces/{ns}/nothings"
    )))
    .await;
    assert_eq!((code, status["kind"].as_str()), (404, Some("Status")));
    let (code, table) = get(
        format!("/apis/mailpoll.dev/v1alpha1/namespaces/{ns}/mailboxpolls"),
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
    )
    .await;
    assert_eq!((code, table["kind"].as_str()), (200, Some("Table")));
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Name",
            "Mailbox",
            "Interval",
            "Ready",
            "Reason",
            "Suspended",
            "Last Poll",
            "Delivered",
            "Age",
            "Folder",
            "Next Poll",
            "Pending",
            "Failed",
            "Degraded"
        ]
    );
    assert_eq!(table["rows"][0]["cells"][1], "raw@contoso.com");
}

fn kubectl(kubeconfig: &std::path::Path, cache: &std::path::Path, args: &[&str]) -> (bool, String) {
    let output = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .arg("--request-timeout=20s")
        .args(args)
        .output()
        .expect("kubectl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubectl_session() {
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!("kubectl is not installed: the kubectl session is not run");
        return;
    }
    let world = World::new().await;
    let kubeconfig: PathBuf = match world.emulator() {
        Some(emulator) => emulator.kubeconfig_path().to_owned(),
        None => std::env::var("KUBECONFIG")
            .expect("KUBECONFIG for the real cluster")
            .into(),
    };
    let dir =
        std::env::temp_dir().join(format!("kubectl-session-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let cache = dir.join("cache");
    let crd_file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../crds/mailboxpoll.yaml");
    let ns = world.namespace.clone();
    let run = |args: &[&str]| {
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        kubectl(&kubeconfig, &cache, &full)
    };
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("manifest written");
        path.to_string_lossy().into_owned()
    };

    let (ok, out) = run(&["apply", "-f", crd_file]);
    assert!(ok, "apply CRD: {out}");
    let (ok, out) = run(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=20s",
        &format!("crd/{CRD_NAME}"),
    ]);
    assert!(ok && out.contains("condition met"), "wait: {out}");

    let manifest = write(
        "mbp.yaml",
        "apiVersion: mailpoll.dev/v1alpha1\nkind: MailboxPoll\nmetadata:\n  name: support-inbox\nspec:\n  mailbox: support@contoso.com\n  interval: 1m\n  credentialsSecretRef:\n    name: graph-credentials\n",
    );
    let (ok, out) = run(&["apply", "-f", &manifest]);
    assert!(ok && out.contains("created"), "apply MailboxPoll: {out}");
    let (ok, out) = run(&["apply", "-f", &manifest]);
    assert!(ok && out.contains("unchanged"), "re-apply: {out}");

    let (ok, out) = run(&["get", "mbp"]);
    assert!(ok, "get: {out}");
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "MAILBOX",
            "INTERVAL",
            "READY",
            "REASON",
            "SUSPENDED",
            "LAST",
            "POLL",
            "DELIVERED",
            "AGE"
        ],
        "{out}"
    );
    // -o wide adds the columns of priority 1.
    let (ok, out) = run(&["get", "mbp", "-o", "wide"]);
    assert!(ok, "get -o wide: {out}");
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.contains("FOLDER") && header.contains("NEXT POLL") && header.contains("DEGRADED"),
        "{out}"
    );
    assert!(
        out.contains("support@contoso.com") && out.contains("1m"),
        "{out}"
    );
    let (ok, out) = run(&["get", "mailpoll", "-o", "name"]);
    assert!(
        ok && out.contains("mailboxpoll.mailpoll.dev/support-inbox"),
        "the category lists it: {out}"
    );

    // `get -w` in the background sees the annotation below; it is stopped once it has (or
    // after PATIENCE), so the session waits no longer than needed.
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cache-dir")
        .arg(&cache)
        .args([
            "-n",
            ns.as_str(),
            "get",
            "mbp",
            "-w",
            "--output-watch-events",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl get -w starts");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = watch.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut watched = Vec::new();
    let next_line = |watched: &mut Vec<String>| {
        let line = lines.recv_timeout(PATIENCE).ok();
        watched.extend(line.clone());
        line
    };
    while let Some(line) = next_line(&mut watched) {
        if line.contains("support-inbox") {
            break; // the watch listed the object: changes from now on are seen
        }
    }
    let (ok, out) = run(&[
        "annotate",
        "mbp",
        "support-inbox",
        "mailpoll.dev/poll-requested-at=1700000000",
        "--overwrite",
    ]);
    assert!(ok && out.contains("annotated"), "annotate: {out}");
    let mut saw_change = false;
    while let Some(line) = next_line(&mut watched) {
        if line.contains("MODIFIED") && line.contains("support-inbox") {
            saw_change = true;
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(saw_change, "get -w saw the change: {watched:?}");

    let (ok, out) = run(&[
        "patch",
        "mbp",
        "support-inbox",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"messagesDelivered":5,"conditions":[{"type":"Ready","status":"True","reason":"Polled","message":"ok","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#,
    ]);
    assert!(ok && out.contains("patched"), "patch status: {out}");
    let (ok, out) = run(&[
        "patch",
        "mbp",
        "support-inbox",
        "--subresource=status",
        "-p",
        r#"{"status":{"messagesDelivered":6}}"#,
    ]);
    assert!(
        !ok && out.contains("application/strategic-merge-patch+json is not supported"),
        "strategic merge on a custom resource: {out}"
    );
    let (_, out) = run(&["get", "mbp", "support-inbox"]);
    let row: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..4],
        ["support-inbox", "support@contoso.com", "1m", "True"],
        "{out}"
    );
    // Reason and Suspended follow Ready; Last Poll is empty, so Delivered is the seventh word.
    assert_eq!(row[6], "5", "Delivered column: {out}");

    let ssa = write(
        "ssa.yaml",
        "apiVersion: mailpoll.dev/v1alpha1\nkind: MailboxPoll\nmetadata:\n  name: support-inbox\nspec:\n  mailbox: support@contoso.com\n  interval: 2m\n  credentialsSecretRef:\n    name: graph-credentials\n",
    );
    let (ok, out) = run(&["apply", "--server-side", "-f", &ssa]);
    assert!(
        !ok && out.contains("conflict"),
        "server-side apply over client-side apply conflicts: {out}"
    );
    let (ok, out) = run(&["apply", "--server-side", "--force-conflicts", "-f", &ssa]);
    assert!(
        ok && out.contains("serverside-applied"),
        "forced server-side apply: {out}"
    );
    let (_, out) = run(&[
        "get",
        "mbp",
        "support-inbox",
        "-o",
        "jsonpath={.spec.interval}",
    ]);
    assert_eq!(out.trim(), "2m");

    let bad = write(
        "bad.yaml",
        "apiVersion: mailpoll.dev/v1alpha1\nkind: MailboxPoll\nmetadata:\n  name: bad\nspec:\n  mailbox: support@contoso.com\n  interval: 1s\n  credentialsSecretRef:\n    name: graph-credentials\n",
    );
    let (ok, out) = run(&["apply", "-f", &bad]);
    assert!(!ok, "an invalid MailboxPoll is rejected");
    assert!(out.contains("The MailboxPoll \"bad\" is invalid: spec.interval: Invalid value: \"1s\": spec.interval must be between 10s and 24h"), "{out}");
    let unknown = write(
        "unknown.yaml",
        "apiVersion: mailpoll.dev/v1alpha1\nkind: MailboxPoll\nmetadata:\n  name: bad\nspec:\n  mailbox: support@contoso.com\n  bogus: 1\n  credentialsSecretRef:\n    name: graph-credentials\n",
    );
    let (ok, out) = run(&["apply", "-f", &unknown]);
    assert!(
        !ok && out.contains("unknown field \"spec.bogus\""),
        "strict field validation: {out}"
    );

    let secret = write(
        "secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: graph-credentials\nstringData:\n  tenantId: t\n  clientId: c\n  clientSecret: s\n",
    );
    let (ok, out) = run(&["apply", "-f", &secret]);
    assert!(ok && out.contains("created"), "apply Secret: {out}");
    let (_, out) = run(&[
        "get",
        "secret",
        "graph-credentials",
        "-o",
        "jsonpath={.data.clientSecret}",
    ]);
    assert_eq!(out.trim(), "cw==");

    // What an operator's chart installs besides the CRD applies and re-applies.
    const INSTALL: &str = r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: mailpoll
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: mailpoll
rules:
- apiGroups: [mailpoll.dev]
  resources: [mailboxpolls, mailboxpolls/status]
  verbs: [get, list, watch, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: mailpoll
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: mailpoll
subjects:
- kind: ServiceAccount
  name: mailpoll
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: mailpoll
spec:
  replicas: REPLICAS
  selector:
    matchLabels:
      app: mailpoll
  template:
    metadata:
      labels:
        app: mailpoll
    spec:
      serviceAccountName: mailpoll
      containers:
      - name: operator
        image: mailpoll:dev
"#;
    let install = |replicas: u32| INSTALL.replace("REPLICAS", &replicas.to_string());
    let chart = write("install.yaml", &install(2));
    let (ok, out) = run(&["apply", "-f", &chart]);
    assert!(
        ok && out.contains("deployment.apps/mailpoll created"),
        "apply install: {out}"
    );
    let chart = write("install.yaml", &install(3));
    let (ok, out) = run(&["apply", "-f", &chart]);
    assert!(
        ok && out.contains("deployment.apps/mailpoll configured")
            && out.contains("role.rbac.authorization.k8s.io/mailpoll unchanged"),
        "re-apply install: {out}"
    );
    let (_, out) = run(&[
        "get",
        "deploy",
        "mailpoll",
        "-o",
        "jsonpath={.spec.replicas} {.metadata.generation}",
    ]);
    assert_eq!(out.trim(), "3 2");

    let (ok, out) = run(&["delete", "mbp", "support-inbox", "--timeout=20s"]);
    assert!(ok && out.contains("deleted"), "delete: {out}");
    let (ok, out) = run(&["get", "mbp"]);
    assert!(ok && out.contains("No resources found"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
    world.finish().await;
}

#[tokio::test]
async fn a_selective_watch_sees_objects_enter_and_leave_its_selection() {
    let world = World::new().await;
    let api = world.mbp();
    let start = api
        .create(&PostParams::default(), &mailboxpoll("sel", "5m"))
        .await
        .expect("create");
    let label =
        |value: Option<&str>| Patch::Merge(json!({"metadata": {"labels": {"team": value}}}));
    api.patch("sel", &PatchParams::default(), &label(Some("mail")))
        .await
        .expect("label on");
    api.patch("sel", &PatchParams::default(), &label(None))
        .await
        .expect("label off");
    let stream = api
        .watch(
            &WatchParams::default().labels("team=mail").timeout(2),
            start.resource_version().as_deref().expect("rv"),
        )
        .await
        .expect("watch starts");
    let events: Vec<WatchEvent<MailboxPoll>> = tokio::time::timeout(PATIENCE, stream.try_collect())
        .await
        .expect("the watch ends at timeoutSeconds")
        .expect("no stream error");
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Added(_) => Some("ADDED"),
            WatchEvent::Modified(_) => Some("MODIFIED"),
            WatchEvent::Deleted(_) => Some("DELETED"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["ADDED", "DELETED"]);
    world.finish().await;
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_contents() {
    let world = World::new().await;
    let namespaces: Api<Namespace> = Api::all(world.client.clone());
    let doomed = format!("{}-gone", world.namespace);
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": doomed}})).expect("namespace"),
        )
        .await
        .expect("namespace created");
    let secrets: Api<Secret> = Api::namespaced(world.client.clone(), &doomed);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}}))
                .expect("secret"),
        )
        .await
        .expect("secret created");
    namespaces
        .delete(&doomed, &DeleteParams::default())
        .await
        .expect("namespace delete");
    wait_for("the namespace to go once empty", PATIENCE, || async {
        namespaces
            .get_opt(&doomed)
            .await
            .ok()
            .and_then(|n| n.is_none().then_some(()))
    })
    .await;
    let error = secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "t"}})).expect("secret"),
        )
        .await
        .expect_err("no writes into a missing namespace");
    assert_eq!(api_status(error).code, 404);
    world.finish().await;
}

#[tokio::test]
async fn deleting_the_crd_stops_serving_its_resources() {
    if real_cluster() {
        return; // the CRD is shared by every test on a real cluster
    }
    let world = World::new().await;
    let api = world.mbp();
    api.create(&PostParams::default(), &mailboxpoll("doomed", "5m"))
        .await
        .expect("create");
    let crds: Api<CustomResourceDefinition> = Api::all(world.client.clone());
    crds.delete(CRD_NAME, &DeleteParams::default())
        .await
        .expect("CRD deleted");
    let error = api
        .list(&ListParams::default())
        .await
        .expect_err("no longer served");
    assert_eq!(api_status(error).code, 404);
    world.install_crd().await;
    let listed = api
        .list(&ListParams::default())
        .await
        .expect("served again");
    assert!(
        listed.items.is_empty(),
        "custom resources went with their definition"
    );
}

#[tokio::test]
async fn install_crd_serves_the_resource_at_once() {
    mailpoll::install_crypto_provider();
    let emulator = KubeEmulator::start().await.expect("emulator starts");
    emulator
        .install_crd(&MailboxPoll::crd())
        .expect("CRD installed");
    let api: Api<MailboxPoll> = Api::default_namespaced(emulator.client().expect("client"));
    let created = api
        .create(&PostParams::default(), &mailboxpoll("direct", "5m"))
        .await
        .expect("served right after install_crd");
    assert_eq!(created.metadata.namespace.as_deref(), Some("default"));
    let crds: Api<CustomResourceDefinition> = Api::all(emulator.client().expect("client"));
    let crd = crds.get(CRD_NAME).await.expect("the CRD is readable");
    assert!(
        crd.status
            .and_then(|s| s.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Established"))
    );
}

/// The protocol of kube-lease-manager: an orphaned Lease is taken with a server-side apply by a
/// field manager per candidate (a rival's apply conflicts on `holderIdentity`), renewed and
/// released with strategic merge patches.
#[tokio::test]
async fn leases_are_taken_by_server_side_apply_and_released_by_patch() {
    let world = World::new().await;
    let leases: Api<Lease> = Api::namespaced(world.client.clone(), &world.namespace);
    let rival: Api<Lease> = Api::namespaced(world.another_client().await, &world.namespace);
    leases
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "scheduler"}, "spec": {}}))
                .expect("lease"),
        )
        .await
        .expect("lease created");
    let lock = |who: &str| {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "spec": {
                "holderIdentity": who,
                "acquireTime": "2026-01-01T00:00:00.000000Z",
                "renewTime": format!("2026-01-01T00:00:00.{:06}Z", who.len()),
                "leaseDurationSeconds": 15,
            }
        })
    };
    for round in 0..5 {
        let (a, b) = (format!("a-{round}"), format!("bb-{round}"));
        let (manager_a, manager_b) = (format!("lease-{a}"), format!("lease-{b}"));
        let (pa, pb) = (
            PatchParams::apply(&manager_a),
            PatchParams::apply(&manager_b),
        );
        let (lock_a, lock_b) = (Patch::Apply(lock(&a)), Patch::Apply(lock(&b)));
        let (ra, rb) = tokio::join!(
            leases.patch("scheduler", &pa, &lock_a),
            rival.patch("scheduler", &pb, &lock_b),
        );
        assert_eq!(
            [&ra, &rb].iter().filter(|r| r.is_ok()).count(),
            1,
            "round {round}: exactly one candidate takes the lease ({ra:?} / {rb:?})"
        );
        let winner = if ra.is_ok() { &a } else { &b };
        let loser = if ra.is_ok() { rb } else { ra };
        assert_eq!(api_status(loser.expect_err("the loser fails")).code, 409);
        let held = leases.get("scheduler").await.expect("read back");
        assert_eq!(
            held.spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref()),
            Some(winner.as_str())
        );
        let renewed = leases
            .patch(
                "scheduler",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"renewTime": "2026-01-01T00:00:05.000000Z"}})),
            )
            .await
            .expect("the holder renews");
        assert_eq!(
            renewed
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref()),
            Some(winner.as_str())
        );
        leases
            .patch(
                "scheduler",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"holderIdentity": null, "acquireTime": null, "renewTime": null, "leaseDurationSeconds": null}})),
            )
            .await
            .expect("the holder releases");
    }
    world.finish().await;
}

/// kube's event Recorder writes events.k8s.io/v1 Events (a repeat becomes a series patch);
/// `kubectl describe` reads them back as core/v1 Events of the object.
#[tokio::test]
async fn the_event_recorder_publishes_and_repeats() {
    use kube::Resource;
    use kube::runtime::events::{Event as Note, EventType, Recorder, Reporter};
    let world = World::new().await;
    let api = world.mbp();
    let object = api
        .create(&PostParams::default(), &mailboxpoll("noisy", "5m"))
        .await
        .expect("create");
    let recorder = Recorder::new(
        world.client.clone(),
        Reporter {
            controller: "mailpoll".into(),
            instance: Some("mailpoll-0".into()),
        },
    );
    let note = Note {
        type_: EventType::Warning,
        reason: "SecretNotFound".into(),
        note: Some("Secret graph-credentials not found".into()),
        action: "Poll".into(),
        secondary: None,
    };
    let reference = object.object_ref(&());
    recorder
        .publish(&note, &reference)
        .await
        .expect("first event");
    recorder
        .publish(&note, &reference)
        .await
        .expect("repeat becomes a series");
    let core: Api<CoreEvent> = Api::namespaced(world.client.clone(), &world.namespace);
    let uid = object.uid().expect("uid");
    let listed = core
        .list(&ListParams::default().fields(&format!(
            "involvedObject.name=noisy,involvedObject.namespace={},involvedObject.kind=MailboxPoll,involvedObject.uid={uid}",
            world.namespace
        )))
        .await
        .expect("events of the object");
    assert_eq!(listed.items.len(), 1, "the repeat updated the first event");
    let event = &listed.items[0];
    assert_eq!(event.reason.as_deref(), Some("SecretNotFound"));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reporting_component.as_deref(), Some("mailpoll"));
    assert_eq!(event.series.as_ref().map(|s| s.count), Some(Some(2)));
    world.finish().await;
}

/// Faults aimed at one client: each kubeconfig user is told apart by its bearer token (in the
/// request record too); a failure hits only that user, and a held answer arrives late although
/// the write took effect at once.
#[tokio::test]
async fn faults_aimed_at_one_user() {
    if real_cluster() {
        return; // users and faults are the emulator's own
    }
    let world = World::new().await;
    let emulator = world.emulator().expect("emulator");
    mailpoll::install_crypto_provider();
    let lease_api = |user: &str| -> Api<Lease> {
        let client = emulator.client_as(user).expect("client");
        Api::namespaced(client, &world.namespace)
    };
    let (alice, bob) = (lease_api("alice"), lease_api("bob"));
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "l"}, "spec": {}})).expect("lease");
    let created = alice
        .create(&PostParams::default(), &lease)
        .await
        .expect("create");
    emulator.clear_requests();
    emulator.inject_fault_for(
        "alice",
        "update",
        "leases",
        1,
        FaultEffect::Fail(ApiError::with_code(500, "injected")),
    );
    let renewed = bob
        .replace("l", &PostParams::default(), &created)
        .await
        .expect("bob is not affected");
    let refused = alice
        .replace("l", &PostParams::default(), &renewed)
        .await
        .expect_err("alice's update fails");
    assert_eq!(api_status(refused).code, 500);
    let users: Vec<(Option<String>, u16)> = emulator
        .requests()
        .iter()
        .map(|r| (r.user.clone(), r.code))
        .collect();
    assert_eq!(
        users,
        [(Some("bob".into()), 200), (Some("alice".into()), 500)]
    );

    let hold = Duration::from_secs(2);
    emulator.inject_fault_for("alice", "update", "leases", 1, FaultEffect::Hold(hold));
    let mut changed = renewed.clone();
    changed.spec = Some(LeaseSpec {
        holder_identity: Some("alice".into()),
        ..LeaseSpec::default()
    });
    let slow = tokio::spawn({
        let alice = alice.clone();
        async move { alice.replace("l", &PostParams::default(), &changed).await }
    });
    // The write is visible before its answer comes back.
    wait_for("alice's held write to take effect", PATIENCE, || async {
        let lease = bob.get("l").await.ok()?;
        (lease.spec?.holder_identity.as_deref() == Some("alice")).then_some(())
    })
    .await;
    assert!(!slow.is_finished(), "the answer is still held");
    slow.await.expect("join").expect("answered after the hold");
    let held = emulator.requests().last().cloned().expect("a record");
    assert_eq!(
        (held.user.as_deref(), held.held_for),
        (Some("alice"), Some(hold))
    );
    emulator.clear_faults();
    world.finish().await;
}

/// Failures on demand: injected errors reach the client as Status bodies, and a compaction makes
/// older resourceVersions expire.
#[tokio::test]
async fn injected_failures_and_compaction() {
    if real_cluster() {
        return; // a real cluster fails on its own terms
    }
    let world = World::new().await;
    let emulator = world.emulator().expect("emulator");
    let leases: Api<Lease> = Api::namespaced(world.client.clone(), &world.namespace);
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "l"}, "spec": {}})).expect("lease");
    let created = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create");
    emulator.inject_failure(Some("update"), Some("leases"), 2, 500);
    for attempt in 0..2 {
        let error = leases
            .replace("l", &PostParams::default(), &created)
            .await
            .expect_err("injected");
        let status = api_status(error);
        assert_eq!(
            (status.code, status.reason.as_str()),
            (500, "InternalError"),
            "attempt {attempt}"
        );
    }
    leases.get("l").await.expect("other verbs are unaffected");
    let renewed = leases
        .replace("l", &PostParams::default(), &created)
        .await
        .expect("the fault is spent");
    // kube's client retries 429, 503 and 504 by itself: one 503 goes unnoticed by the caller.
    emulator.clear_requests();
    emulator.inject_failure(Some("update"), Some("leases"), 1, 503);
    leases
        .replace("l", &PostParams::default(), &renewed)
        .await
        .expect("retried past the 503");
    let codes: Vec<u16> = emulator.requests().iter().map(|r| r.code).collect();
    assert_eq!(codes, [503, 200]);

    let api = world.mbp();
    let old = api
        .create(&PostParams::default(), &mailboxpoll("c", "5m"))
        .await
        .expect("create");
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"interval": "6m"}})),
    )
    .await
    .expect("patch");
    emulator.compact_history();
    let mut stream = api
        .watch(
            &WatchParams::default(),
            old.resource_version().as_deref().expect("rv"),
        )
        .await
        .expect("watch starts")
        .boxed();
    match tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("an event arrives")
    {
        Some(Ok(WatchEvent::Error(status))) => assert_eq!(status.code, 410),
        other => panic!("expected 410 Expired after compaction, got {other:?}"),
    }
}

/// The silent API server: a silenced watch sends nothing more (no event, no bookmark) and
/// does not end at its `timeoutSeconds`; it stays open until its client gives up. A stalled
/// LIST is never answered. Both switches are spent or turned off, and the server answers again.
#[tokio::test]
async fn a_silenced_watch_and_a_stalled_list_never_answer() {
    if real_cluster() {
        return;
    }
    let world = World::with_options(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    let emulator = world.emulator.as_ref().expect("emulator");
    let api = world.mbp();
    let params = WatchParams::default().timeout(1);
    let mut silenced = api.watch(&params, "0").await.expect("watch starts").boxed();
    wait_for("the watch to open", PATIENCE, || async {
        (emulator.open_watches() == 1).then_some(())
    })
    .await;
    emulator.silence_watches(true);
    api.create(&PostParams::default(), &mailboxpoll("quiet", "5m"))
        .await
        .expect("create");
    // Three times its timeoutSeconds, and bookmarks were due every 200 ms.
    let heard = tokio::time::timeout(Duration::from_secs(3), silenced.try_next()).await;
    assert!(heard.is_err(), "a silenced watch sent {heard:?}");
    assert_eq!(emulator.open_watches(), 1, "still open");
    drop(silenced);
    wait_for("the client to end the silenced watch", PATIENCE, || async {
        (emulator.open_watches() == 0).then_some(())
    })
    .await;

    emulator.silence_watches(false);
    let mut watch = api.watch(&params, "0").await.expect("watch starts").boxed();
    let first = tokio::time::timeout(PATIENCE, watch.try_next())
        .await
        .expect("a watch answers again")
        .expect("no stream error");
    assert!(
        matches!(&first, Some(WatchEvent::Added(poll)) if poll.name_any() == "quiet"),
        "{first:?}"
    );

    emulator.inject_fault(
        Some("list"),
        Some("mailboxpolls"),
        1,
        FaultEffect::Stall(Duration::from_secs(3600)),
    );
    let stalled =
        tokio::time::timeout(Duration::from_secs(2), api.list(&ListParams::default())).await;
    assert!(stalled.is_err(), "a stalled LIST was answered: {stalled:?}");
    let listed = api
        .list(&ListParams::default())
        .await
        .expect("answered again");
    assert_eq!(listed.items.len(), 1);
}
