//! The in-memory API server behaves like the real one for what the controller uses: checked
//! with the real kube client and watcher.

mod support;

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use support::kube_api::FakeKube;

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": "x"}}, "data": {"k": "v"}})).unwrap()
}

#[tokio::test]
async fn crud_conflicts_finalizers_and_cascade() {
    let kube = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(kube.client(), "ns");
    let created = api.create(&PostParams::default(), &cm("a")).await.unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    assert!(matches!(api.create(&PostParams::default(), &cm("a")).await, Err(kube::Error::Api(e)) if e.code == 409));

    // A stale resourceVersion is a conflict.
    let mut stale = created.clone();
    api.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "w"}}))).await.unwrap();
    stale.data = Some([("k".to_string(), "z".to_string())].into());
    assert!(
        matches!(api.replace("a", &PostParams::default(), &stale).await, Err(kube::Error::Api(e)) if e.code == 409)
    );

    // Apply creates, then merges.
    let pp = PatchParams::apply("test").force();
    api.patch(
        "b",
        &pp,
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}, "data": {"x": "1"}})),
    )
    .await
    .unwrap();
    let b = api
        .patch(
            "b",
            &pp,
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}, "data": {"y": "2"}}),
            ),
        )
        .await
        .unwrap();
    // As the real server: a field the manager applied before and no longer applies is removed.
    let data = b.data.unwrap();
    assert_eq!(data.into_iter().collect::<Vec<_>>(), [("y".to_string(), "2".to_string())]);
    // Another manager's fields stay when this one re-applies without them; a field both applied
    // stays while either still does.
    let apply = |manager: &'static str, data: serde_json::Value| {
        let api = api.clone();
        async move {
            let pp = PatchParams::apply(manager).force();
            let obj = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}, "data": data});
            api.patch("b", &pp, &Patch::Apply(obj)).await.unwrap().data.unwrap_or_default()
        }
    };
    apply("other", json!({"z": "3", "y": "2"})).await;
    let now = apply("test", json!({"w": "4"})).await;
    let keys: Vec<&str> = now.keys().map(String::as_str).collect();
    assert_eq!(keys, ["w", "y", "z"], "y is still other's, z is other's: {now:?}");
    let now = apply("other", json!({})).await;
    assert_eq!(now.keys().map(String::as_str).collect::<Vec<_>>(), ["w"], "{now:?}");

    // JSON patch adds a finalizer; delete then only marks; removing it deletes, cascading.
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Json::<()>(
            serde_json::from_value(json!([{"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}])).unwrap(),
        ),
    )
    .await
    .unwrap();
    let owner = api.get("a").await.unwrap();
    let mut child = cm("child");
    child.metadata.owner_references = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "a".into(),
        uid: owner.metadata.uid.clone().unwrap(),
        ..Default::default()
    }]);
    api.create(&PostParams::default(), &child).await.unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let marked = api.get("a").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert!(api.get("child").await.is_ok(), "still there while the owner waits on its finalizer");
    api.patch("a", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
    assert!(api.get_opt("a").await.unwrap().is_none());
    assert!(api.get_opt("child").await.unwrap().is_none(), "cascade");
}

#[tokio::test]
async fn watcher_sees_existing_and_new_objects() {
    let kube = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(kube.client(), "ns");
    api.create(&PostParams::default(), &cm("first")).await.unwrap();
    let mut names = watcher(api.clone(), watcher::Config::default()).applied_objects().boxed();
    let first = tokio::time::timeout(Duration::from_secs(5), names.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.metadata.name.as_deref(), Some("first"));
    api.create(&PostParams::default(), &cm("second")).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), names.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.metadata.name.as_deref(), Some("second"));
}

#[tokio::test]
async fn lists_come_in_pages_and_the_watcher_reads_them_all() {
    let kube = FakeKube::start().await;
    for i in 0..1200 {
        kube.put("api/v1", "configmaps", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("c{i:04}"), "namespace": "ns"}}));
    }
    let api: Api<ConfigMap> = Api::namespaced(kube.client(), "ns");
    let page = api.list(&kube::api::ListParams::default().limit(500)).await.unwrap();
    assert_eq!(page.items.len(), 500);
    assert!(page.metadata.continue_.is_some());
    let store = kube::runtime::reflector::store::Writer::<ConfigMap>::default();
    let reader = store.as_reader();
    let stream = kube::runtime::reflector(store, watcher(api, watcher::Config::default())).applied_objects().boxed();
    tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready()).await.unwrap().unwrap();
    assert_eq!(reader.state().len(), 1200);
}
