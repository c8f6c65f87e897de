//! Sluice's configuration and wiring, as a library: the binary (`sluice`)
//! parses its arguments and calls these; the tests and the benchmarks use the
//! same loader and launcher instead of copies.
//!
//! - [`config`]: the one typed configuration (defaults, file, environment,
//!   flags), validated, each section building what it configures.
//! - [`launch`]: the control plane of a process, and running its stages.
//! - [`observe`]: logs, `/metrics`, `/healthz`, `/readyz`, `/status`.
//! - [`demo`]: the whole pipeline on the embedded broker.
//! - [`control_cli`], [`dlq`], [`tools`], [`produce`]: the operator commands.

pub mod build;
pub mod config;
pub mod control_cli;
pub mod demo;
pub mod dlq;
mod gpu;
pub mod launch;
pub mod observe;
pub mod produce;
mod telemetry;
pub mod tools;
