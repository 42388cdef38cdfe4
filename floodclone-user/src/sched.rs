//! The scheduler lives in `floodclone-sched` (no I/O, shared with the simulator).
pub use floodclone_sched::sched::*;
