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
    assert_eq!(cols, ["Phase", "Repo", "Branch", "Cost", "Tokens", "Turns", "Duration", "PR", "Age"]);
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
        // The CRD's CEL rules, as the apiserver would run them at `kubectl apply`.
        let spec = serde_json::to_value(&m.execution.spec).unwrap();
        agentops::api::AgentExecutionSpec::validate_cel(&spec, None)
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        for t in &m.templates {
            let spec = serde_json::to_value(&t.spec).unwrap();
            agentops::api::AgentTemplateSpec::validate_cel(&spec, None)
                .unwrap_or_else(|e| panic!("{}: the template: {e:?}", path.display()));
        }
        n += 1;
    }
    assert!(n >= 3, "found {n} examples");
}

/// The platform team's example uses every pod setting, and they reach its Job.
#[test]
fn the_platform_example_sets_every_pod_setting() {
    use agentops::controller::desired::{JobConfig, desired_job};
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/platform-team.yaml")).unwrap();
    let m = parse_manifest(&text).unwrap();
    let t = serde_json::to_value(&m.templates[0].spec.pod).unwrap();
    for field in [
        "agentImage",
        "imagePullSecrets",
        "nodeSelector",
        "tolerations",
        "runtimeClassName",
        "priorityClassName",
        "topologySpreadConstraints",
        "labels",
        "annotations",
        "resources",
        "env",
    ] {
        assert!(t.get(field).is_some(), "the example's template sets spec.pod.{field}");
    }
    let mut ax = m.execution.clone();
    ax.metadata.uid = Some("u".into());
    let r = resolve(&ax, &m.templates).unwrap();
    let job = serde_json::to_value(desired_job(&ax, &r, &JobConfig::default())).unwrap();
    let agent = job["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .unwrap()
        .clone();
    assert_eq!(agent["image"], "golang:1.23");
    assert_eq!(agent["resources"]["limits"]["memory"], "12Gi", "the execution's");
    assert_eq!(agent["resources"]["limits"]["ephemeral-storage"], "30Gi", "the template's");
    assert_eq!(agent["resources"]["requests"]["cpu"], "2");
}

mod cel {
    use agentops::api::AgentExecutionSpec;
    use serde_json::{Value, json};

    fn spec() -> Value {
        json!({"prompt": "p", "repository": {"url": "https://git.example.com/r.git"}})
    }

    fn with(mut v: Value, patch: Value) -> Value {
        json_patch::merge(&mut v, &patch);
        v
    }

    fn errors(v: &Value, old: Option<&Value>) -> String {
        match AgentExecutionSpec::validate_cel(v, old) {
            Ok(()) => String::new(),
            Err(e) => format!("{e:?}"),
        }
    }

    #[test]
    fn a_valid_spec_passes() {
        assert_eq!(errors(&spec(), None), "");
        assert_eq!(
            errors(
                &with(spec(), json!({"agent": {"maxTurns": 3, "maxBudgetUsd": 0.5}, "ttlSecondsAfterFinished": 0})),
                None
            ),
            ""
        );
    }

    #[test]
    fn prompt_or_template_is_required() {
        let no_prompt = with(spec(), json!({"prompt": null}));
        assert!(errors(&no_prompt, None).contains("spec.prompt, or spec.templateRef"));
        assert_eq!(errors(&with(no_prompt, json!({"templateRef": {"name": "t"}})), None), "");
    }

    #[test]
    fn url_scheme_is_checked() {
        let e = errors(&with(spec(), json!({"repository": {"url": "git@github.com:o/r.git"}})), None);
        assert!(e.contains("https:// or http://"), "{e}");
    }

    #[test]
    fn limits_must_be_positive() {
        assert!(errors(&with(spec(), json!({"agent": {"maxTurns": 0}})), None).contains("maxTurns"));
        assert!(errors(&with(spec(), json!({"agent": {"maxBudgetUsd": 0.0}})), None).contains("maxBudgetUsd"));
        assert!(errors(&with(spec(), json!({"repository": {"depth": -1}})), None).contains("depth"));
        assert!(
            errors(&with(spec(), json!({"ttlSecondsAfterFinished": -5})), None).contains("ttlSecondsAfterFinished")
        );
    }

    #[test]
    fn spec_is_immutable_except_cancel() {
        let old = spec();
        assert_eq!(errors(&with(old.clone(), json!({"cancel": true})), Some(&old)), "", "cancel may change");
        for change in [
            json!({"prompt": "other"}),
            json!({"repository": {"url": "https://git.example.com/other.git"}}),
            json!({"agent": {"model": "m"}}),
            json!({"timeout": "5m"}),
            json!({"priority": 3}),
            json!({"pod": {"nodeSelector": {"pool": "other"}}}),
        ] {
            let e = errors(&with(old.clone(), change.clone()), Some(&old));
            assert!(e.contains("immutable"), "{change}: {e}");
        }
        let cancelled = with(old.clone(), json!({"cancel": true}));
        assert!(
            errors(&with(cancelled.clone(), json!({"cancel": false})), Some(&cancelled)).contains("cannot be undone")
        );
    }

    #[test]
    fn the_rules_are_in_the_crd() {
        let crd = serde_json::to_string(&<agentops::api::AgentExecution as kube::CustomResourceExt>::crd()).unwrap();
        for needle in ["x-kubernetes-validations", "oldSelf", "has(self.prompt) || has(self.templateRef)"] {
            assert!(crd.contains(needle), "{needle}");
        }
    }
}
