//! What the controller keeps of a runner Job: enough to observe it (owner, suspended, how it
//! ended), decoded straight from the API's JSON. A Job of four step containers is ~7 KB of
//! JSON; this reads a few hundred bytes of it and skips the rest without allocating, so the
//! watch cache of 10,000 Jobs costs little to list, decode and keep (BENCHMARKS.md).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::{Deserialize, Deserializer};

/// A Job, as observing a runner reads it (`batch/v1` `jobs`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct JobState {
    #[serde(deserialize_with = "slim_meta", default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<JobStateSpec>,
    #[serde(default)]
    pub status: Option<JobStateStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct JobStateSpec {
    /// Set while Kueue has not admitted it.
    pub suspend: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct JobStateStatus {
    pub conditions: Option<Vec<JobStateCondition>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct JobStateCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: Option<String>,
}

/// The metadata fields a cache of Jobs needs (identity, version, owner); labels, annotations
/// and managedFields (as large as the spec on a real API server) are skipped.
fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        owner_references: Option<Vec<OwnerReference>>,
    }
    let w = Wire::deserialize(d)?;
    Ok(ObjectMeta {
        name: w.name,
        namespace: w.namespace,
        uid: w.uid,
        resource_version: w.resource_version,
        owner_references: w.owner_references,
        ..Default::default()
    })
}

impl k8s_openapi::Resource for JobState {
    const API_VERSION: &'static str = "batch/v1";
    const GROUP: &'static str = "batch";
    const KIND: &'static str = "Job";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "jobs";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for JobState {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_read_down_to_what_observing_it_needs() {
        let job = serde_json::json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "agentops-x", "namespace": "ns", "uid": "j1", "resourceVersion": "7",
                         "labels": {"a": "b"}, "managedFields": [{"manager": "m", "fieldsV1": {"f:spec": {}}}],
                         "ownerReferences": [{"apiVersion": "agentops.dev/v1alpha1", "kind": "AgentExecution",
                                              "name": "x", "uid": "u1", "controller": true}]},
            "spec": {"suspend": true, "template": {"spec": {"containers": [{"name": "finish", "image": "i"}]}}},
            "status": {"active": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                                    "message": "long text", "lastTransitionTime": "2026-11-26T00:00:00Z"}]}
        });
        let j: JobState = serde_json::from_value(job).unwrap();
        assert_eq!(j.metadata.name.as_deref(), Some("agentops-x"));
        assert_eq!(j.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(j.metadata.owner_references.as_ref().unwrap()[0].uid, "u1");
        assert!(j.metadata.labels.is_none() && j.metadata.managed_fields.is_none());
        assert_eq!(j.spec.unwrap().suspend, Some(true));
        let c = &j.status.unwrap().conditions.unwrap()[0];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_deref()),
            ("Failed", "True", Some("DeadlineExceeded"))
        );
    }
}
