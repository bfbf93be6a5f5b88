//! The committed CRDs match the Rust types, and every example manifest is valid.

use agentops::api::{parse_manifest, resolve};

#[test]
fn committed_crds_match_the_types() {
    let generated = agentops::crd::crds_yaml().unwrap();
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/agentops.yaml")).unwrap();
    assert!(
        generated == committed,
        "crds/agentops.yaml is stale: run `cargo run -- crd > crds/agentops.yaml` and commit it"
    );
}

#[test]
fn crd_has_status_printer_columns_and_short_name() {
    let crd: serde_json::Value =
        serde_json::to_value(<agentops::api::AgentExecution as kube::CustomResourceExt>::crd()).unwrap();
    let v = &crd["spec"]["versions"][0];
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "ax");
    assert!(v["subresources"]["status"].is_object());
    let cols: Vec<&str> =
        v["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(cols, ["Phase", "Repo", "Branch", "Cost", "Tokens", "Turns", "Duration", "Age"]);
}

#[test]
fn every_example_manifest_parses_and_resolves() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let m = parse_manifest(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        resolve(&m.execution, &m.templates).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        n += 1;
    }
    assert!(n >= 3, "found {n} examples");
}
