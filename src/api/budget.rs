//! `AgentBudget`: a team's spend for a period (`day`, `week`, `month` in a time zone), over the
//! namespaces it names or selects, held live by the controller's gateway against every running
//! execution of those namespaces together. Pure: the period arithmetic and the checks.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ManifestError;

/// A team's budget for a period, shared by the executions of its namespaces.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "agentops.dev",
    version = "v1alpha1",
    kind = "AgentBudget",
    status = "AgentBudgetStatus",
    shortname = "abud",
    printcolumn = r#"{"name":"Spent","type":"number","jsonPath":".status.spentUsd"}"#,
    printcolumn = r#"{"name":"Limit","type":"number","jsonPath":".spec.limitUsd"}"#,
    printcolumn = r#"{"name":"Period","type":"string","jsonPath":".spec.period"}"#,
    printcolumn = r#"{"name":"Resets-At","type":"string","jsonPath":".status.resetsAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    cel,
    validation = Rule::new("has(self.namespaces) != has(self.namespaceSelector)").message("set exactly one of spec.namespaces and spec.namespaceSelector"),
    validation = Rule::new("self.limitUsd > 0.0 && self.limitUsd <= 10000000.0").message("spec.limitUsd must be positive and at most 10000000"),
)]
#[serde(rename_all = "camelCase")]
pub struct AgentBudgetSpec {
    /// The namespaces whose executions share this budget, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(max = 63)))]
    pub namespaces: Option<Vec<String>>,
    /// Or the namespaces whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// US dollars the executions of these namespaces may spend together in one period.
    pub limit_usd: f64,
    /// `day`, `week` (from Monday) or `month`.
    #[serde(default)]
    pub period: Period,
    /// The IANA time zone whose midnight starts a period, e.g. `Europe/Berlin`. Default `UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub time_zone: Option<String>,
}

/// The length of a budget's period.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Week,
    #[default]
    Month,
}

/// What the controller counted in the current period.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentBudgetStatus {
    /// Spent in the current period (the gateway's meter), US dollars.
    #[serde(default)]
    pub spent_usd: f64,
    #[serde(default)]
    pub limit_usd: f64,
    /// When the current period started and when it ends (RFC 3339, with the zone's offset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
    /// Executions of its namespaces running, and waiting for it.
    #[serde(default)]
    pub running: u64,
    #[serde(default)]
    pub waiting: u64,
    /// Requests the gateway refused because it was spent, this period.
    #[serde(default)]
    pub refused_requests: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Why it cannot be applied (a bad time zone or selector), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The period (its start) whose 80 % warning Event was raised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warned: Option<String>,
}

/// A period: when it starts and when the next one does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub start: Zoned,
    pub end: Zoned,
}

impl Window {
    /// The key the store keeps its spend under (the start, in UTC).
    pub fn key(&self) -> String {
        self.start.timestamp().to_string()
    }
}

/// The budget's time zone. Err names the field.
pub fn time_zone(spec: &AgentBudgetSpec) -> Result<TimeZone, ManifestError> {
    let name = spec.time_zone.as_deref().unwrap_or("UTC");
    TimeZone::get(name).map_err(|_| {
        ManifestError::new(
            "spec.timeZone",
            format!("{name:?} is not an IANA time zone; write e.g. UTC or Europe/Berlin"),
        )
    })
}

/// The period `now` falls in: days start at the zone's midnight (or the first instant of the
/// day where a DST change skips midnight), weeks on Monday, months on the 1st.
pub fn window(period: Period, tz: &TimeZone, now: Timestamp) -> Result<Window, String> {
    let today = now.to_zoned(tz.clone()).date();
    let first = match period {
        Period::Day => today,
        Period::Week => {
            today.checked_sub(i64::from(today.weekday().to_monday_zero_offset()).days()).map_err(|e| e.to_string())?
        }
        Period::Month => today.first_of_month(),
    };
    let next = match period {
        Period::Day => first.checked_add(1.day()),
        Period::Week => first.checked_add(7.days()),
        Period::Month => first.checked_add(1.month()),
    }
    .map_err(|e| e.to_string())?;
    let at = |d: Date| d.to_zoned(tz.clone()).map_err(|e| e.to_string());
    Ok(Window { start: at(first)?, end: at(next)? })
}

