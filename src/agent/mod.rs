//! The Claude Code CLI: how it is started, and how its stream is read.

pub mod config;
mod process;
pub mod sandbox;
pub mod stream;

pub use process::{AgentCommand, AgentOutcome, AgentStop, build_command, run_agent};
pub use sandbox::Sandbox;
pub use stream::{AgentResult, Tally};
