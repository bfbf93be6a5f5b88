//! Why an execution is in its phase: one enum for every reason the runner and the controller
//! give, serialised as the strings users match on (`status.reason`, `run -o json`, the store).

use std::borrow::Cow;

macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Machine-readable reason for a phase.
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[doc = $doc])* $name,)*
            /// A reason this version does not know (from a newer runner or an old record).
            Other(String),
        }

        impl Reason {
            /// Every known reason.
            pub const ALL: &'static [Reason] = &[$(Reason::$name),*];

            /// The string users see and match on.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Reason::$name => stringify!($name),)*
                    Reason::Other(s) => s,
                }
            }
        }

        impl From<&str> for Reason {
            fn from(s: &str) -> Self {
                match s {
                    $(stringify!($name) => Reason::$name,)*
                    other => Reason::Other(other.to_string()),
                }
            }
        }
    };
}

reasons! {
    /// Pushed the work branch.
    Completed,
    /// Committed; push disabled.
    Committed,
    /// The agent changed nothing.
    NoChanges,
    WorkspaceFailed,
    StoreFailed,
    CloneFailed,
    /// The work branch already exists on the remote and the execution did not start from it.
    BranchExists,
    PreHookRejected,
    AgentStartFailed,
    AgentCrashed,
    AgentIdle,
    AgentError,
    ApiError,
    MaxTurns,
    BudgetExceeded,
    /// The namespace's team budget (an AgentBudget) is spent for this period: Queued until it
    /// resets, or Failed when a running execution's next request was refused.
    BudgetExhausted,
    SecretInChanges,
    CommitFailed,
    PushRejected,
    PushFailed,
    /// The branch was pushed; opening or updating its pull request failed (the branch is kept).
    PullRequestFailed,
    /// The agent's structured output is missing or does not follow `spec.agent.outputSchema`.
    InvalidOutput,
    /// The agent's structured output is larger than 16 KiB.
    OutputTooLarge,
    PostHookFailed,
    Timeout,
    Cancelled,
    InternalError,
    /// Controller: waiting for a free slot.
    Queued,
    /// Controller: the Job waits for Kueue.
    AwaitingAdmission,
    Started,
    Running,
    RunnerLost,
    RunnerFailed,
    /// The runner ended with a report that is missing, truncated or unparsable: never a success.
    ReportInvalid,
    TemplateNotFound,
    SecretNotFound,
    /// A ConfigMap the agent's configuration names (skills, subagents) does not exist (yet).
    ConfigMapNotFound,
    InvalidSpec,
    ApiKeyMissing,
    Deleted,
}

impl From<String> for Reason {
    fn from(s: String) -> Self {
        Reason::from(s.as_str())
    }
}

impl std::ops::Deref for Reason {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Reason::from(<Cow<'de, str> as serde::Deserialize>::deserialize(d)?.as_ref()))
    }
}

impl schemars::JsonSchema for Reason {
    fn schema_name() -> Cow<'static, str> {
        "Reason".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // A plain string in the CRD: newer runners may give reasons this version does not know.
        schemars::json_schema!({"type": "string"})
    }

    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_and_write_as_their_names() {
        for r in Reason::ALL {
            let json = serde_json::to_string(r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(&serde_json::from_str::<Reason>(&json).unwrap(), r);
        }
        let unknown: Reason = serde_json::from_str("\"SomethingNew\"").unwrap();
        assert_eq!(unknown, Reason::Other("SomethingNew".into()));
        assert_eq!(serde_json::to_string(&unknown).unwrap(), "\"SomethingNew\"");
    }
}