/// Checks a budget's values.
pub fn validate(b: &AgentBudget) -> Result<(), ManifestError> {
    let s = &b.spec;
    if s.namespaces.is_some() == s.namespace_selector.is_some() {
        return Err(ManifestError::new(
            "spec.namespaces",
            "set exactly one of spec.namespaces and spec.namespaceSelector",
        ));
    }
    if !(s.limit_usd.is_finite() && s.limit_usd > 0.0) {
        return Err(ManifestError::new("spec.limitUsd", format!("is {}; use a positive amount", s.limit_usd)));
    }
    if let Some(sel) = &s.namespace_selector {
        kube::core::Selector::try_from(sel.clone())
            .map_err(|e| ManifestError::new("spec.namespaceSelector", e.to_string()))?;
    }
    time_zone(s)?;
    Ok(())
}

/// Whether the budget covers namespace `ns` with these labels (a bad selector covers none; the
/// budget's status says why).
pub fn covers(b: &AgentBudget, ns: &str, labels: &std::collections::BTreeMap<String, String>) -> bool {
    use kube::core::SelectorExt;
    match (&b.spec.namespaces, &b.spec.namespace_selector) {
        (Some(names), _) => names.iter().any(|n| n == ns),
        (None, Some(sel)) => kube::core::Selector::try_from(sel.clone()).is_ok_and(|s| s.matches(labels)),
        (None, None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn periods_start_at_the_zones_midnight() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 2026-12-06 is a Sunday; 23:30 UTC is already Monday the 7th in Berlin.
        let w = window(Period::Day, &berlin, at("2026-12-06T23:30:00Z")).unwrap();
        assert_eq!(w.start.to_string(), "2026-12-07T00:00:00+01:00[Europe/Berlin]");
        assert_eq!(w.end.to_string(), "2026-12-08T00:00:00+01:00[Europe/Berlin]");
        let w = window(Period::Week, &berlin, at("2026-12-06T22:00:00Z")).unwrap();
        assert_eq!(w.start.date().to_string(), "2026-11-30", "still Sunday in Berlin: the week of Monday 30th");
        let w = window(Period::Week, &TimeZone::UTC, at("2026-12-07T00:00:00Z")).unwrap();
        assert_eq!((w.start.date().to_string(), w.end.date().to_string()), ("2026-12-07".into(), "2026-12-14".into()));
        let w = window(Period::Month, &TimeZone::UTC, at("2026-12-31T23:59:59Z")).unwrap();
        assert_eq!(
            (w.start.to_string(), w.end.to_string()),
            ("2026-12-01T00:00:00+00:00[UTC]".into(), "2027-01-01T00:00:00+00:00[UTC]".into())
        );
        // A day with a DST change is 23 hours long.
        let w = window(Period::Day, &berlin, at("2027-03-28T12:00:00Z")).unwrap();
        assert_eq!(w.end.timestamp().duration_since(w.start.timestamp()).as_secs(), 23 * 3600);
        assert_eq!(w.key(), "2027-03-27T23:00:00Z");
    }

    #[test]
    fn budgets_cover_named_or_selected_namespaces() {
        let b = |spec: &str| -> AgentBudget {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "b"}, "spec": serde_json::from_str::<serde_json::Value>(spec).unwrap()})).unwrap()
        };
        let labels = std::collections::BTreeMap::from([("team".to_string(), "pay".to_string())]);
        assert!(covers(&b(r#"{"namespaces": ["a"], "limitUsd": 1}"#), "a", &labels));
        assert!(!covers(&b(r#"{"namespaces": ["a"], "limitUsd": 1}"#), "b", &labels));
        assert!(covers(&b(r#"{"namespaceSelector": {"matchLabels": {"team": "pay"}}, "limitUsd": 1}"#), "x", &labels));
        assert!(validate(&b(r#"{"limitUsd": 1}"#)).is_err());
        let bad_tz = validate(&b(r#"{"namespaces": ["a"], "limitUsd": 1, "timeZone": "Mars/Olympus"}"#)).unwrap_err();
        assert_eq!(bad_tz.field, "spec.timeZone");
    }
}
