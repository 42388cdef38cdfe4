//! FloodClone: delivers one file from a source to many destinations over an unknown network,
//! pipelining verified chunks over every link in both directions.
//!
//! Modules follow the data flow of one transfer (DESIGN.md section 2).

pub mod linkstats;
pub mod stats;
