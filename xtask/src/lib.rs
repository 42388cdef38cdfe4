//! Development tasks for FloodClone: setup checks, the emulated testbed, the max-flow floor,
//! runs and benchmarks. A library so the end-to-end tests drive the same testbed code.

pub mod bench;
pub mod bound;
pub mod build;
pub mod picture;
pub mod run;
pub mod setup;
pub mod sim;
pub mod size;
pub mod testbed;
pub mod topology;
pub mod traffic;
