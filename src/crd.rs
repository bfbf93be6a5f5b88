//! The CRDs as YAML, generated from the Rust types (`agentops crd`, committed under `crds/`).

use kube::CustomResourceExt;

use crate::api::{AgentBudget, AgentExecution, AgentPolicy, AgentTemplate};

/// The CRDs as one multi-document YAML text, in the order `crds/` holds them.
pub fn crds_yaml() -> Result<String, serde_norway::Error> {
    let mut out = String::new();
    for crd in [AgentExecution::crd(), AgentTemplate::crd(), AgentPolicy::crd(), AgentBudget::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&crd)?);
    }
    Ok(out)
}
