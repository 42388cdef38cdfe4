//! FloodClone: delivers one file from a source to many destinations over an unknown network,
//! pipelining verified chunks over every link in both directions.
//!
//! Modules follow the data flow of one transfer (DESIGN.md section 2): `manifest` (what is
//! sent), `wire` (how nodes talk), `auth` and `transport` (QUIC with the swarm token),
//! `discovery` (who is behind which link), `sched` (what to ask of whom), `storage` (chunks
//! on disk, resumable), `node` (the daemon tying them together), `linkstats` and `stats`
//! (measurements in the kernel).

pub mod discovery;
pub mod linkstats;
pub mod manifest;
pub mod meter;
pub mod node;
pub mod progress;
pub mod sched;
pub mod stats;
pub mod storage;
pub mod transport;
pub mod wire;
