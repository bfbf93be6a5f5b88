//! Which waiting executions may start now: concurrency limits (global and per namespace),
//! order by priority (higher first) then creation time (older first). Pure.

use std::collections::HashMap;

/// An execution as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub namespace: String,
    pub name: String,
    pub priority: i32,
    /// RFC 3339 creation time (sorts correctly as text).
    pub created: String,
    /// Holds a slot: its Job exists and has not finished.
    pub active: bool,
}

/// Concurrency limits; None means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub global: Option<usize>,
    pub per_namespace: Option<usize>,
}

/// The decision for the waiting executions, in queue order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Start these now.
    pub start: Vec<(String, String)>,
    /// Keep these Queued, with their 1-based position.
    pub queued: Vec<((String, String), usize)>,
}

/// Decides which waiting executions start, given those already active.
pub fn plan(all: &[Candidate], limits: Limits) -> Plan {
    let mut global = all.iter().filter(|c| c.active).count();
    let mut per_ns: HashMap<&str, usize> = HashMap::new();
    for c in all.iter().filter(|c| c.active) {
        *per_ns.entry(c.namespace.as_str()).or_default() += 1;
    }
    let mut waiting: Vec<&Candidate> = all.iter().filter(|c| !c.active).collect();
    waiting.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.created.cmp(&b.created))
            .then_with(|| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
    });
    let mut out = Plan { start: Vec::new(), queued: Vec::new() };
    for c in waiting {
        let ns = per_ns.entry(c.namespace.as_str()).or_default();
        let fits = limits.global.is_none_or(|g| global < g) && limits.per_namespace.is_none_or(|n| *ns < n);
        let key = (c.namespace.clone(), c.name.clone());
        if fits {
            global += 1;
            *ns += 1;
            out.start.push(key);
        } else {
            let pos = out.queued.len() + 1;
            out.queued.push((key, pos));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(ns: &str, name: &str, priority: i32, created: &str, active: bool) -> Candidate {
        Candidate { namespace: ns.into(), name: name.into(), priority, created: created.into(), active }
    }

    fn names(v: &[(String, String)]) -> Vec<&str> {
        v.iter().map(|(_, n)| n.as_str()).collect()
    }

    #[test]
    fn two_slots_five_executions_start_oldest_first() {
        let all: Vec<_> =
            (0..5).map(|i| c("a", &format!("e{i}"), 0, &format!("2026-01-01T00:00:0{i}Z"), false)).collect();
        let p = plan(&all, Limits { global: Some(2), per_namespace: None });
        assert_eq!(names(&p.start), ["e0", "e1"]);
        assert_eq!(
            p.queued.iter().map(|(k, pos)| (k.1.as_str(), *pos)).collect::<Vec<_>>(),
            [("e2", 1), ("e3", 2), ("e4", 3)]
        );
    }

    #[test]
    fn priority_beats_age_and_active_ones_hold_slots() {
        let all = vec![
            c("a", "running", 0, "2026-01-01T00:00:00Z", true),
            c("a", "old-low", 0, "2026-01-01T00:00:01Z", false),
            c("a", "new-high", 10, "2026-01-01T00:00:09Z", false),
        ];
        let p = plan(&all, Limits { global: Some(2), per_namespace: None });
        assert_eq!(names(&p.start), ["new-high"]);
        assert_eq!(p.queued[0].0.1, "old-low");
    }

    #[test]
    fn a_full_namespace_does_not_block_others() {
        let all = vec![
            c("busy", "r", 0, "2026-01-01T00:00:00Z", true),
            c("busy", "w", 5, "2026-01-01T00:00:01Z", false),
            c("calm", "x", 0, "2026-01-01T00:00:02Z", false),
        ];
        let p = plan(&all, Limits { global: Some(10), per_namespace: Some(1) });
        assert_eq!(names(&p.start), ["x"]);
        assert_eq!(p.queued[0].0, ("busy".to_string(), "w".to_string()));
    }

    #[test]
    fn unlimited_starts_everything() {
        let all: Vec<_> = (0..3).map(|i| c("a", &format!("e{i}"), 0, "t", false)).collect();
        assert_eq!(plan(&all, Limits::default()).start.len(), 3);
    }
}
