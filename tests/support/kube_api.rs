//! An in-memory Kubernetes API server for tests, speaking the real HTTP API on 127.0.0.1:
//! list, watch (newline-delimited JSON from a resourceVersion), get, create, replace, delete,
//! merge / JSON / apply patches, the status subresource, finalizers with deletionTimestamp,
//! ownerReference cascade on delete, and 409 on a stale resourceVersion.
//!
//! Every resource behaves the same (generic JSON objects). Server-side apply merges the applied
//! configuration, creates the object when it is missing, and keeps each field manager's set of
//! fields (per object, and apart for `/status`): a field a manager applied before and no longer
//! applies is removed, unless another manager applied it too (as the real one does; lists are
//! atomic, as in a merge patch). Tests play the kubelet and the Job controller by patching
//! `/status`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Response, Uri};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Identity of a stored object: (group/version path prefix, plural, namespace, name).
type Key = (String, String, String, String);

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: &'static str,
    key: Key,
    object: Value,
}

#[derive(Default)]
struct Store {
    /// Injected failures: (method, path fragment, status, remaining count).
    faults: Vec<(String, String, u16, usize)>,
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Server-side apply: the fields (JSON pointers of leaves) each manager applied last, by
    /// object and whether through `/status`.
    owned: BTreeMap<(Key, String, bool), std::collections::BTreeSet<String>>,
    history: Vec<Event>,
    requests: Vec<(String, String)>,
    /// What each request needs authorised, as RBAC names it (see `Verb`).
    verbs: Vec<Verb>,
    /// Bearer tokens the cluster accepts: token → (user, namespaces it may read; "*" = all).
    readers: BTreeMap<String, (String, Vec<String>)>,
}

/// (API group, resource, verb, namespace or "" for cluster scope, object name or "" when the
/// request names none).
pub type Verb = (String, String, String, String, String);

struct Shared {
    store: Mutex<Store>,
    tx: broadcast::Sender<Event>,
}

/// A running fake API server.
#[derive(Clone)]
pub struct FakeKube {
    pub url: String,
    shared: Arc<Shared>,
}

/// A parsed request path.
struct Target {
    prefix: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (format!("api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, status) = match rest {
        [plural] => (plural.to_string(), None, false),
        [plural, name] => (plural.to_string(), Some(name.to_string()), false),
        [plural, name, "status"] => (plural.to_string(), Some(name.to_string()), true),
        _ => return None,
    };
    Some(Target { prefix, plural, namespace, name, status })
}

fn status_body(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("response")
}

fn ok(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .expect("response")
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn labels_match(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &obj["metadata"]["labels"];
    sel.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => labels[k.trim_end_matches('=')].as_str() == Some(v),
        None => !labels[term].is_null(),
    })
}

