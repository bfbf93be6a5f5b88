//! Kubernetes Events (events.k8s.io/v1) for the executions' transitions: what `kubectl
//! describe` shows.
//!
//! Why not kube-runtime's `Recorder`: it keeps every event it published for six minutes, to
//! turn repeats into an `EventSeries`, and scans that whole cache on every publish. At 10,000
//! executions that is 10,000 events held and 10,000 scanned per start (measured in
//! BENCHMARKS.md). Our events mark transitions, which `decide` emits once each, so there is
//! nothing to aggregate: each is one `create`, and nothing is kept.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};

use super::decide::Note;

/// Who publishes (`reportingController`, `reportingInstance`).
#[derive(Debug, Clone)]
pub struct Reporter {
    pub controller: String,
    pub instance: Option<String>,
}

/// Publishes events; holds no state per object.
#[derive(Clone)]
pub struct Events {
    client: Client,
    reporter: Reporter,
}

/// The Event object for `note` about `regarding` by `reporter` at `now`; `action` is what
/// the controller did (PascalCase).
pub fn render(
    reporter: &Reporter,
    note: &Note,
    action: &str,
    regarding: &ObjectReference,
    now: jiff::Timestamp,
) -> K8sEvent {
    let object = regarding.name.clone().unwrap_or_else(|| reporter.controller.clone());
    K8sEvent {
        metadata: ObjectMeta {
            namespace: regarding.namespace.clone(),
            // Unique per object and instant, like client-go's recorder.
            name: Some(format!("{object}.{:x}", now.as_nanosecond())),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some(action.into()),
        reason: Some(note.reason.chars().take(128).collect()),
        note: Some(crate::api::report::truncate(&crate::api::text::clean(&note.message), MAX_NOTE - 32)),
        type_: Some(if note.warning { "Warning" } else { "Normal" }.into()),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(reporter.instance.clone().unwrap_or_else(|| reporter.controller.clone())),
        ..Default::default()
    }
}

/// The API server refuses a note over 1 KiB.
const MAX_NOTE: usize = 1024;

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self { client, reporter }
    }

    /// Creates the event in the object's namespace.
    pub async fn publish(&self, note: &Note, action: &str, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let event = render(&self.reporter, note, action, regarding, jiff::Timestamp::now());
        let ns = regarding.namespace.as_deref().unwrap_or("default");
        match Api::<K8sEvent>::namespaced(self.client.clone(), ns).create(&PostParams::default(), &event).await {
            Ok(_) => Ok(()),
            // The same object and nanosecond twice: the first one says it.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_names_its_object_its_reporter_and_is_bounded() {
        let reporter = Reporter { controller: "agentops-controller".into(), instance: None };
        let regarding = ObjectReference {
            kind: Some("AgentExecution".into()),
            name: Some("fix-bug".into()),
            namespace: Some("team-a".into()),
            uid: Some("u1".into()),
            ..Default::default()
        };
        let ev = Note { warning: true, reason: "Failed".into(), message: "x".repeat(5000) };
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let e = render(&reporter, &ev, "Reconcile", &regarding, now);
        assert_eq!(e.metadata.namespace.as_deref(), Some("team-a"));
        assert!(e.metadata.name.as_deref().unwrap().starts_with("fix-bug."));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.regarding.as_ref().and_then(|r| r.uid.as_deref()), Some("u1"));
        assert_eq!(e.reporting_instance.as_deref(), Some("agentops-controller"));
        assert!(e.note.unwrap().len() <= MAX_NOTE);
        let later = render(
            &reporter,
            &ev,
            "Reconcile",
            &regarding,
            now.checked_add(jiff::SignedDuration::from_nanos(1)).unwrap(),
        );
        assert_ne!(e.metadata.name, later.metadata.name, "two events never share a name");
    }
}
