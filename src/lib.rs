//! agentops: run the Claude Code agent against git repositories, on one machine or as a
//! Kubernetes operator.

pub mod agent;
pub mod api;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod forge;
pub mod gateway;
pub mod git;
pub mod runner;
pub mod server;
pub mod store;