/// RFC 7386 merge patch.
/// The JSON pointers of the leaves of an applied configuration (objects are walked, lists and
/// scalars are leaves), under `at`.
fn leaves(v: &Value, at: &str, out: &mut std::collections::BTreeSet<String>) {
    match v.as_object() {
        Some(o) if !o.is_empty() => {
            for (k, child) in o {
                if at.is_empty() && matches!(k.as_str(), "apiVersion" | "kind") {
                    continue;
                }
                if at == "/metadata" && matches!(k.as_str(), "name" | "namespace" | "resourceVersion" | "uid") {
                    continue;
                }
                leaves(child, &format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        _ => {
            out.insert(at.to_string());
        }
    }
}

/// Removes the field at a JSON pointer, if it is there.
fn remove_at(doc: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else { return };
    let key = last.replace("~1", "/").replace("~0", "~");
    if let Some(Value::Object(o)) = doc.pointer_mut(parent) {
        o.remove(&key);
    }
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl FakeKube {
    /// Starts the server.
    pub async fn start() -> Self {
        let (tx, _) = broadcast::channel(65536);
        let shared = Arc::new(Shared { store: Mutex::new(Store::default()), tx });
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url: format!("http://{addr}"), shared }
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut config = kube::Config::new(self.url.parse().expect("url"));
        config.default_namespace = "default".into();
        kube::Client::try_from(config).expect("client")
    }

    /// Writes a kubeconfig for this server whose user signs in with `token`; returns its path.
    pub fn kubeconfig(&self, dir: &std::path::Path, token: &str) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\nusers: [{{name: u, user: {{token: \"{token}\"}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u, namespace: default}}}}]\ncurrent-context: c\n",
            self.url
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }

    /// A stored object, by API prefix (`api/v1`, `apis/batch/v1`), plural, namespace, name.
    pub fn get(&self, prefix: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let s = self.shared.store.lock().expect("lock");
        s.objects.get(&(prefix.into(), plural.into(), ns.into(), name.into())).cloned()
    }

    /// All stored objects of a kind in a namespace.
    pub fn list(&self, prefix: &str, plural: &str, ns: &str) -> Vec<Value> {
        let s = self.shared.store.lock().expect("lock");
        s.objects
            .iter()
            .filter(|((p, pl, n, _), _)| p == prefix && pl == plural && n == ns)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Makes the next `count` requests with this method whose path contains `fragment` fail
    /// with `status` (409 Conflict, 500, ...), as a busy or racing API server would.
    pub fn fail_next(&self, method: &str, fragment: &str, status: u16, count: usize) {
        self.shared.store.lock().expect("lock").faults.push((method.into(), fragment.into(), status, count));
    }

    /// Makes the cluster accept `token` as `user`, who may get and list AgentExecutions in
    /// `namespaces` ("*": in every namespace). TokenReview and SubjectAccessReview answer so.
    pub fn allow_reader(&self, token: &str, user: &str, namespaces: &[&str]) {
        let ns = namespaces.iter().map(|n| n.to_string()).collect();
        self.shared.store.lock().expect("lock").readers.insert(token.into(), (user.into(), ns));
    }

    /// The RBAC permissions the requests so far needed, in order: (group, resource, verb,
    /// namespace, name), as the API server's authorizer sees them: the name is empty for list,
    /// watch and create; a server-side apply that creates the object also needs `create`; the
    /// reviews are cluster-scoped `create`s. `verbs_used()[n..]` are those of the requests after
    /// the n-th.
    pub fn verbs_used(&self) -> Vec<Verb> {
        self.shared.store.lock().expect("lock").verbs.clone()
    }

    /// Requests seen so far, as (method, path and query).
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.store.lock().expect("lock").requests.clone()
    }

    /// Merge-patches an object's status as a controller of ours would not: the kubelet or the
    /// Job controller in a real cluster.
    pub fn patch_status(&self, prefix: &str, plural: &str, ns: &str, name: &str, status: Value) {
        let mut s = self.shared.store.lock().expect("lock");
        let key = (prefix.to_string(), plural.to_string(), ns.to_string(), name.to_string());
        let Some(mut obj) = s.objects.get(&key).cloned() else { panic!("no {plural} {ns}/{name}") };
        merge(&mut obj["status"], &status);
        commit(&self.shared, &mut s, key, obj, "MODIFIED");
    }

    /// Creates or replaces an object directly (as another client would).
    pub fn put(&self, prefix: &str, plural: &str, obj: Value) {
        let mut s = self.shared.store.lock().expect("lock");
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        let name = obj["metadata"]["name"].as_str().expect("name").to_string();
        let key = (prefix.to_string(), plural.to_string(), ns, name);
        let kind = if s.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        let obj = prepare_new(&mut s, obj, &key, kind == "ADDED");
        commit(&self.shared, &mut s, key, obj, kind);
    }
}

/// TokenReview and SubjectAccessReview, answered from `allow_reader`.
fn review(shared: &Shared, path: &str, body: &[u8]) -> Response<Body> {
    let mut review: Value = serde_json::from_slice(body).unwrap_or_default();
    let s = shared.store.lock().expect("lock");
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        review["status"] = match s.readers.get(token) {
            Some((user, _)) => {
                json!({"authenticated": true, "user": {"username": user, "groups": ["system:authenticated"]}})
            }
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        return ok(201, &review);
    }
    if path == "/apis/authorization.k8s.io/v1/subjectaccessreviews" {
        let spec = &review["spec"];
        let attrs = &spec["resourceAttributes"];
        let user = spec["user"].as_str().unwrap_or_default();
        let ns = attrs["namespace"].as_str().unwrap_or_default();
        let resource_ok = attrs["group"] == "agentops.dev"
            && attrs["resource"] == "agentexecutions"
            && matches!(attrs["verb"].as_str(), Some("get" | "list"));
        let allowed = resource_ok
            && s.readers
                .values()
                .any(|(u, namespaces)| u == user && namespaces.iter().any(|n| n == "*" || (!ns.is_empty() && n == ns)));
        review["status"] = json!({"allowed": allowed});
        return ok(201, &review);
    }
    status_body(404, "NotFound", &format!("no route {path}"))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Fills in server-owned metadata of a new object.
fn prepare_new(s: &mut Store, mut obj: Value, key: &Key, fresh: bool) -> Value {
    let m = &mut obj["metadata"];
    m["namespace"] = if key.2.is_empty() { Value::Null } else { json!(key.2) };
    if m["namespace"].is_null() {
        m.as_object_mut().map(|o| o.remove("namespace"));
    }
    m["name"] = json!(key.3);
    if fresh || m["uid"].is_null() {
        if let Some(old) = s.objects.get(key) {
            m["uid"] = old["metadata"]["uid"].clone();
            m["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
        } else {
            m["uid"] = json!(uuid::Uuid::new_v4().to_string());
            m["creationTimestamp"] = json!(now());
        }
    }
    if m["generation"].is_null() {
        m["generation"] = json!(1);
    }
    obj
}

/// Stores an object with a new resourceVersion, records and broadcasts the event; removes it
/// instead when it is being deleted and has no finalizers left (cascading to its dependents).
fn commit(shared: &Shared, s: &mut Store, key: Key, mut obj: Value, kind: &'static str) -> Value {
    s.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    let finalizers_left = obj["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
    if !obj["metadata"]["deletionTimestamp"].is_null() && !finalizers_left {
        remove(shared, s, &key);
        return obj;
    }
    s.objects.insert(key.clone(), obj.clone());
    let ev = Event { rv: s.rv, kind, key, object: obj.clone() };
    s.history.push(ev.clone());
    let _ = shared.tx.send(ev);
    obj
}

/// Deletes an object now, and every object it owns (background cascade).
fn remove(shared: &Shared, s: &mut Store, key: &Key) {
    let Some(mut obj) = s.objects.remove(key) else {
        return;
    };
    s.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    let ev = Event { rv: s.rv, kind: "DELETED", key: key.clone(), object: obj.clone() };
    s.history.push(ev.clone());
    let _ = shared.tx.send(ev);
    let uid = obj["metadata"]["uid"].clone();
    let owned: Vec<Key> = s
        .objects
        .iter()
        .filter(|(_, o)| {
            o["metadata"]["ownerReferences"].as_array().is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in owned {
        delete(shared, s, &k);
    }
}

/// A delete request: finalizers hold the object with a deletionTimestamp.
fn delete(shared: &Shared, s: &mut Store, key: &Key) -> Option<Value> {
    let mut obj = s.objects.get(key).cloned()?;
    let has_finalizers = obj["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
    if has_finalizers {
        if obj["metadata"]["deletionTimestamp"].is_null() {
            obj["metadata"]["deletionTimestamp"] = json!(now());
            return Some(commit(shared, s, key.clone(), obj, "MODIFIED"));
        }
        return Some(obj);
    }
    remove(shared, s, key);
    Some(obj)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let path = uri.path().to_string();
    {
        let mut s = shared.store.lock().expect("lock");
        s.requests.push((method.to_string(), uri.to_string()));
        let path = uri.path().to_string();
        if let Some(f) = s.faults.iter_mut().find(|f| f.3 > 0 && f.0 == method.as_str() && path.contains(&f.1)) {
            f.3 -= 1;
            let code = f.2;
            let reason = if code == 409 { "Conflict" } else { "InternalError" };
            return status_body(code, reason, "injected failure");
        }
    }
    if method == Method::POST && (path.ends_with("/tokenreviews") || path.ends_with("/subjectaccessreviews")) {
        let (group, resource) = path.trim_start_matches("/apis/").split_once("/v1/").unwrap_or_default();
        let verb = (group.to_string(), resource.to_string(), "create".into(), String::new(), String::new());
        shared.store.lock().expect("lock").verbs.push(verb);
        return review(&shared, &path, &body);
    }
    let Some(t) = parse_path(&path) else {
        return status_body(404, "NotFound", &format!("no route {path}"));
    };
    let q = query(&uri);
    let ns = t.namespace.clone().unwrap_or_default();
    {
        let group = t.prefix.strip_prefix("apis/").and_then(|g| g.split('/').next()).unwrap_or_default().to_string();
        let resource = if t.status { format!("{}/status", t.plural) } else { t.plural.clone() };
        let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (&method, t.name.is_some()) {
            (&Method::GET, false) if watching => "watch",
            (&Method::GET, false) => "list",
            (&Method::GET, true) => "get",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, false) => "deletecollection",
            (&Method::DELETE, true) => "delete",
            _ => "other",
        };
        let mut s = shared.store.lock().expect("lock");
        let name = t.name.clone().unwrap_or_default();
        let creates = method == Method::PATCH
            && headers.get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|c| c.contains("apply-patch"))
            && !s.objects.contains_key(&(t.prefix.clone(), t.plural.clone(), ns.clone(), name));
        // The authorizer sees no name for a create (POST to the collection) nor a list.
        let named = t.name.clone().filter(|_| method != Method::POST).unwrap_or_default();
        s.verbs.push((group.clone(), resource.clone(), verb.into(), ns.clone(), named.clone()));
        if creates {
            // The apiserver authorises the create an apply makes with the object's name.
            s.verbs.push((group, resource, "create".into(), ns.clone(), named));
        }
    }

    if method == Method::GET && t.name.is_none() {
        if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
            return watch(shared, t, q).await;
        }
        let s = shared.store.lock().expect("lock");
        // Pages of `limit`, as the apiserver serves them; `continue` is the number already sent.
        let skip: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
        let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
        let matching = s
            .objects
            .iter()
            .filter(|((p, pl, n, _), o)| {
                *p == t.prefix
                    && *pl == t.plural
                    && (t.namespace.is_none() || *n == ns)
                    && labels_match(o, q.get("labelSelector"))
            })
            .map(|(_, o)| o);
        let mut items: Vec<&Value> = matching.skip(skip).take(limit.saturating_add(1)).collect();
        let more = items.len() > limit;
        items.truncate(limit);
        let mut meta = json!({"resourceVersion": s.rv.to_string()});
        if more {
            meta["continue"] = json!((skip + limit).to_string());
        }
        // Serialized from the stored objects themselves: a copy of every listed object (then
        // dropped) was most of a large list's cost, and the benches measure the controller.
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct List<'a> {
            api_version: &'static str,
            kind: &'static str,
            metadata: Value,
            items: Vec<&'a Value>,
        }
        let list = List { api_version: "v1", kind: "List", metadata: meta, items };
        let body = serde_json::to_vec(&list).expect("a list serializes");
        return Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("response");
    }

    let ctype = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let parsed: Value = if ctype.contains("yaml") {
        serde_norway::from_slice(&body).unwrap_or(Value::Null)
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    let mut s = shared.store.lock().expect("lock");
    let name = t.name.clone().or_else(|| parsed["metadata"]["name"].as_str().map(String::from)).unwrap_or_default();
    let key: Key = (t.prefix.clone(), t.plural.clone(), ns.clone(), name.clone());
    let existing = s.objects.get(&key).cloned();
    let not_found = || status_body(404, "NotFound", &format!("{} \"{}\" not found", t.plural, name));

    match method {
        Method::GET => match existing {
            Some(o) => ok(200, &o),
            None => not_found(),
        },
        Method::POST => {
            if existing.is_some() {
                return status_body(409, "AlreadyExists", &format!("{} \"{}\" already exists", t.plural, name));
            }
            if name.is_empty() {
                return status_body(422, "Invalid", "metadata.name: Required value");
            }
            let mut parsed = parsed;
            if t.plural == "secrets" {
                // As the API server does: stringData is write-only, merged into data (base64).
                use base64::Engine;
                if let Some(strings) = parsed.as_object_mut().and_then(|o| o.remove("stringData"))
                    && let Some(strings) = strings.as_object()
                {
                    for (k, v) in strings {
                        let b64 = base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or_default());
                        parsed["data"][k] = Value::String(b64);
                    }
                }
            }
            let obj = prepare_new(&mut s, parsed, &key, true);
            let obj = commit(&shared, &mut s, key, obj, "ADDED");
            ok(201, &obj)
        }
        Method::PUT => {
            let Some(old) = existing else {
                return not_found();
            };
            if let Some(rv) = parsed["metadata"]["resourceVersion"].as_str()
                && Some(rv) != old["metadata"]["resourceVersion"].as_str()
            {
                return status_body(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            let new = update(&old, parsed, t.status, |o, p| *o = p.clone());
            let obj = commit(&shared, &mut s, key, new, "MODIFIED");
            ok(200, &obj)
        }
        Method::PATCH => {
            let apply = ctype.contains("apply-patch");
            let Some(old) = existing.or_else(|| apply.then(|| json!({"metadata": {}}))) else {
                return not_found();
            };
            let fresh = old["metadata"]["uid"].is_null();
            if let Some(rv) = parsed["metadata"]["resourceVersion"].as_str()
                && !fresh
                && Some(rv) != old["metadata"]["resourceVersion"].as_str()
            {
                return status_body(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            let new = if ctype.contains("json-patch") {
                let mut doc = old.clone();
                // Like the apiserver's JSON patch, a `test` for null passes on a missing path
                // (kube's finalizer helper relies on it).
                let ops: Vec<Value> = parsed
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|op| {
                        !(op["op"] == "test"
                            && op["value"].is_null()
                            && op["path"].as_str().is_some_and(|p| doc.pointer(p).is_none()))
                    })
                    .collect();
                let Ok(p) = serde_json::from_value::<json_patch::Patch>(Value::Array(ops)) else {
                    return status_body(400, "BadRequest", "bad JSON patch");
                };
                if let Err(e) = json_patch::patch(&mut doc, &p) {
                    return status_body(422, "Invalid", &format!("JSON patch failed: {e}"));
                }
                doc
            } else if apply {
                // Field ownership: what this manager applied last time and not now goes, unless
                // another manager applied it too.
                let manager = q.get("fieldManager").cloned().unwrap_or_default();
                let applied = if t.status {
                    json!({"status": parsed["status"].clone()})
                } else {
                    let mut a = parsed.clone();
                    a.as_object_mut().map(|o| o.remove("status"));
                    a
                };
                let mut now = std::collections::BTreeSet::new();
                leaves(&applied, "", &mut now);
                if fresh {
                    s.owned.retain(|(k, _, _), _| *k != key);
                }
                let mine = (key.clone(), manager.clone(), t.status);
                let before = s.owned.get(&mine).cloned().unwrap_or_default();
                let others: std::collections::BTreeSet<String> = s
                    .owned
                    .iter()
                    .filter(|((k, m, _), _)| *k == key && *m != manager)
                    .flat_map(|(_, f)| f.iter().cloned())
                    .collect();
                let mut pruned = old.clone();
                for gone in before.difference(&now).filter(|f| !others.contains(*f)) {
                    remove_at(&mut pruned, gone);
                }
                s.owned.insert(mine, now);
                update(&pruned, parsed, t.status, merge)
            } else {
                update(&old, parsed, t.status, merge)
            };
            let new = if fresh { prepare_new(&mut s, new, &key, true) } else { new };
            let obj = commit(&shared, &mut s, key, new, if fresh { "ADDED" } else { "MODIFIED" });
            ok(if fresh { 201 } else { 200 }, &obj)
        }
        Method::DELETE => {
            // DeleteOptions.preconditions.uid, as the API server checks it: a delete meant for
            // one object never takes a newer one of the same name (409 Conflict).
            let wanted = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|b| b["preconditions"]["uid"].as_str().map(String::from));
            if let (Some(uid), Some(obj)) = (wanted, s.objects.get(&key))
                && obj["metadata"]["uid"].as_str() != Some(uid.as_str())
            {
                return status_body(409, "Conflict", "Precondition failed: UID in precondition does not match");
            }
            match delete(&shared, &mut s, &key) {
                Some(o) => ok(200, &o),
                None => not_found(),
            }
        }
        _ => status_body(405, "MethodNotAllowed", "method not allowed"),
    }
}

/// Applies a write: to the status only for `/status`, else to everything but the status
/// (the status subresource), bumping the generation when the spec changes.
fn update(old: &Value, patch: Value, status_only: bool, write: impl Fn(&mut Value, &Value)) -> Value {
    let mut new = old.clone();
    if status_only {
        let mut status = old["status"].clone();
        if status.is_null() {
            status = json!({});
        }
        write(&mut status, &patch["status"]);
        new["status"] = status;
        return new;
    }
    let keep_status = old["status"].clone();
    let keep_meta = old["metadata"].clone();
    write(&mut new, &patch);
    new["status"] = keep_status;
    if new["status"].is_null() {
        new.as_object_mut().map(|o| o.remove("status"));
    }
    for k in ["uid", "creationTimestamp", "deletionTimestamp", "generation", "resourceVersion"] {
        new["metadata"][k] = keep_meta[k].clone();
        if new["metadata"][k].is_null() {
            new["metadata"].as_object_mut().map(|o| o.remove(k));
        }
    }
    if new.get("spec") != old.get("spec") && !old["metadata"]["uid"].is_null() {
        new["metadata"]["generation"] = json!(old["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
    }
    new
}

async fn watch(shared: Arc<Shared>, t: Target, q: BTreeMap<String, String>) -> Response<Body> {
    let since: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = q.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290u64);
    let selector = q.get("labelSelector").cloned();
    let (history, rx) = {
        let s = shared.store.lock().expect("lock");
        let rx = shared.tx.subscribe();
        let h: Vec<Event> = s.history.iter().filter(|e| e.rv > since).cloned().collect();
        (h, rx)
    };
    let wanted = move |e: &Event| {
        e.key.0 == t.prefix
            && e.key.1 == t.plural
            && t.namespace.as_ref().is_none_or(|n| *n == e.key.2)
            && labels_match(&e.object, selector.as_ref())
    };
    let last_history = history.last().map(|e| e.rv).unwrap_or(since);
    let wanted2 = wanted.clone();
    let live = tokio_stream_from(rx).filter(move |e| futures::future::ready(e.rv > last_history && wanted2(e)));
    let events = futures::stream::iter(history.into_iter().filter(move |e| wanted(e))).chain(live);
    let lines = events
        .map(|e| {
            Ok::<_, std::convert::Infallible>(Bytes::from(format!("{}\n", json!({"type": e.kind, "object": e.object}))))
        })
        .take_until(tokio::time::sleep(Duration::from_secs(timeout)));
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(lines))
        .expect("response")
}

/// A broadcast receiver as a stream; ends when the receiver lags (the client re-watches).
fn tokio_stream_from(rx: broadcast::Receiver<Event>) -> impl futures::Stream<Item = Event> {
    futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(e) => Some((e, rx)),
            Err(_) => None,
        }
    })
}
