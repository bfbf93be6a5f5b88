//! The exact requests one reconcile sends (tower-test mock, as in kube-rs/controller-rs): the
//! JSON patch that takes an earlier version's finalizer off, the status server-side apply, and
//! the event.

use std::sync::Arc;

use agentops::api::AgentExecution;
use agentops::controller::events::{Events, Reporter};
use agentops::controller::{Context, ControllerConfig, Executor, reconcile};
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::reflector;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn context(client: kube::Client) -> Arc<Context> {
    let (cache, _writer) = reflector::store();
    let (wake, _) = tokio::sync::mpsc::unbounded_channel();
    let ledger = Arc::new(agentops::controller::ledger::Ledger::default());
    Arc::new(Context {
        events: Events::new(client.clone(), Reporter { controller: "agentops-controller".into(), instance: None }),
        client: client.clone(),
        config: ControllerConfig::default(),
        store: None,
        cache,
        executor: Executor::Job { jobs: vec![], ledger: ledger.clone() },
        ledger: ledger.clone(),
        secrets_seen: Default::default(),
        admit: Default::default(),
        wake,
        metrics: Default::default(),
        reports: Arc::new(agentops::controller::reports::Reports::new(
            client,
            tokio::sync::mpsc::unbounded_channel().0,
            ledger,
        )),
        policies: agentops::controller::policies::Policies::none(),
        budgets: agentops::controller::budgets::Budgets::none(),
    })
}

fn execution(finalized: bool) -> AgentExecution {
    let mut v = json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentExecution",
        "metadata": {"name": "x", "namespace": "ns", "uid": "u-1", "generation": 1, "resourceVersion": "7"},
        "spec": {"templateRef": {"name": "missing"}, "repository": {"url": "https://git.example.com/r.git"}}
    });
    if finalized {
        v["metadata"]["finalizers"] = json!(["agentops.dev/cleanup"]);
    }
    serde_json::from_value(v).unwrap()
}

async fn next(
    handle: &mut Handle,
) -> (String, String, Option<String>, Value, tower_test::mock::SendResponse<Response<Body>>) {
    let (req, send) = handle.next_request().await.expect("a request");
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let ctype = req.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
    let body = req.into_body().collect_bytes().await.unwrap();
    let v = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap() };
    (method, uri, ctype, v, send)
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, status: u16, body: Value) {
    send.send_response(
        Response::builder().status(status).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap(),
    );
}

/// Executions from an earlier version carry the `agentops.dev/cleanup` finalizer: it is taken
/// off with a JSON patch guarded by a `test` of that very entry (another controller's
/// finalizer beside it stays), and nothing else is sent.
#[tokio::test]
async fn a_finalizer_of_an_earlier_version_is_taken_off_with_a_guarded_json_patch() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let ctx = context(client);
    let mut old = execution(true);
    old.metadata.finalizers = Some(vec!["example.com/other".into(), "agentops.dev/cleanup".into()]);
    let server = tokio::spawn(async move {
        let (method, uri, ctype, body, send) = next(&mut handle).await;
        assert_eq!(method, "PATCH");
        assert_eq!(uri, "/apis/agentops.dev/v1alpha1/namespaces/ns/agentexecutions/x?");
        assert_eq!(ctype.as_deref(), Some("application/json-patch+json"));
        assert_eq!(
            body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/1", "value": "agentops.dev/cleanup"},
                {"op": "remove", "path": "/metadata/finalizers/1"}
            ])
        );
        respond(send, 200, serde_json::to_value(execution(false)).unwrap());
        handle
    });
    let action = reconcile(Arc::new(old), ctx).await.unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change(), "the patch's watch event comes back");
    let mut handle = server.await.unwrap();
    // Nothing more was sent.
    let more = tokio::time::timeout(std::time::Duration::from_millis(100), handle.next_request()).await;
    assert!(more.ok().flatten().is_none(), "one request");
}

#[tokio::test]
async fn a_missing_template_is_applied_as_stalled_status_with_an_event() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let ctx = context(client);
    let server = tokio::spawn(async move {
        let (method, uri, _, _, send) = next(&mut handle).await;
        assert_eq!(
            (method.as_str(), uri.as_str()),
            ("GET", "/apis/agentops.dev/v1alpha1/namespaces/ns/agenttemplates/missing")
        );
        respond(
            send,
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
        );

        let (method, uri, ctype, body, send) = next(&mut handle).await;
        assert_eq!(method, "PATCH");
        assert_eq!(
            uri,
            "/apis/agentops.dev/v1alpha1/namespaces/ns/agentexecutions/x/status?&force=true&fieldManager=agentops-controller"
        );
        assert_eq!(ctype.as_deref(), Some("application/apply-patch+yaml"));
        assert_eq!(body["apiVersion"], "agentops.dev/v1alpha1");
        assert_eq!(body["kind"], "AgentExecution");
        let st = &body["status"];
        assert_eq!((st["phase"].as_str(), st["reason"].as_str()), (Some("Pending"), Some("TemplateNotFound")));
        assert_eq!(st["observedGeneration"], 1);
        let stalled = st["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Stalled").unwrap();
        assert_eq!((stalled["status"].as_str(), stalled["reason"].as_str()), (Some("True"), Some("TemplateNotFound")));
        assert!(stalled["message"].as_str().unwrap().contains(r#""missing""#));
        respond(send, 200, serde_json::to_value(execution(true)).unwrap());

        let (method, uri, _, body, send) = next(&mut handle).await;
        assert_eq!((method.as_str(), uri.as_str()), ("POST", "/apis/events.k8s.io/v1/namespaces/ns/events?"));
        assert_eq!((body["type"].as_str(), body["reason"].as_str()), (Some("Warning"), Some("TemplateNotFound")));
        assert_eq!(body["regarding"]["name"], "x");
        assert_eq!(body["reportingController"], "agentops-controller");
        respond(send, 201, body);
    });
    let action = reconcile(Arc::new(execution(false)), ctx).await.unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(10)),
        "looks again for the template"
    );
    server.await.unwrap();
}
